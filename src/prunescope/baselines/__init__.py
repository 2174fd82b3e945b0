"""Layer-wise sparsity baselines: a level per weight tensor from the model alone (no profile curves).

- :mod:`.erk`: Erdos-Renyi-Kernel densities from the layers' shapes (RigL);
- :mod:`.lamp`: one global threshold on LAMP scores of the weights;
- :mod:`.owl`: block densities by their share of Wanda-metric outliers on calibration data;
- :mod:`.fit`: every level within [0, the layer's maximum], the budget met exactly.

:func:`baseline_levels` checks the arguments and runs one of them; ``allocate`` builds the Plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..checks import real_module
from ..errors import PrunescopeError
from ..plan import Budget
from ..profile import Profile
from ..target import weight_of
from .erk import erk_levels
from .fit import MAX_LEVEL
from .lamp import lamp_levels
from .owl import owl_levels

METHODS = ("erk", "lamp", "owl")
OWL_M = 5.0
"""OWL's outlier multiple: an entry counts as an outlier above OWL_M times its block's mean."""
OWL_LAMBDA = 0.08
"""OWL's half-spread: block densities span 2 * OWL_LAMBDA."""


def owl_options(owl_m: Any, owl_lambda: Any) -> tuple[float, float]:
    """``(m, lambda)`` checked, the defaults for None: ``m`` a finite number > 0, ``lambda`` in [0, 0.5]."""
    m = OWL_M if owl_m is None else owl_m
    lam = OWL_LAMBDA if owl_lambda is None else owl_lambda
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
        raise PrunescopeError(f"owl_m must be a finite number > 0 (an outlier is above owl_m times the mean); got {m!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 0.5:
        raise PrunescopeError(f"owl_lambda must be a number in [0, 0.5] (half the spread of the block densities); got {lam!r}")
    return float(m), float(lam)


def baseline_levels(method: str, profile: Profile, budget: Budget, *, model: nn.Module | None = None,
                    calibration: Iterable[Any] | None = None, owl_m: float | None = None,
                    owl_lambda: float | None = None) -> tuple[dict[str, float], dict]:
    """The level of every target of ``profile`` by ``method`` (``"erk"``, ``"lamp"`` or ``"owl"``),
    and the plan details recording the method's parameters (under the method's name).

    Every argument is checked before any work: a weight-granularity profile, a sparsity budget, the
    model (for ``lamp`` and ``owl``; ``erk`` reads the profile's shapes and checks the model's when
    given) and, for ``owl``, non-empty calibration batches and its ``owl_m``, ``owl_lambda``.
    """
    if method not in METHODS:
        raise PrunescopeError(f"unknown baseline method {method!r}; accepted: {', '.join(METHODS)}")
    if profile.granularity != "weight":
        raise PrunescopeError(f"method {method!r} sets levels of weight tensors; this profile's targets are "
                              f"{profile.granularity} groups (accepted: a profile of granularity 'weight')")
    if budget.kind != "sparsity":
        raise PrunescopeError(f"method {method!r} meets a Budget(sparsity=...) only; got a {budget.kind} budget")
    if model is None and method != "erk":
        raise PrunescopeError(f"method {method!r} needs the model: allocate(profile, budget, method={method!r}, model=model)")
    if method == "owl":
        if calibration is None:
            raise PrunescopeError("method 'owl' needs calibration batches: allocate(profile, budget, method='owl', "
                                  "model=model, calibration=batches)")
        calibration = list(calibration)
        if not calibration:
            raise PrunescopeError("calibration= is empty: give method 'owl' at least one batch")
        m, lam = owl_options(owl_m, owl_lambda)
    if model is not None:
        real_module(model)
        for target in profile.targets:
            weight_of(model, target)
    fraction = budget.fraction
    if method == "erk":
        levels, found = erk_levels(profile.targets, fraction)
        return levels, {"erk": {**found, "max_level": MAX_LEVEL}}
    if method == "lamp":
        levels, found = lamp_levels(model, profile.targets, fraction)
        return levels, {"lamp": {**found, "max_level": MAX_LEVEL}}
    levels, found = owl_levels(model, profile.targets, fraction, calibration, m, lam)
    return levels, {"owl": {"m": m, "lambda": lam, "calibration_batches": len(calibration), **found, "max_level": MAX_LEVEL}}
