"""How a batch is fed to a model and how logits are read back: tuples, dicts and plain tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import PrunescopeError


def split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """Return (positional args, keyword args, labels) for one batch.

    Accepted shapes: a tensor (inputs only); ``(inputs, labels)`` or ``(inputs,)``; a mapping of
    keyword arguments (Hugging Face style) whose optional ``"labels"`` entry is held back.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        inputs = batch[0]
        labels = batch[1] if len(batch) == 2 else None
        if isinstance(inputs, Mapping):
            return (), dict(inputs), labels
        return (inputs,), {}, labels
    raise PrunescopeError(
        f"unsupported batch of type {type(batch).__name__}: give a tensor, (inputs, labels), "
        "or a dict of model keyword arguments"
    )


def batch_size_of(batch: Any) -> int | None:
    """Samples in one batch: the leading size of its first input tensor (None when it has none)."""
    args, kwargs, _ = split_batch(batch)
    for value in (*args, *(kwargs[k] for k in kwargs)):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def run_model(model: torch.nn.Module, batch: Any) -> Any:
    """Call the model on one batch."""
    args, kwargs, _ = split_batch(batch)
    return model(*args, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor inside a model output (tensor, HF ModelOutput, tuple or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PrunescopeError(f"cannot find logits in a model output of type {type(output).__name__}: return a tensor, "
                          "a tuple starting with one, or an object with .logits")


def batch_fingerprint_tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a batch, in a fixed order, for hashing."""
    args, kwargs, labels = split_batch(batch)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
    if isinstance(labels, torch.Tensor):
        tensors.append(labels)
    return tensors
