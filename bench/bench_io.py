"""Output shared by the benchmarks: one JSON line per result, on stdout and optionally appended to a file."""

from __future__ import annotations

import json
import sys


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the JSON lines)."""
    print(message, file=sys.stderr, flush=True)


def emit(row: dict, out: str | None = None) -> None:
    """Print ``row`` as one JSON line; with ``out``, also append it to that file."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
