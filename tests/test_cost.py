"""Budgets in parameters and FLOPs: the cost model predicts what the shrunk model really has."""

import pytest
from helpers import tiny_llama, token_batches

import prunescope as ps
from prunescope.cost import CostModel
from prunescope.structured import parameter_count


@pytest.fixture(scope="module")
def channel_profile(digits_model, digits_val):
    evaluator = ps.Evaluator(digits_model, digits_val, "accuracy")
    targets = ps.find_targets(digits_model, "channel", example=digits_val[0])
    return evaluator, ps.scan(digits_model, evaluator, targets, levels=(0.25, 0.5, 0.75))


@pytest.mark.parametrize("budget", [ps.Budget(params=0.5), ps.Budget(flops=0.5), ps.Budget(params=0.3), ps.Budget(flops=0.6)])
def test_channel_plan_meets_a_params_or_flops_budget_on_the_shrunk_model(digits_model, digits_val, channel_profile, budget):
    evaluator, profile = channel_profile
    plan = ps.allocate(profile, budget)
    example = digits_val[0][0]
    shrunk = ps.apply(digits_model, plan, shrink=True, example=example)
    measured = CostModel.of(shrunk, example)
    dense = CostModel.of(digits_model, example)
    removed = 1 - (parameter_count(shrunk) / dense.params if budget.kind == "params" else measured.total_flops / dense.total_flops)
    assert removed == pytest.approx(budget.fraction, abs=0.02)  # channels come in whole units
    assert plan.details["params_after"] == pytest.approx(parameter_count(shrunk), rel=0.02)
    assert plan.details["flops_after"] == pytest.approx(measured.total_flops, rel=0.02)


def test_coupled_groups_are_counted_once(channel_profile):
    """A 'sparsity' of channel-group parameters double-counts shared convs; a params budget does not."""
    _, profile = channel_profile
    by_sparsity = ps.allocate(profile, ps.Budget(sparsity=0.5), method="uniform")
    by_params = ps.allocate(profile, ps.Budget(params=0.5), method="uniform")
    assert by_sparsity.details["params_after"] < 0.4 * by_sparsity.details["params_dense"]
    assert by_params.details["params_after"] == pytest.approx(0.5 * by_params.details["params_dense"], rel=1e-6)
    assert next(iter(by_params.levels.values())) < next(iter(by_sparsity.levels.values()))


def test_weight_plan_params_budget_counts_the_whole_model(digits_model, digits_val):
    evaluator = ps.Evaluator(digits_model, digits_val, "accuracy")
    profile = ps.scan(digits_model, evaluator, levels=(0.3, 0.6, 0.9))
    plan = ps.allocate(profile, ps.Budget(params=0.5))
    pruned = ps.make_permanent(ps.apply(digits_model, plan))
    zeros = sum(int((p == 0).sum()) for p in pruned.parameters())
    assert zeros / parameter_count(digits_model) == pytest.approx(0.5, abs=0.005)


@pytest.mark.parametrize("granularity", ["neuron", "block"])
def test_transformer_flops_budget(granularity):
    model = tiny_llama()
    evaluator = ps.Evaluator(model, token_batches(), "perplexity")
    profile = ps.scan(model, evaluator, ps.find_targets(model, granularity), levels=(0.25, 0.5, 0.75))
    plan = ps.allocate(profile, ps.Budget(flops=0.3))
    shrunk = ps.apply(model, plan, shrink=True)
    measured = CostModel.of(shrunk, evaluator.batches[0]).total_flops
    assert plan.details["flops_after"] == pytest.approx(measured, rel=0.01)
    assert 1 - measured / plan.details["flops_dense"] >= 0.3 - 0.02


def test_budget_validation():
    for bad in ({}, {"sparsity": 0.5, "flops": 0.5}, {"params": 1.0}, {"flops": -0.1}, {"params": True}):
        with pytest.raises(ps.PrunescopeError, match="budget"):
            ps.Budget(**bad)
    assert ps.Plan.from_json(ps.Plan({"a": 0.5}, {"a": 10}, budget=ps.Budget(flops=0.4)).to_json()).budget == ps.Budget(flops=0.4)


def test_unreachable_flops_budget_names_the_quantity(channel_profile):
    _, profile = channel_profile
    with pytest.raises(ps.PrunescopeError, match="unreachable.*FLOPs"):
        ps.allocate(profile, ps.Budget(flops=0.99))


def test_costs_survive_the_profile_round_trip(channel_profile):
    _, profile = channel_profile
    assert profile.costs and ps.Profile.from_csv(profile.to_csv()).costs == profile.costs
    assert ps.Profile.from_json(profile.to_json()) == profile
    assert profile.costs["flops"]["features.3.weight"] == 2 * 64 * 32 * 9 * 8 * 8  # 2 x MACs per 8x8 image
