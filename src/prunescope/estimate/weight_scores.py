"""Per-element scores of weight targets, summed over the elements a level removes, and the
SparseGPT reconstruction error.

Every score here is a tensor in the weight's own layout; a cell's estimate is its sum over the
removed elements (``~keep_mask(...)`` of the scan's criterion):

==============  ================================================  =====================================
method          per element                                       the sum over removed elements is
==============  ================================================  =====================================
magnitude       ``|w|^p / sum |w|^p`` (whole tensor)              the share of the layer's p-mass removed
snip            ``|g w|``                                         sum of |first-order terms| (nats)
taylor          ``-g w``                                          the first-order loss change (nats)
fisher          ``0.5 F w^2``                                     the OBD second-order loss change (nats)
wanda           ``(|w| ||x_j||)^2 / rows``                        squared output error per token, input
                                                                  correlations ignored (diagonal of H)
==============  ================================================  =====================================

``g`` is the mean gradient and ``F`` the per-sample empirical Fisher diagonal of the calibration loss
(:mod:`.gradients`); ``||x_j||^2`` sums input feature j over the ``rows`` calibration tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layer_kinds import is_conv1d
from ..levels import Level
from .activations import InputMoments, row_diag, weight_matrix


def magnitude_scores(weight: torch.Tensor, p: float) -> torch.Tensor:
    """``|w|^p`` over the tensor's total, so a layer's scores sum to 1 (scale-free across layers)."""
    mass = weight.detach().abs().to(torch.float64).pow(p)
    total = float(mass.sum())
    return mass / total if total > 0 else mass


def gradient_scores(method: str, weight: torch.Tensor, grad: torch.Tensor | None, fisher: torch.Tensor | None) -> torch.Tensor:
    """snip ``|g w|``, taylor ``-g w`` or fisher ``0.5 F w^2``, in float64."""
    w = weight.detach().to(torch.float64)
    if method == "snip":
        return (grad.to(torch.float64) * w).abs()
    if method == "taylor":
        return -(grad.to(torch.float64) * w)
    if method == "fisher":
        return 0.5 * fisher.to(torch.float64) * w.square()
    raise ValueError(method)


def _to_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An ``[out, features]`` tensor back in the module's weight layout."""
    return matrix.t() if is_conv1d(module) else matrix.reshape(module.weight.shape)


def wanda_scores(module: nn.Module, moments: InputMoments) -> torch.Tensor:
    """``w^2 sum_t x_j^2 / rows`` per element: each removed weight's own output error per token."""
    w = weight_matrix(module).detach().to(torch.float64)
    return _to_layout(module, w.square() * row_diag(moments, w.shape[0]) / moments.rows)


def obs_error(module: nn.Module, moments: InputMoments, level: Level, name: str, block_size: int, damp: float) -> float:
    """SparseGPT's OBS reconstruction error at ``level`` per calibration token: the squared output
    error ``sum_rows dW H dW^T / rows`` left after pruning by its own mask and updating the kept
    weights (:func:`prunescope.oneshot.sparsegpt.sparsegpt_prune`, ``block_size`` and ``damp`` as there)."""
    from ..oneshot.sparsegpt import sparsegpt_prune

    result = sparsegpt_prune(weight_matrix(module).detach(), moments.gram, level, block_size=block_size, damp=damp, name=name)
    return result.error / moments.rows
