"""Prune one Linear layer by a one-shot criterion: magnitude, Wanda or SparseGPT."""

from __future__ import annotations

import warnings

import torch

from ..criteria import check_criterion
from ..errors import PrunescopeError
from ..levels import Level
from ..masks import keep_mask
from .hessian import InputStats
from .layers import LayerResult
from .sparsegpt import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, sparsegpt_prune
from .wanda import wanda_prune


def needs_hessian(criterion: str) -> bool:
    """True when the criterion needs the full ``X^T X`` (sparsegpt), not only the column norms."""
    return criterion == "sparsegpt"


def prune_rows(
    weight: torch.Tensor,
    level: Level,
    criterion: str,
    stats: InputStats | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    name: str = "the layer",
) -> LayerResult:
    """Prune a weight given as [out, in] rows; ``stats`` are its inputs' statistics (wanda, sparsegpt).

    ``magnitude`` removes the smallest ``|w|`` of the whole tensor (or N:M groups) and needs no data.
    """
    check_criterion(criterion, "weight", oneshot=True)
    if criterion == "magnitude":
        keep = keep_mask(weight, level, "magnitude", input_dim=1, key=name)
        return LayerResult(weight.detach() * keep, keep)
    if stats is None:
        raise PrunescopeError(f"criterion {criterion!r} needs the input statistics of {name}")
    if stats.tokens == 0:
        raise PrunescopeError(f"{name} never ran on the calibration data, so criterion {criterion!r} cannot rank its weights")
    if criterion == "wanda":
        return wanda_prune(weight, stats.norms, level, name)
    if stats.hessian is None:
        raise PrunescopeError(f"criterion 'sparsegpt' needs the full input Hessian of {name}; only norms were gathered")
    if stats.tokens < stats.features:
        warnings.warn(f"{name}: {stats.tokens} calibration tokens for {stats.features} inputs, so its Hessian is singular; "
                      "dampening makes it invertible, but give more calibration data for a good result",
                      RuntimeWarning, stacklevel=2)
    return sparsegpt_prune(weight, stats.hessian, level, block_size=block_size, damp=damp, name=name)
