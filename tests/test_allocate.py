"""Allocation: every method meets its budget, and the sensitivity-guided plan beats uniform."""

from __future__ import annotations

import dataclasses
from itertools import pairwise

import pytest

import prunescope as ps

BUDGETS = (0.2, 0.5, 0.75, 0.9)


def _realised_sparsity(model, plan: ps.Plan) -> float:
    """Fraction of the planned targets' weights actually removed once the plan is applied."""
    masks = ps.masks_of(ps.apply(model, plan))
    removed = sum(int((~masks[name]).sum()) for name in masks)
    return removed / sum(plan.params.values())


@pytest.mark.parametrize("method", ["threshold", "uniform", "global_magnitude"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_plans_meet_the_budget(digits_model, digits_profile, method, budget):
    plan = ps.allocate(digits_profile, budget, method=method, model=digits_model)
    assert plan.method == method and plan.budget == ps.Budget(budget)
    assert set(plan.levels) == {t.name for t in digits_profile.targets}
    assert abs(plan.sparsity - budget) <= 0.005
    assert abs(_realised_sparsity(digits_model, plan) - budget) <= 0.005


def test_threshold_plan_is_not_uniform_and_is_monotone_in_budget(digits_profile):
    plans = [ps.allocate(digits_profile, b, method="threshold") for b in BUDGETS]
    for low, high in pairwise(plans):
        for name in low.levels:  # one shared threshold: more budget never prunes a target less
            assert high.levels[name] >= low.levels[name] - 1e-9
    levels = list(plans[2].levels.values())
    assert max(levels) - min(levels) > 0.1  # sensitivity actually shaped the plan
    assert all(p.predicted_drop is not None and p.predicted_drop >= 0 for p in plans)
    assert plans[0].predicted_drop <= plans[-1].predicted_drop


def test_threshold_prunes_the_least_sensitive_target_most(digits_profile):
    plan = ps.allocate(digits_profile, 0.5, method="threshold")
    # the sensitivity at 50% of each target; the least sensitive must get at least the most sensitive's level
    at_half = {c.target: digits_profile.drop(c) for c in digits_profile.cells if c.level == "0.5"}
    least, most = min(at_half, key=at_half.get), max(at_half, key=at_half.get)
    assert plan.levels[least] >= plan.levels[most]


def test_threshold_plan_beats_uniform_on_trained_digits(digits_model, digits_profile, digits_test):
    """The sensitivity-guided plan keeps more accuracy than pruning every layer by 80%."""
    evaluator = ps.Evaluator(digits_model, digits_test, "accuracy")
    dense = evaluator.dense.value
    accuracy = {}
    for method in ("uniform", "threshold"):
        plan = ps.allocate(digits_profile, 0.8, method=method)
        accuracy[method] = evaluator.evaluate(ps.apply(digits_model, plan)).value
    assert dense > 0.95
    assert accuracy["threshold"] >= accuracy["uniform"]
    assert accuracy["threshold"] > dense - 0.05


def test_unreachable_budget_is_refused(digits_profile):
    low_levels = dataclasses.replace(
        digits_profile,
        cells=[c for c in digits_profile.cells if c.sparsity <= 0.5],
        levels=[lv for lv in digits_profile.levels if float(lv) <= 0.5],
    )
    with pytest.raises(ps.PrunescopeError, match="budget unreachable") as info:
        ps.allocate(low_levels, 0.8, method="threshold")
    assert "0.5" in str(info.value)
    # a budget inside the scanned range still works
    assert abs(ps.allocate(low_levels, 0.45, method="threshold").sparsity - 0.45) <= 0.005


def test_allocate_rejects_bad_arguments(digits_profile):
    with pytest.raises(ps.PrunescopeError, match="unknown allocation method"):
        ps.allocate(digits_profile, 0.5, method="magic")
    with pytest.raises(ps.PrunescopeError, match="needs the model"):
        ps.allocate(digits_profile, 0.5, method="global_magnitude")
    for budget in (0, 1, 1.5, -0.2):
        with pytest.raises(ps.PrunescopeError, match="budget sparsity"):
            ps.allocate(digits_profile, budget, method="uniform")


def test_allocate_refuses_what_is_not_a_profile():
    with pytest.raises(ps.PrunescopeError, match="profile must be a prunescope.Profile"):
        ps.allocate(None, 0.5)
