"""Block influence (ShortGPT, Men et al. 2024): how much a transformer block changes its hidden states.

``BI = 1 - mean over tokens of cos(h_in, h_out)``, from one forward pass with a hook on every block;
a block that barely rotates its input (BI near 0) is the cheapest to replace by the identity. The
mean runs over every position of every calibration batch (padding included: give unpadded windows).
A position's vector is the last axis of a transformer's ``[batch, tokens, hidden]`` states, and the
channel axis of a CNN's ``[batch, channels, height, width]`` feature maps (residual blocks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunescopeError
from .activations import run_forward


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise PrunescopeError("block_influence needs blocks whose first input is the hidden-states tensor")
    return hidden


def _hidden_out(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PrunescopeError(f"block_influence needs blocks that return the hidden states (a tensor or a tuple); got {type(output).__name__}")


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """One row per position: channels of 4-D/5-D feature maps, the last axis otherwise."""
    if hidden.dim() >= 4:
        hidden = hidden.movedim(1, -1)
    return hidden.double().reshape(-1, hidden.shape[-1])


def block_influence(model: nn.Module, batches: Iterable[Any], names: list[str]) -> dict[str, float]:
    """``1 - mean cos(h_in, h_out)`` over all token positions, per named block (a module path)."""
    totals: dict[str, list[float]] = {name: [0.0, 0] for name in names}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_in, h_out = _hidden_in(args, kwargs), _hidden_out(output)
            if h_in.shape != h_out.shape:
                raise PrunescopeError(f"block {name} changes the hidden-state shape {tuple(h_in.shape)} -> {tuple(h_out.shape)}")
            cos = F.cosine_similarity(_positions(h_in), _positions(h_out), dim=-1)
            totals[name][0] += float((1.0 - cos).sum())
            totals[name][1] += cos.numel()

        return hook

    run_forward(model, batches, [(model.get_submodule(n), "forward", hook_for(n)) for n in names])
    if any(count == 0 for _, count in totals.values()):
        raise PrunescopeError("the calibration pass never ran some blocks")
    return {name: total / count for name, (total, count) in totals.items()}
