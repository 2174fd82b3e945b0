"""A target's drop curve read off a profile, and the drop predicted at any level by interpolating it."""

from __future__ import annotations

import numpy as np

from .errors import PrunescopeError
from .profile import Profile


def monotone_curve(profile: Profile, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(levels, drops) from (0, 0) through the measured points, drops made non-decreasing and,
    by a vanishing slope, strictly increasing so that every threshold maps to one level.
    A non-finite drop (NaN, inf: the model broke) counts as worse than any finite one."""
    points = profile.curve(name)
    if not points:
        raise PrunescopeError(f"target {name!r} has no fractional level in the profile; the threshold and knapsack methods need some")
    levels = np.array([0.0] + [p[0] for p in points])
    raw = np.array([0.0] + [p[1] for p in points], dtype=np.float64)
    finite = np.isfinite(raw)
    worst = float(np.abs(raw[finite]).max()) if finite.any() else 1.0
    raw[~finite] = 2.0 * worst + 1.0
    drops = np.maximum.accumulate(np.maximum(raw, 0.0))
    scale = max(float(drops[-1]), 1.0)
    return levels, drops + 1e-6 * scale * levels


def interp_drop(levels: np.ndarray, drops: np.ndarray, level: float) -> float:
    """The drop at ``level`` on a curve, linear between its points; inf past its largest level."""
    if level > levels[-1]:
        return float("inf")
    return float(np.interp(level, levels, drops))


def predicted_drop(profile: Profile, plan_levels: dict) -> float | None:
    """Sum of the per-target drops at the plan's levels (None when a level is N:M or a target has no curve)."""
    total = 0.0
    for name, level in plan_levels.items():
        if isinstance(level, str) or not profile.curve(name):
            return None
        total += interp_drop(*monotone_curve(profile, name), float(level))
    return total
