"""Up-front checks of plain arguments: whole numbers in range, and a model that holds real tensors."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from .errors import PrunescopeError


def whole_number(value: Any, name: str, minimum: int = 1, *, optional: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes when ``optional``); refuses bools, floats and strings."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        given = "none" if value is None else repr(value)
        raise PrunescopeError(f"{name} must be a whole number >= {minimum}; got {given}")
    return int(value)


def whole_numbers(minimum: int = 0, **values: Any) -> None:
    """Check several whole numbers at once: ``whole_numbers(seed=seed, cache_bytes=cache_bytes)``."""
    for name, value in values.items():
        whole_number(value, name, minimum)


def real_module(model: Any, what: str = "model") -> torch.nn.Module:
    """Refuse anything but a torch.nn.Module whose parameters and buffers hold data (none on the meta device)."""
    if not isinstance(model, torch.nn.Module):
        raise PrunescopeError(f"{what} must be a torch.nn.Module; got {type(model).__name__}")
    meta = next((name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise PrunescopeError(
            f"{what} has tensors on the meta device (e.g. {meta}), which hold no values: load its weights first "
            "(load_state_dict(..., assign=True), or from_pretrained without device_map='meta')"
        )
    return model
