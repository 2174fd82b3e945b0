"""Wanda (Sun et al., 2023): prune by |weight| x input norm, compared within each output row.

The score of ``W_ij`` is ``|W_ij| * ||x_j||_2``, ``||x_j||`` the Euclidean norm of input feature j
over all calibration tokens. A fraction removes exactly ``round(level * in)`` lowest scores from
every row; an N:M pattern keeps the N highest scores in every group of M consecutive inputs of a
row. Kept weights are not changed.
"""

from __future__ import annotations

import torch

from ..errors import PrunescopeError
from ..levels import Level, NMPattern, parse_level
from ..masks import check_nm_compatible
from .layers import LayerResult


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||x||`` for a weight [out, in] and input-feature norms [in], in float64."""
    if weight.dim() != 2 or norms.shape != (weight.shape[1],):
        raise PrunescopeError(f"Wanda needs a weight [out, in] and one norm per input; got {tuple(weight.shape)} and {tuple(norms.shape)}")
    return weight.detach().abs().to(torch.float64) * norms.detach().to(device=weight.device, dtype=torch.float64).unsqueeze(0)


def wanda_keep(weight: torch.Tensor, norms: torch.Tensor, level: Level, name: str = "the layer") -> torch.Tensor:
    """Boolean keep-mask [out, in]: per row, the lowest ``|w| ||x||`` scores are removed.

    Ties are broken by position (the earlier input is removed first, as ``keep_mask`` does).
    """
    parsed = parse_level(level)
    scores = wanda_scores(weight, norms)
    rows, cols = scores.shape
    if isinstance(parsed, NMPattern):
        check_nm_compatible((rows, cols), 1, parsed, name)
        groups = scores.reshape(rows, cols // parsed.m, parsed.m)
        order = torch.argsort(groups, dim=2, descending=True, stable=True)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, order[..., : parsed.n], True)
        return keep.reshape(rows, cols)
    remove = int(round(parsed * cols))
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    if remove:
        order = torch.argsort(scores, dim=1, stable=True)
        keep.scatter_(1, order[:, :remove], False)
    return keep


def wanda_prune(weight: torch.Tensor, norms: torch.Tensor, level: Level, name: str = "the layer") -> LayerResult:
    """Prune ``weight`` [out, in] by Wanda; ``error`` is the sum of removed ``(|w| ||x||)^2``."""
    keep = wanda_keep(weight, norms, level, name)
    error = float(wanda_scores(weight, norms).pow(2)[~keep].sum())
    return LayerResult(weight.detach() * keep, keep, error)
