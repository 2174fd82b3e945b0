"""The knapsack allocation: the least predicted drop that meets the budget, equal to brute force within
its stated gap, never worse than threshold, meeting every kind of budget, saved and refused like the rest."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import prunescope as ps
from prunescope.cost import CostModel
from prunescope.curves import predicted_drop
from prunescope.knapsack import MultipleChoiceKnapsack
from prunescope.removal import removed_fraction
from prunescope.structure.groups import Slice, UnitGroup

SHORT = 1e-12  # float rounding a plan's removal may fall short of the budget by


# ---- the solver alone ------------------------------------------------------------------------


def _random_instance(seed: int, rows: int = 4, columns: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Amounts and drops rising along each row from (0, 0), the drops of random (non-convex) shape."""
    rng = np.random.default_rng(seed)
    amounts = np.sort(rng.uniform(0.0, 1.0, (rows, columns)), axis=1)
    drops = np.sort(rng.exponential(1.0, (rows, columns)) ** 2, axis=1)
    amounts[:, 0], drops[:, 0] = 0.0, 0.0
    return drops, amounts


def _brute_force(drops: np.ndarray, amounts: np.ndarray, need: float) -> float:
    rows = np.arange(len(drops))
    best = np.inf
    for combo in itertools.product(range(drops.shape[1]), repeat=len(drops)):
        if amounts[rows, combo].sum() >= need:
            best = min(best, float(drops[rows, combo].sum()))
    return best


@pytest.mark.parametrize("bins", [8, 64, 4096])
@pytest.mark.parametrize("seed", range(6))
def test_solver_equals_brute_force_within_its_gap(seed, bins):
    drops, amounts = _random_instance(seed)
    rows = np.arange(len(drops))
    largest = amounts.max(axis=1).sum()
    for share in (0.1, 0.35, 0.6, 0.9):
        need = share * largest
        optimum = _brute_force(drops, amounts, need)
        table = MultipleChoiceKnapsack(drops, amounts, need, bins=bins)
        picks = table.best(need)
        found, lower = float(drops[rows, picks].sum()), table.lower_bound(need)
        assert amounts[rows, picks].sum() >= need  # feasible with the true amounts
        assert lower <= optimum + 1e-12 and optimum <= found + 1e-12  # so found - optimum <= found - lower, the gap
        if bins == 4096:
            assert found == pytest.approx(optimum, abs=1e-12)
    table = MultipleChoiceKnapsack(drops, amounts, 1.01 * largest)
    assert table.best(1.01 * largest) is None and table.lower_bound(1.01 * largest) == np.inf


def test_solver_refuses_malformed_arrays_in_one_line():
    drops, amounts = _random_instance(0)
    for bad_drops, bad_amounts in ((drops, amounts[:, :3]), (drops * np.nan, amounts), (drops, -amounts - 1)):
        with pytest.raises(ps.PrunescopeError, match="knapsack") as info:
            MultipleChoiceKnapsack(bad_drops, bad_amounts, 1.0)
        assert "\n" not in str(info.value)


# ---- profiles ----------------------------------------------------------------------------------


def _random_profile(seed: int, count: int = 4, levels=(0.25, 0.5, 0.75)) -> ps.Profile:
    """Loss drops of random, noisy (not always monotone) shape on weight targets of random size."""
    rng = np.random.default_rng(seed)
    targets = []
    for i in range(count):
        width = int(rng.integers(2, 40))
        targets.append(ps.Target(f"layer{i}", "Linear", (8, width), 8 * width))
    cells = []
    for target in targets:
        rising = np.cumsum(rng.exponential(rng.uniform(0.01, 1.0), len(levels))) + rng.normal(0.0, 0.05, len(levels))
        for level, drop in zip(levels, rising, strict=True):
            cells.append(ps.Cell(target.name, repr(level), level, 1.0 + drop, float(drop), None, None, 32, 0.1))
    return ps.Profile("loss", False, 1.0, "magnitude", "weight", [repr(lv) for lv in levels], targets, cells)


