"""Turn a Profile and a Budget into a Plan: how much to prune each target."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .allocate_knapsack import check_grid_step, knapsack_levels
from .baselines import METHODS as BASELINE_METHODS
from .baselines import baseline_levels
from .cost import CostModel
from .curves import monotone_curve as _monotone_curve
from .curves import predicted_drop as _predicted_drop
from .errors import PrunescopeError
from .identity import ScanIdentity
from .plan import Budget, Plan
from .profile import Profile
from .removal import removed_fraction
from .removal import unreachable as _unreachable
from .target import weight_of

METHODS = ("uniform", "global_magnitude", "threshold", "knapsack", *BASELINE_METHODS)


def allocate(profile: Profile, budget: Budget | float, *, method: str = "threshold", model: torch.nn.Module | None = None,
             calibration: Iterable[Any] | None = None, owl_m: float | None = None, owl_lambda: float | None = None,
             grid_step: float | None = None) -> Plan:
    """Choose a level per target so the plan removes the budget's fraction: of the profile's
    parameters (``Budget(sparsity=)``), of all the model's parameters (``params=``) or of its
    Conv/Linear FLOPs (``flops=``), the last two from the shrunk shapes (see :mod:`prunescope.cost`).

    Methods:
        ``"uniform"``: one level for every target (the budget's fraction for a sparsity budget,
        else found by bisection).
        ``"global_magnitude"``: one |w| threshold across all targets (needs ``model``).
        ``"threshold"``: each target gets the largest level whose measured drop stays under one
        shared drop threshold, interpolating linearly between scanned levels; the threshold is
        found by bisection so the plan meets the budget (the PaddleSlim / AIMET rule).
        ``"erk"``, ``"lamp"``, ``"owl"``: the layer-wise baselines of :mod:`prunescope.baselines`
        (a weight profile and a sparsity budget; ``lamp`` and ``owl`` need ``model``, ``owl`` also
        ``calibration`` batches and takes ``owl_m`` (default 5) and ``owl_lambda`` (default 0.08)).
        They keep the profile's criterion; ``predicted_drop`` is None when a level lies beyond the
        profile's scanned levels.
        ``"knapsack"``: the least summed predicted drop meeting the budget, over levels every
        ``grid_step`` (default 0.01) up to each target's largest scanned level (blocks: kept or
        removed), solved as a multiple-choice knapsack to ``details["optimality_gap"]`` (see
        :mod:`prunescope.allocate_knapsack`); never a larger predicted drop than ``"threshold"``.
    """
    if not isinstance(profile, Profile):
        raise PrunescopeError(f"profile must be a prunescope.Profile (Profile.load(path) reads a file); got {type(profile).__name__}")
    if not isinstance(budget, Budget):
        budget = Budget(budget)
    if method not in METHODS:
        raise PrunescopeError(f"unknown allocation method {method!r}; accepted: {', '.join(METHODS)}")
    if method != "owl" and (owl_m is not None or owl_lambda is not None):
        raise PrunescopeError(f"owl_m and owl_lambda apply to method 'owl' only; method is {method!r}")
    grid_step = check_grid_step(grid_step, method)
    params = {t.name: t.params for t in profile.targets}
    if profile.granularity != "weight" and method == "global_magnitude":
        raise PrunescopeError(f"global_magnitude ranks single weights; for {profile.granularity} targets use threshold or uniform")
    if profile.granularity == "block":
        if method not in ("threshold", "knapsack"):
            raise PrunescopeError("blocks are kept or removed whole: use method 'threshold' or 'knapsack'")
        levels, details = _blocks(profile, budget)
        if method == "knapsack":
            levels, details = knapsack_levels(profile, budget, grid_step, levels)
    elif method in BASELINE_METHODS:
        levels, details = baseline_levels(method, profile, budget, model=model, calibration=calibration,
                                          owl_m=owl_m, owl_lambda=owl_lambda)
    elif method == "uniform":
        levels, details = _uniform(profile, budget), {}
    elif method == "global_magnitude":
        levels, details = _global_magnitude(profile, budget, model), {}
    elif method == "knapsack":
        levels, details = knapsack_levels(profile, budget, grid_step, _threshold(profile, budget)[0])
    else:
        levels, details = _threshold(profile, budget)
    predicted = _predicted_drop(profile, levels)
    if method in BASELINE_METHODS and predicted is not None and not np.isfinite(predicted):
        predicted = None  # a level past the scanned ones: the profile has no prediction there
    details.update(_predicted_costs(profile, levels))
    return Plan(
        levels=levels,
        params=params,
        criterion=profile.criterion if method != "global_magnitude" else "magnitude",
        granularity=profile.granularity,
        method=method,
        budget=budget,
        predicted_drop=predicted,
        metric=profile.metric,
        details={**details, **_structure_details(profile), "predicted_drop_is": "sum of per-target drops (additive assumption)"},
        **(ScanIdentity.of_profile(profile).removal() if method != "global_magnitude" else {}),
    )


def _bisect(removed_at, goal: float, high: float) -> float:
    """Smallest x in [0, high] with removed_at(x) >= goal, for a non-decreasing removed_at."""
    low = 0.0
    for _ in range(200):
        middle = (low + high) / 2
        if removed_at(middle) < goal:
            low = middle
        else:
            high = middle
        if high - low <= 1e-15 * max(1.0, high):
            break
    return high


def _uniform(profile: Profile, budget: Budget) -> dict[str, float]:
    names = [t.name for t in profile.targets]
    if budget.kind == "sparsity":
        return {name: budget.fraction for name in names}
    removed = removed_fraction(profile, budget)
    top = max((c.sparsity for c in profile.cells), default=0.9)
    most = removed({n: top for n in names})
    if most < budget.fraction - 1e-9:
        raise _unreachable(budget, most, f"uniform levels up to the largest scanned ({top:g})")
    level = _bisect(lambda x: removed({n: x for n in names}), budget.fraction, top)
    return {name: level for name in names}


def _threshold(profile: Profile, budget: Budget) -> tuple[dict[str, float], dict]:
    names = [t.name for t in profile.targets]
    curves = [_monotone_curve(profile, n) for n in names]
    removed = removed_fraction(profile, budget)

    def levels_at(threshold: float) -> dict[str, float]:
        return {n: float(np.interp(threshold, drops, levels)) for n, (levels, drops) in zip(names, curves, strict=True)}

    high = max(float(drops[-1]) for _, drops in curves)
    most = removed(levels_at(high))
    if most < budget.fraction - 1e-9:
        largest = max(float(levels[-1]) for levels, _ in curves)
        raise _unreachable(budget, most, f"the scanned levels (up to {largest:g})")
    threshold = _bisect(lambda t: removed(levels_at(t)), budget.fraction, high)
    return levels_at(threshold), {"threshold": threshold}


def _global_magnitude(profile: Profile, budget: Budget, model: torch.nn.Module | None) -> dict[str, float]:
    if model is None:
        raise PrunescopeError("method 'global_magnitude' needs the model: allocate(profile, budget, 'global_magnitude', model=model)")
    magnitudes = {t.name: weight_of(model, t).detach().abs().reshape(-1).float() for t in profile.targets}
    everything = torch.cat(list(magnitudes.values()))
    if budget.kind != "sparsity":
        raise PrunescopeError("global_magnitude meets a sparsity budget only; use threshold or uniform for params or flops")
    remove = int(round(budget.sparsity * everything.numel()))
    if remove == 0:
        return {name: 0.0 for name in magnitudes}
    threshold = torch.kthvalue(everything, remove).values
    below = {n: int((m < threshold).sum()) for n, m in magnitudes.items()}
    left = remove - sum(below.values())
    levels = {}
    for name, values in magnitudes.items():  # ties at the threshold go to targets in order
        ties = min(left, int((values == threshold).sum()))
        left -= ties
        levels[name] = (below[name] + ties) / values.numel()
    collapsed = [name for name, level in levels.items() if level >= 1.0]
    if collapsed:  # layer collapse: a whole weight tensor lies under the global threshold
        raise PrunescopeError(
            f"global_magnitude at {budget.sparsity:.1%} would remove every weight of {', '.join(collapsed[:5])}; "
            "exclude that target, lower the budget or use method 'threshold'"
        )
    return levels


def _blocks(profile: Profile, budget: Budget) -> tuple[dict[str, float], dict]:
    """Remove whole blocks, least harmful first, until the removed quantity meets the budget."""
    drops = {}
    for target in profile.targets:
        cell = profile.cell(target.name, "1")
        drops[target.name] = float("inf") if cell is None or not np.isfinite(profile.drop(cell)) else profile.drop(cell)
    removed = removed_fraction(profile, budget)
    levels = {t.name: 0.0 for t in profile.targets}
    for name in sorted(drops, key=lambda n: (drops[n], n)):
        if removed(levels) >= budget.fraction:
            break
        levels[name] = 1.0
    if removed(levels) < budget.fraction:
        raise _unreachable(budget, removed(levels), "removing every block would")
    return levels, {"removed_blocks": [n for n, lv in levels.items() if lv == 1.0]}


def _structure_details(profile: Profile) -> dict:
    """What apply needs to rebuild a structured plan's removals: the unit groups."""
    if profile.granularity == "weight":
        return {}
    return {"groups": {t.name: t.group.to_dict() for t in profile.targets}}


def _predicted_costs(profile: Profile, levels: dict) -> dict:
    """Parameters and FLOPs the plan leaves, from the profile's cost model (when it has one)."""
    if profile.costs is None:
        return {}
    cost = CostModel.from_dict(profile.costs)
    params, flops = cost.remaining(profile.targets, levels)
    result = {"params_dense": cost.params, "params_after": params}
    if cost.flops:
        result.update({"flops_dense": cost.total_flops, "flops_after": flops})
    return result
