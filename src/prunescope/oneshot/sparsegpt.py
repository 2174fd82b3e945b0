"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update its remaining weights by OBS.

For a layer ``y = x W^T`` with input statistics ``H = sum_t x_t x_t^T``, the columns (inputs) are
visited left to right. Removing weight ``w_q`` and re-fitting the columns not yet visited costs
``w_q^2 / [H_F^-1]_qq`` (``F``: columns from q on) and moves the later weights of the row by
``-(w_q / [H_F^-1]_qq) [H_F^-1]_q,F``. All ``H_F^-1`` needed are rows of the upper Cholesky factor
``U`` of ``H^-1`` (``[H_F^-1]_qq = U_qq^2``), so one factorization serves the whole sweep. Updates
are applied lazily: exactly inside a block of ``block_size`` columns, then to the columns right of
the block in one matrix product.

Mask selection (this implementation, as the paper's reference code):
    fraction: at the start of each block of columns, the ``w^2 / U_qq^2`` scores of the block's
        (already updated) weights are ranked over all its rows together and the lowest are removed.
        Counts are rounded cumulatively, so the layer loses exactly ``round(level * out * in)``
        weights, but a single row's sparsity varies around the level.
    N:M: at the first column of each group of M inputs, each row keeps the N highest scores.

Dampening: ``damp * mean(diag H)`` is added to the diagonal. Inputs that are zero on every token
(``H_ii = 0``) get ``H_ii = 1`` and their weights set to 0. If H still cannot be factorized, the
dampening grows tenfold with a warning naming the layer, up to ``8`` times, never producing NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ..errors import PrunescopeError
from ..levels import Level, NMPattern, parse_level
from ..masks import check_nm_compatible
from .layers import LayerResult

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01
RETRIES = 8


def check_sparsegpt_options(block_size: int, damp: float) -> None:
    """Refuse a block size that is not a positive integer or a negative or non-finite dampening."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise PrunescopeError(f"block_size must be a positive integer (columns per lazy update); got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise PrunescopeError(f"damp must be a fraction >= 0 of the mean diagonal of H (typically 0.01); got {damp!r}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    level: Level,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    name: str = "the layer",
) -> LayerResult:
    """Prune ``weight`` [out, in] to ``level`` and update its kept weights to reconstruct ``x W^T``.

    Args:
        weight: the dense weight as [out, in] (not modified).
        hessian: ``sum_t x_t x_t^T`` over the calibration tokens, [in, in] (any float dtype).
        level: fraction in (0, 1) of the weights removed, or an N:M pattern (``"2:4"``) along the inputs.
        block_size: columns per lazy batch update (a multiple of M for N:M levels).
        damp: dampening added to the diagonal of H, as a fraction of its mean diagonal.
        name: the layer's name, used in warnings and errors.

    Returns a :class:`LayerResult` whose ``error`` is the sum of the OBS losses: the exact value of
    ``sum over rows of dW H_damped dW^T`` for the returned weight (``dW`` against ``weight`` with
    dead inputs zeroed); against the undampened H it is an upper bound, close for small ``damp``.
    The sweep runs in float64 for a float64 weight, else float32; H is factorized in float64.
    """
    return sparsegpt_prune_levels(weight, hessian, [level], block_size=block_size, damp=damp, name=name)[0]


def sparsegpt_prune_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    levels: Sequence[Level],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    name: str = "the layer",
) -> list[LayerResult]:
    """:func:`sparsegpt_prune` at several levels from one factorization of the dampened H.

    The dead-input handling and the Cholesky factor of ``H^-1`` do not depend on the level, so they
    are computed once and every level runs only its own sweep; each result equals what
    :func:`sparsegpt_prune` returns for that level alone (the same retries with more dampening).
    """
    parsed = [parse_level(level) for level in levels]
    check_sparsegpt_options(block_size, damp)
    if weight.dim() != 2:
        raise PrunescopeError(f"{name}: SparseGPT takes a 2-D weight [out, in]; got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise PrunescopeError(f"{name}: the Hessian has shape {tuple(hessian.shape)}; the weight needs ({cols}, {cols})")
    if not bool(torch.isfinite(hessian).all()):
        raise PrunescopeError(f"{name}: its input statistics are not finite (inf or NaN activations on the calibration data)")
    for level in parsed:
        if isinstance(level, NMPattern):
            check_nm_compatible((rows, cols), 1, level, name)
            if block_size % level.m:
                raise PrunescopeError(f"block_size {block_size} must be a multiple of M={level.m} for level '{level}'")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    h = (h + h.t()) / 2
    dead = h.diagonal() <= 0
    dead_count = int(dead.sum())
    if dead_count:
        warnings.warn(f"{name}: {dead_count} of {cols} inputs were zero on every calibration token; "
                      "their weights are set to 0", RuntimeWarning, stacklevel=2)
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1.0
        w[:, dead] = 0
    mean_diag = float(h.diagonal().mean())
    results: dict[int, LayerResult] = {}
    relative = float(damp)
    for _ in range(RETRIES + 1):
        factor = _inverse_factor(h, relative * mean_diag)
        if factor is not None:
            factor = factor.to(dtype)
            for index, level in enumerate(parsed):
                if index in results:
                    continue
                pruned, keep, error = _sweep(w.clone(), factor, level, block_size)
                if bool(torch.isfinite(pruned).all()) and math.isfinite(error):
                    results[index] = LayerResult(pruned, keep, error, relative, dead_count)
            if len(results) == len(parsed):
                return [results[i] for i in range(len(parsed))]
        larger = relative * 10 if relative > 0 else 1e-6
        warnings.warn(f"{name}: the dampened Hessian is not positive definite (damp {relative:g} of its mean diagonal); "
                      f"retrying with damp {larger:g}", RuntimeWarning, stacklevel=2)
        relative = larger
    raise PrunescopeError(f"{name}: its Hessian could not be inverted even with damp {relative:g}; check the calibration data")


def _inverse_factor(h: torch.Tensor, shift: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + shift I)^-1``, or None when it does not exist numerically."""
    damped = h.clone()
    damped.diagonal().add_(shift)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def _sweep(w: torch.Tensor, u: torch.Tensor, level: float | NMPattern, block_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The OBS sweep with lazy block updates; returns (weight, keep-mask, summed losses)."""
    rows, cols = w.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, dtype=torch.float64, device=w.device)
    removed = 0
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        diag = u_block.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if not isinstance(level, NMPattern):
            count = int(round(level * rows * end)) - removed
            scores = (block.pow(2) / diag.pow(2).unsqueeze(0)).reshape(-1)
            block_keep.view(-1)[torch.argsort(scores, stable=True)[:count]] = False
            removed += count
        for j in range(end - start):
            if isinstance(level, NMPattern) and j % level.m == 0:
                scores = block[:, j : j + level.m].pow(2) / diag[j : j + level.m].pow(2).unsqueeze(0)
                order = torch.argsort(scores, dim=1, descending=True, stable=True)
                group = torch.zeros_like(scores, dtype=torch.bool)
                group.scatter_(1, order[:, : level.n], True)
                block_keep[:, j : j + level.m] = group
            error = block[:, j].masked_fill(block_keep[:, j], 0).div_(diag[j])  # (w - kept) / U_jj
            block[:, j:].addr_(error, u_block[j, j:], alpha=-1)
            block[:, j].masked_fill_(~block_keep[:, j], 0)  # exact zeros where the update left rounding
            errors[:, j] = error
        losses += errors.to(torch.float64).pow(2).sum(dim=1)
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
        keep[:, start:end] = block_keep
    return w, keep, float(losses.sum())