def _removed(profile: ps.Profile, plan: ps.Plan) -> float:
    return removed_fraction(profile, plan.budget)(plan.levels)


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_plan_equals_brute_force_over_its_levels(seed):
    """Over the same choices (the 0.25 grid, the scanned levels, the threshold plan's level), no plan
    meeting the budget predicts less than the knapsack's by more than its stated gap."""
    profile = _random_profile(seed)
    for fraction in (0.2, 0.45, 0.7):
        budget = ps.Budget(fraction)
        threshold = ps.allocate(profile, budget, method="threshold")
        plan = ps.allocate(profile, budget, method="knapsack", grid_step=0.25)
        choices = [sorted({0.0, 0.25, 0.5, 0.75, threshold.levels[t.name]}) for t in profile.targets]
        removed = removed_fraction(profile, budget)
        optimum = min(
            predicted_drop(profile, levels)
            for combo in itertools.product(*choices)
            if removed(levels := dict(zip(plan.levels, combo, strict=True))) >= fraction
        )
        gap, lower = plan.details["optimality_gap"], plan.details["lower_bound"]
        assert _removed(profile, plan) >= fraction - SHORT
        assert lower <= optimum + 1e-12 <= plan.predicted_drop + 2e-12
        assert plan.predicted_drop - optimum <= gap + 1e-12 and gap >= 0
        assert all(any(abs(plan.levels[t.name] - c) < 1e-12 for c in options) for t, options in zip(profile.targets, choices, strict=True))


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_never_predicts_more_than_threshold_on_random_profiles(seed):
    profile = _random_profile(seed, count=12, levels=(0.1, 0.3, 0.5, 0.7, 0.9))
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.85):
        threshold = ps.allocate(profile, fraction, method="threshold")
        plan = ps.allocate(profile, fraction, method="knapsack")
        assert plan.predicted_drop <= threshold.predicted_drop + 1e-12
        assert plan.details["lower_bound"] <= plan.predicted_drop + 1e-12
        assert plan.details["solution"] in ("knapsack", "threshold") and plan.details["grid_step"] == 0.01
        assert plan.sparsity >= fraction - SHORT


def test_knapsack_on_the_trained_digits_profile_beats_threshold_and_meets_the_budget(digits_profile):
    for fraction in (0.2, 0.5, 0.75, 0.9):
        threshold = ps.allocate(digits_profile, fraction, method="threshold")
        plan = ps.allocate(digits_profile, fraction, method="knapsack")
        assert plan.method == "knapsack" and set(plan.levels) == {t.name for t in digits_profile.targets}
        assert plan.predicted_drop <= threshold.predicted_drop + 1e-12
        assert fraction - SHORT <= plan.sparsity <= fraction + 0.01
        assert 0 <= plan.details["optimality_gap"] <= 0.05 * plan.predicted_drop + 1e-9  # the bound is not vacuous
        on_grid = [lv for lv in plan.levels.values() if abs(lv * 100 - round(lv * 100)) < 1e-6]
        assert len(on_grid) >= len(plan.levels) - 1  # off the 0.01 grid only at a scanned or threshold level


@pytest.fixture(scope="module")
def channel_profile(digits_model, digits_val):
    evaluator = ps.Evaluator(digits_model, digits_val, "loss")
    targets = ps.find_targets(digits_model, "channel", example=digits_val[0])
    return ps.scan(digits_model, evaluator, targets, levels=(0.25, 0.5, 0.75))


@pytest.mark.parametrize("budget", [ps.Budget(sparsity=0.4), ps.Budget(params=0.3), ps.Budget(params=0.5),
                                    ps.Budget(flops=0.4), ps.Budget(flops=0.6)])
def test_channel_plan_meets_every_kind_of_budget(channel_profile, budget):
    """Coupled channel groups: a conv between two groups keeps the product of their kept fractions,
    so the plan's true removal (not the sum of the targets' own) must reach the budget."""
    plan = ps.allocate(channel_profile, budget, method="knapsack")
    threshold = ps.allocate(channel_profile, budget, method="threshold")
    assert _removed(channel_profile, plan) >= budget.fraction - SHORT
    if budget.kind != "sparsity":
        after, dense = (plan.details["params_after"], plan.details["params_dense"]) if budget.kind == "params" else \
            (plan.details["flops_after"], plan.details["flops_dense"])
        assert 1 - after / dense >= budget.fraction - SHORT
    assert plan.details["removal"] == ("additive" if budget.kind == "sparsity" else "coupled")
    assert plan.predicted_drop <= threshold.predicted_drop + 1e-12


def test_weight_plan_params_and_flops_budgets_are_additive_and_met(digits_profile):
    for budget in (ps.Budget(params=0.5), ps.Budget(flops=0.6)):
        plan = ps.allocate(digits_profile, budget, method="knapsack")
        assert plan.details["removal"] == "additive"
        assert _removed(digits_profile, plan) >= budget.fraction - SHORT
        assert plan.predicted_drop <= ps.allocate(digits_profile, budget, method="threshold").predicted_drop + 1e-12


def test_channel_plan_shrinks_to_the_budget(digits_model, digits_val, channel_profile):
    plan = ps.allocate(channel_profile, ps.Budget(flops=0.5), method="knapsack")
    example = digits_val[0][0]
    shrunk = ps.apply(digits_model, plan, shrink=True, example=example)
    removed = 1 - CostModel.of(shrunk, example).total_flops / CostModel.of(digits_model, example).total_flops
    assert removed == pytest.approx(0.5, abs=0.03)  # channels come in whole units


