"""The ``knapsack`` allocation: the plan of least summed predicted drop that meets the budget,
solved exactly (to a stated gap) as a multiple-choice knapsack over a fine grid of levels.

Each target chooses one level among 0, ``grid_step``, 2 x ``grid_step`` ... up to its largest
scanned level, every scanned level and its level in the threshold plan; the drop at a level is
read off the target's curve exactly as the threshold method reads it (:mod:`prunescope.curves`).
Whole blocks choose between kept (0) and removed (1). What a choice removes is the target's own
(marginal) removal; when two targets cut one tensor along different axes (coupled channel groups:
a conv keeps the product of its input and output groups' kept fractions), the marginals overstate
the plan's removal, so the solver's capacity is raised until the true removal
(:func:`prunescope.removal.removed_fraction`) meets the budget.

The lower bound holds in both cases: a plan truly meeting the budget has marginals summing to at
least the budget (a removed element is removed by at least one of the targets), so it is a choice
of the relaxation the bound is computed on; in the coupled case the gap also holds what the raised
capacity costs. The plan returned is the better of the solver's and the threshold plan, so it never
predicts a larger drop than ``threshold``.

``plan.details`` records ``grid_step`` (None for blocks), ``solution`` (``"knapsack"`` or
``"threshold"``: which plan was returned), ``lower_bound`` (no plan over these levels meeting the
budget predicts less), ``optimality_gap`` (the plan's predicted drop minus the lower bound, in
metric units), ``threshold_predicted_drop``, ``cost_unit`` (the solver's resolution, a fraction of
the budget's quantity), ``removal`` (``"additive"`` or ``"coupled"``) and, when coupled, ``capacity``
(the summed marginal removal the solver was asked for).
"""

from __future__ import annotations

import numpy as np

from .curves import monotone_curve, predicted_drop
from .errors import PrunescopeError
from .knapsack import MultipleChoiceKnapsack
from .plan import Budget
from .profile import Profile
from .removal import marginal_removal, removal_is_additive, removed_fraction

DEFAULT_GRID_STEP = 0.01
SHORT_TOLERANCE = 1e-12
"""Float rounding a plan's removal may fall short of the budget's fraction by."""


def check_grid_step(grid_step: float | None, method: str) -> float | None:
    """The knapsack's grid step (``DEFAULT_GRID_STEP`` when None), refused outside (0, 0.5] and for other methods."""
    if method != "knapsack":
        if grid_step is not None:
            raise PrunescopeError(f"grid_step is a setting of method 'knapsack'; method {method!r} takes none")
        return None
    if grid_step is None:
        return DEFAULT_GRID_STEP
    if isinstance(grid_step, bool) or not isinstance(grid_step, (int, float)) or not 0.0 < grid_step <= 0.5:
        raise PrunescopeError(f"grid_step {grid_step!r} must be a fraction in (0, 0.5], the spacing of the knapsack's levels (e.g. 0.01)")
    return float(grid_step)


def knapsack_levels(profile: Profile, budget: Budget, grid_step: float, threshold_levels: dict[str, float]) -> tuple[dict[str, float], dict]:
    """(level per target, details) of the least-drop plan meeting ``budget``, given the threshold
    plan (which meets it) as a candidate and a fallback."""
    blocks = profile.granularity == "block"
    choices = [_choices(profile, t.name, grid_step, threshold_levels.get(t.name), blocks) for t in profile.targets]
    removal = marginal_removal(profile, budget)
    drops = np.full((len(choices), max(len(levels) for levels, _ in choices)), np.inf)  # inf: no such column
    amounts = np.zeros_like(drops)
    for row, (target, (levels, curve)) in enumerate(zip(profile.targets, choices, strict=True)):
        drops[row, :len(levels)] = curve
        amounts[row, :len(levels)] = [removal(target, float(level)) for level in levels]

    need, removed = budget.fraction, removed_fraction(profile, budget)

    def levels_of(picks: np.ndarray) -> dict[str, float]:
        return {t.name: float(choices[row][0][picks[row]]) for row, t in enumerate(profile.targets)}

    def meets(picks: np.ndarray | None) -> bool:
        return picks is not None and removed(levels_of(picks)) >= need - SHORT_TOLERANCE

    additive = removal_is_additive(profile, budget)
    largest = max(float(amounts.max(axis=1).sum()), need)
    most = need
    if not additive:  # room for the marginals' overstatement of the removal, judged on the threshold plan
        overstated = sum(removal(t, float(threshold_levels[t.name])) for t in profile.targets)
        most = min(largest, need * max(1.0, overstated / max(removed(threshold_levels), SHORT_TOLERANCE)) * 1.25)
    table = MultipleChoiceKnapsack(drops, amounts, most)
    picks, capacity = _least_capacity(table, need, meets)
    if picks is None and most < largest:
        table = MultipleChoiceKnapsack(drops, amounts, largest)
        picks, capacity = _least_capacity(table, need, meets)

    threshold_drop = predicted_drop(profile, threshold_levels)
    threshold_drop = float("inf") if threshold_drop is None else threshold_drop  # a block without a measured removal
    solved_drop = predicted_drop(profile, levels_of(picks)) if picks is not None else float("inf")
    solved = solved_drop <= threshold_drop
    levels, upper = (levels_of(picks), solved_drop) if solved else (dict(threshold_levels), threshold_drop)
    lower = min(table.lower_bound(need), upper)
    details = {
        "grid_step": None if blocks else grid_step,
        "solution": "knapsack" if solved else "threshold",
        "optimality_gap": upper - lower,
        "lower_bound": lower,
        "threshold_predicted_drop": threshold_drop,
        "cost_unit": table.unit,
        "removal": "additive" if additive else "coupled",
    }
    if not additive:
        details["capacity"] = capacity
    if blocks:
        details["removed_blocks"] = [name for name, level in levels.items() if level == 1.0]
    return levels, details


def _choices(profile: Profile, name: str, step: float, threshold_level: float | None, blocks: bool) -> tuple[np.ndarray, np.ndarray]:
    """(levels, predicted drops) a target may choose, ascending, level 0 first."""
    if blocks and not profile.curve(name):
        return np.zeros(1), np.zeros(1)
    levels, drops = monotone_curve(profile, name)
    if blocks:
        return levels, drops
    top = float(levels[-1])
    grid = np.round(np.arange(0.0, top + 1e-12, step), 12)
    extra = [threshold_level] if isinstance(threshold_level, float) and 0.0 <= threshold_level <= top else []
    chosen = np.unique(np.concatenate([grid[grid <= top], levels, extra]))
    return chosen, np.interp(chosen, levels, drops)


def _least_capacity(table: MultipleChoiceKnapsack, need: float, meets) -> tuple[np.ndarray | None, float]:
    """The table's best choice at ``need`` when its plan truly meets the need; else, bisecting
    the capacity in (need, table.most], the least-drop plan among those probed that meets it, and
    its capacity; (None, most) when even the most does not."""
    picks = table.best(need)
    if meets(picks):
        return picks, need
    low, high = need, table.most
    found = table.best(high)
    if not meets(found):
        return None, high
    best, capacity = found, high
    while high - low > table.unit:
        middle = (low + high) / 2
        trial = table.best(middle)
        if not meets(trial):
            low = middle
            continue
        high = middle
        if table.drop_of(trial) <= table.drop_of(best):
            best, capacity = trial, middle
    return best, capacity
