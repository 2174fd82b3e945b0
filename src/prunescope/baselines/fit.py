"""Meet a sparsity budget exactly with levels kept inside [0, each layer's maximum].

A layer's maximum level is ``min(MAX_LEVEL, 1 - 1/params)``: at most 99% of its weights go and at
least one stays, so no layer is cut off whole (rounding a level to a weight count included).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import PrunescopeError

MAX_LEVEL = 0.99
"""The largest fraction of one layer's weights a baseline allocation removes."""


def max_levels(params: Sequence[int]) -> np.ndarray:
    """Each layer's largest allowed level: ``min(MAX_LEVEL, 1 - 1/params)``."""
    counts = np.asarray(params, dtype=np.float64)
    return np.minimum(MAX_LEVEL, 1.0 - 1.0 / np.maximum(counts, 1.0))


def check_reachable(method: str, fraction: float, params: Sequence[int], top: Sequence[float]) -> None:
    """Refuse a budget that layers (or groups) of ``params`` weights cannot meet within their maximum levels ``top``."""
    counts = np.asarray(params, dtype=np.float64)
    most = float((np.asarray(top, dtype=np.float64) * counts).sum() / counts.sum())
    if fraction > most:
        raise PrunescopeError(
            f"budget unreachable: method {method!r} removes at most {MAX_LEVEL:.0%} of a layer (and keeps one weight), "
            f"{most:.2%} of these layers' parameters; {fraction:.2%} asked: lower the budget"
        )


def fit_densities(base: np.ndarray, slope: np.ndarray, params: np.ndarray, top: np.ndarray,
                  fraction: float) -> tuple[np.ndarray, float]:
    """Levels ``clip(1 - (base + slope * t), 0, top)`` of layers (or groups) of ``params`` weights,
    with the ``t`` at which they remove exactly ``fraction`` of the weights (every ``slope`` > 0).

    The kept share is piecewise linear in ``t`` with a kink where a layer reaches density 1 or its
    smallest density, so ``t`` is solved exactly on the segment holding the goal. Returns (levels, t).
    """
    base, slope, params, top = (np.asarray(x, dtype=np.float64) for x in (base, slope, params, top))
    lowest = 1.0 - top
    goal = (1.0 - fraction) * params.sum()

    def kept(t: np.ndarray) -> np.ndarray:
        return np.clip(base[None, :] + slope[None, :] * t[:, None], lowest, 1.0) @ params

    kinks = np.unique(np.concatenate([(lowest - base) / slope, (1.0 - base) / slope]))
    at_kinks = kept(kinks)
    right = int(np.searchsorted(at_kinks, goal, side="left"))
    right = min(max(right, 1), len(kinks) - 1)
    left = right - 1
    span = at_kinks[right] - at_kinks[left]
    t = kinks[left] if span <= 0 else kinks[left] + (goal - at_kinks[left]) * (kinks[right] - kinks[left]) / span
    levels = np.clip(1.0 - (base + slope * t), 0.0, top)
    return levels, float(t)