# ---- whole blocks ----------------------------------------------------------------------------


def _block_profile(sizes, drops, rest: int) -> ps.Profile:
    """Blocks of ``sizes`` parameters whose removal costs ``drops``, in a model with ``rest`` more parameters."""
    targets, cells = [], []
    for i, (size, drop) in enumerate(zip(sizes, drops, strict=True)):
        group = UnitGroup(f"b{i}", "block", 1, size, (Slice(f"b{i}.weight", 0, 0, size),), min_units=0)
        targets.append(ps.Target(f"b{i}", "block", (1,), size, granularity="block", group=group))
        cells.append(ps.Cell(f"b{i}", "1", 1.0, 1.0 + drop, drop, None, None, 32, 0.1))
    shapes = {f"b{i}.weight": (size,) for i, size in enumerate(sizes)} | {"head.weight": (rest,)}
    return ps.Profile("loss", False, 1.0, "magnitude", "block", ["1"], targets, cells, costs=CostModel(shapes, {}).to_dict())


def test_blocks_are_chosen_exactly_where_least_harmful_first_is_not_optimal():
    profile = _block_profile([10, 10, 19], [1.0, 1.0, 1.5], rest=61)
    greedy = ps.allocate(profile, ps.Budget(params=0.19), method="threshold")
    plan = ps.allocate(profile, ps.Budget(params=0.19), method="knapsack")
    assert greedy.predicted_drop == pytest.approx(2.0)  # b0 and b1, the two least harmful
    assert plan.levels == {"b0": 0.0, "b1": 0.0, "b2": 1.0} and plan.predicted_drop == pytest.approx(1.5)
    assert plan.details["removed_blocks"] == ["b2"] and plan.details["grid_step"] is None


@pytest.mark.parametrize("seed", range(4))
def test_block_plan_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes, drops = rng.integers(5, 60, 7).tolist(), rng.exponential(1.0, 7).tolist()
    profile = _block_profile(sizes, drops, rest=100)
    total = sum(sizes) + 100
    for fraction in (0.1, 0.3, 0.6):
        optimum = min(predicted_drop(profile, {f"b{i}": float(keep) for i, keep in enumerate(mask)})
                      for mask in itertools.product((0, 1), repeat=7)
                      if sum(s for s, keep in zip(sizes, mask, strict=True) if keep) >= fraction * total)
        plan = ps.allocate(profile, ps.Budget(params=fraction), method="knapsack")
        assert plan.predicted_drop == pytest.approx(optimum, abs=max(1e-9, plan.details["optimality_gap"]))
        assert plan.predicted_drop <= ps.allocate(profile, ps.Budget(params=fraction), method="threshold").predicted_drop + 1e-12
        assert 1 - plan.details["params_after"] / total >= fraction - SHORT


# ---- files and refusals ----------------------------------------------------------------------


def test_knapsack_plan_round_trips_through_a_file(tmp_path, digits_profile, channel_profile):
    for profile, budget in ((digits_profile, ps.Budget(0.7)), (channel_profile, ps.Budget(flops=0.4))):
        plan = ps.allocate(profile, budget, method="knapsack", grid_step=0.05)
        loaded = ps.Plan.load(plan.save(tmp_path / "plan.json"))
        assert loaded == plan
        assert {"optimality_gap", "lower_bound", "cost_unit", "grid_step", "solution", "removal"} <= set(loaded.details)
        assert loaded.details["grid_step"] == 0.05


def test_bad_grid_step_is_refused_in_one_line(digits_profile):
    for bad in (0, -0.01, 0.51, 1, True, "0.01", float("nan")):
        with pytest.raises(ps.PrunescopeError, match=r"grid_step .* must be a fraction in \(0, 0.5\]") as info:
            ps.allocate(digits_profile, 0.5, method="knapsack", grid_step=bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ps.PrunescopeError, match="grid_step is a setting of method 'knapsack'"):
        ps.allocate(digits_profile, 0.5, method="threshold", grid_step=0.05)
    assert ps.allocate(digits_profile, 0.5, method="knapsack", grid_step=0.5).details["grid_step"] == 0.5


def test_unreachable_budget_is_refused_as_threshold_refuses_it(digits_profile):
    low_levels = dataclasses.replace(
        digits_profile,
        cells=[c for c in digits_profile.cells if c.sparsity <= 0.5],
        levels=[lv for lv in digits_profile.levels if float(lv) <= 0.5],
    )
    messages = []
    for method in ("threshold", "knapsack"):
        with pytest.raises(ps.PrunescopeError, match="budget unreachable") as info:
            ps.allocate(low_levels, 0.8, method=method)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "\n" not in messages[1]
