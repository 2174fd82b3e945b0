"""Erdos-Renyi-Kernel (ERK) layer sparsities (Evci et al. 2020, "Rigging the Lottery", RigL).

A layer's density (fraction kept) is ``epsilon * sum(shape) / prod(shape)`` of its weight tensor:
``(n_in + n_out) / (n_in * n_out)`` for a Linear, the kernel sizes added in for a convolution. One
``epsilon`` scales every layer so the kept parameters meet the budget. A layer whose density would
exceed 1 is kept dense and ``epsilon`` recomputed over the others, as RigL's ``sparse_utils`` does
(solving ``sum_i params_i * min(epsilon * raw_i, 1) = kept`` gives that loop's result directly).
A layer whose density would fall under ``1 - max_level`` (see :mod:`.fit`) is held there the same
way, so the budget is met exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..target import Target
from .fit import check_reachable, fit_densities, max_levels


def erk_raw_density(shape: Sequence[int]) -> float:
    """``sum(shape) / prod(shape)``: ERK's density of a layer before the common scale ``epsilon``."""
    return float(sum(shape)) / float(np.prod([float(s) for s in shape]))


def erk_levels(targets: Sequence[Target], fraction: float) -> tuple[dict[str, float], dict]:
    """The level (fraction removed) of each target and the details: ``epsilon``, the layers made
    dense and those held at their maximum level."""
    raw = np.array([erk_raw_density(t.shape) for t in targets])
    params = np.array([t.params for t in targets], dtype=np.float64)
    ceilings = max_levels(params)
    check_reachable("erk", fraction, params, ceilings)
    levels, epsilon = fit_densities(np.zeros_like(raw), raw, params, ceilings, fraction)
    names = [t.name for t in targets]
    details = {
        "epsilon": epsilon,
        "dense": [n for n, lv in zip(names, levels, strict=True) if lv == 0.0],
        "at_max_level": [n for n, lv, top in zip(names, levels, ceilings, strict=True) if lv == top],
    }
    return {n: float(lv) for n, lv in zip(names, levels, strict=True)}, details
