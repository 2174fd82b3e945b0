"""The plan check: apply the plan as it will be applied, measure the joint drop, compare with the prediction."""

from __future__ import annotations

import pytest
from helpers import assert_unchanged, snapshot, tiny_llama, token_batches

import prunescope as ps
from prunescope.plan_check import check_plan, check_pruned


@pytest.fixture(scope="module")
def llama_profile():
    model = tiny_llama()
    calibration, data = token_batches(4, 4, 16), token_batches(4, 2, 16, seed=1)
    evaluator = ps.Evaluator(model, data, "kl")
    profile = ps.scan(model, evaluator, ps.find_targets(model), levels=(0.3, 0.5, 0.7), criterion="sparsegpt",
                      calibration=calibration)
    return model, calibration, evaluator, profile


def test_the_check_measures_what_applying_the_plan_gives(llama_profile):
    model, calibration, evaluator, profile = llama_profile
    plan = ps.allocate(profile, 0.5)
    before = snapshot(model)
    check = check_plan(model, plan, evaluator, calibration=calibration)
    assert_unchanged(model, before)
    pruned = ps.apply(model, plan, calibration=calibration)
    assert check.pruned == pytest.approx(evaluator.evaluate(pruned).value, rel=1e-12)
    assert check.measured == pytest.approx(check.pruned - check.dense, rel=1e-9)
    assert check.ci_low <= check.measured <= check.ci_high
    assert check.predicted == plan.predicted_drop
    assert check.ratio == pytest.approx(plan.predicted_drop / check.measured)
    assert "predicted/measured" in check.line() and check.samples == 8


def test_accuracy_drops_are_positive_when_worse(digits_model, digits_val, digits_profile):
    evaluator = ps.Evaluator(digits_model, digits_val, "accuracy")
    plan = ps.allocate(digits_profile, 0.9)
    check = check_plan(digits_model, plan, evaluator)
    assert check.pruned < check.dense and check.measured == pytest.approx(check.dense - check.pruned)
    assert check.ci_low <= check.measured <= check.ci_high


def test_no_ratio_without_a_comparable_prediction(llama_profile):
    model, calibration, _, profile = llama_profile
    plan = ps.allocate(profile, 0.5, method="uniform")
    other = ps.Evaluator(model, token_batches(2, 2, 16, seed=5), "perplexity")
    pruned = ps.apply(model, plan, calibration=calibration)
    check = check_pruned(pruned, plan, other)
    assert check.predicted is None and check.ratio is None and "no prediction" in check.line()


def test_bad_input_is_refused_before_pruning(llama_profile):
    model, calibration, evaluator, profile = llama_profile
    plan = ps.allocate(profile, 0.5)
    with pytest.raises(ps.PrunescopeError, match="calibrates on data: pass calibration="):
        check_plan(model, plan, evaluator)
    with pytest.raises(ps.PrunescopeError, match="confidence must be a fraction"):
        check_plan(model, plan, evaluator, calibration=calibration, confidence=1.5)
    with pytest.raises(ps.PrunescopeError, match="the model is not the evaluator's"):
        check_plan(model, plan, ps.Evaluator(tiny_llama(), token_batches(1), "kl"), calibration=calibration)
