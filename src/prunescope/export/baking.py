"""What an export checks and needs: a transformers model, its tokenizer, and that what it wrote reloads whole."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PrunescopeError


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (transformers is not imported for it)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def tokenizer_of(model: nn.Module, tokenizer: Any) -> Any:
    """``tokenizer``, or the one in the local folder a transformers model was loaded from, or None."""
    if tokenizer is not None or not is_hf_model(model):
        return tokenizer
    source = Path(str(getattr(model.config, "_name_or_path", "") or "."))
    if not any((source / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")) or not source.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def check_same_weights(expected: nn.Module, reloaded: nn.Module, what: str) -> None:
    """Refuse unless ``reloaded`` holds every tensor of ``expected``, bit for bit (dtype aside)."""
    ours, theirs = expected.state_dict(), reloaded.state_dict()
    missing = [key for key in ours if key not in theirs]
    if missing:
        raise PrunescopeError(f"{what} reloads without {len(missing)} tensor(s), e.g. {missing[0]}; nothing was written")
    for key, tensor in ours.items():
        other = theirs[key]
        if tuple(other.shape) != tuple(tensor.shape) or not torch.equal(other.to(tensor.dtype).cpu(), tensor.cpu()):
            raise PrunescopeError(f"{what} reloads tensor {key} with other values; nothing was written")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without progress bars and warnings while an export writes and reloads."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
