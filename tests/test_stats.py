"""Confidence intervals of paired changes, and metrics that agree with their reference definitions."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from helpers import tiny_llama, token_batches
from scipy import stats as scipy_stats

import prunescope as ps
from prunescope.stats import paired_change


def _paired(n: int, seed: int, shift: float = 0.3, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    dense = rng.normal(2.0, 1.0, n)
    pruned = dense + shift + rng.normal(0.0, noise, n)
    return dense, pruned


def test_ci_covers_the_change_and_matches_the_paired_t_interval():
    dense, pruned = _paired(50, seed=0)
    change = paired_change(dense, pruned, np.ones(50))
    assert change.ci_low < change.change < change.ci_high
    assert change.change == pytest.approx(float(np.mean(pruned - dense)), rel=1e-12)
    assert change.value == pytest.approx(float(np.mean(pruned)), rel=1e-12)
    reference = scipy_stats.ttest_1samp(pruned - dense, 0.0).confidence_interval(0.95)
    assert change.ci_low == pytest.approx(reference.low, rel=1e-10)
    assert change.ci_high == pytest.approx(reference.high, rel=1e-10)


def test_ci_narrows_with_more_samples():
    widths = []
    for n in (10, 100, 1000, 10000):
        change = paired_change(*_paired(n, seed=n), np.ones(n))
        assert change.ci_low <= change.change <= change.ci_high
        widths.append(change.ci_high - change.ci_low)
    assert all(a > b for a, b in pairwise(widths))
    assert widths[0] / widths[-1] == pytest.approx(math.sqrt(1000), rel=0.35)  # ~ 1 / sqrt(n)


def test_ci_widens_with_confidence():
    dense, pruned = _paired(40, seed=1)
    narrow = paired_change(dense, pruned, np.ones(40), confidence=0.8)
    wide = paired_change(dense, pruned, np.ones(40), confidence=0.99)
    assert wide.ci_low < narrow.ci_low < narrow.change < narrow.ci_high < wide.ci_high


def test_ci_has_its_nominal_coverage():
    """Over many repeated experiments, the 95% interval contains the true change about 95% of the time."""
    hits = 0
    trials = 2000
    for seed in range(trials):
        change = paired_change(*_paired(20, seed=seed, shift=0.3), np.ones(20))
        hits += change.ci_low <= 0.3 <= change.ci_high
    assert 0.93 <= hits / trials <= 0.97


def test_identical_models_give_a_zero_width_interval_and_one_sample_none():
    values = np.array([0.1, 0.5, 0.9])
    change = paired_change(values, values, np.ones(3))
    assert change.change == 0 and change.ci_low == 0 and change.ci_high == 0
    single = paired_change(np.array([1.0]), np.array([2.0]), np.ones(1))
    assert single.change == 1.0 and single.ci_low is None and single.ci_high is None and single.samples == 1


def test_weighted_change_is_the_weighted_mean_difference():
    dense, pruned = _paired(30, seed=2)
    weights = np.random.default_rng(3).integers(1, 20, 30).astype(float)
    change = paired_change(dense, pruned, weights)
    assert change.change == pytest.approx(float(np.average(pruned - dense, weights=weights)), rel=1e-12)
    assert change.ci_low < change.change < change.ci_high


def test_log_scale_change_maps_the_interval_through_exp():
    dense, pruned = _paired(60, seed=4, shift=0.05, noise=0.1)
    weights = np.full(60, 16.0)
    change = paired_change(dense, pruned, weights, log_scale=True)
    dense_ppl, pruned_ppl = math.exp(dense.mean()), math.exp(pruned.mean())
    assert change.value == pytest.approx(pruned_ppl, rel=1e-10)
    assert change.change == pytest.approx(pruned_ppl - dense_ppl, rel=1e-10)
    linear = paired_change(dense, pruned, weights)
    assert change.ci_low == pytest.approx(math.exp(dense.mean() + linear.ci_low) - dense_ppl, rel=1e-10)
    assert change.ci_high == pytest.approx(math.exp(dense.mean() + linear.ci_high) - dense_ppl, rel=1e-10)
    assert change.ci_low < change.change < change.ci_high


# ---- metrics against their reference definitions ----------------------------------------------


def _hf_loss(model, input_ids, labels=None, attention_mask=None) -> float:
    model.eval()
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids if labels is None else labels)
    return float(output.loss)


def test_perplexity_equals_exp_of_the_hf_loss():
    model = tiny_llama()
    batch = token_batches(count=1, batch=4, length=16)[0]
    evaluator = ps.Evaluator(model, [batch], "perplexity")
    expected = math.exp(_hf_loss(model, batch["input_ids"]))
    assert evaluator.dense.value == pytest.approx(expected, rel=1e-4)
    assert 10 < expected < 1000  # a random model over 128 tokens: perplexity near the vocabulary size


def test_perplexity_over_batches_of_different_lengths_is_token_weighted():
    model = tiny_llama()
    short = token_batches(count=1, batch=3, length=6, seed=1)[0]
    long = token_batches(count=1, batch=2, length=20, seed=2)[0]
    evaluator = ps.Evaluator(model, [short, long], "perplexity")
    tokens = [3 * 5, 2 * 19]  # predicted tokens per batch
    losses = [_hf_loss(model, short["input_ids"]), _hf_loss(model, long["input_ids"])]
    expected = math.exp(sum(t * loss for t, loss in zip(tokens, losses, strict=True)) / sum(tokens))
    assert evaluator.dense.value == pytest.approx(expected, rel=1e-4)


def test_perplexity_ignores_padding_like_hf_with_masked_labels():
    model = tiny_llama()
    input_ids = token_batches(count=1, batch=3, length=12, seed=3)[0]["input_ids"]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 8:] = 0  # right padding
    attention_mask[2, 5:] = 0
    evaluator = ps.Evaluator(model, [{"input_ids": input_ids, "attention_mask": attention_mask}], "perplexity")
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    expected = math.exp(_hf_loss(model, input_ids, labels=labels, attention_mask=attention_mask))
    assert evaluator.dense.value == pytest.approx(expected, rel=1e-4)


def test_kl_is_zero_for_the_dense_model_and_positive_when_pruned():
    model = tiny_llama()
    evaluator = ps.Evaluator(model, token_batches(), "kl")
    assert evaluator.dense.value == pytest.approx(0.0, abs=1e-6)
    target = ps.find_targets(model, include=["model.layers.0.mlp.down_proj"])
    profile = ps.scan(model, evaluator, target, levels=[0.5, 0.9])
    changes = [c.change for c in profile.cells]
    assert 0 < changes[0] < changes[1]


def test_accuracy_and_loss_match_direct_computation(digits_model, digits_val):
    x = torch.cat([b[0] for b in digits_val])
    y = torch.cat([b[1] for b in digits_val])
    with torch.no_grad():
        logits = digits_model.eval()(x)
    accuracy = ps.Evaluator(digits_model, digits_val, "accuracy").dense.value
    loss = ps.Evaluator(digits_model, digits_val, "loss").dense.value
    assert accuracy == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=1e-12)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_cosine_metric_is_zero_on_the_dense_model_and_grows_with_damage():
    model = tiny_llama().model  # the bare decoder: outputs hidden states, like an embedding model
    evaluator = ps.Evaluator(model, token_batches(), "cosine")
    assert evaluator.dense.value == pytest.approx(0.0, abs=1e-6)
    profile = ps.scan(model, evaluator, ps.find_targets(model, include="layers.1.mlp.*"), levels=(0.3, 0.9))
    for name in {c.target for c in profile.cells}:
        light, heavy = profile.cell(name, "0.3"), profile.cell(name, "0.9")
        assert 0 <= light.value <= heavy.value


def test_finite_population_interval_covers_the_whole_data_mean():
    """Samples drawn without replacement from N: the corrected interval contains the mean over all N
    about 95% of the time, is narrower than the uncorrected one, and is the mean itself once n = N."""
    rng = np.random.default_rng(0)
    dense, pruned = _paired(40, seed=3, shift=0.3)
    whole = float(np.mean(pruned - dense))
    hits, trials = 0, 2000
    for _ in range(trials):
        chosen = rng.choice(40, size=20, replace=False)
        corrected = paired_change(dense[chosen], pruned[chosen], np.ones(20), population=40)
        plain = paired_change(dense[chosen], pruned[chosen], np.ones(20))
        assert corrected.ci_high - corrected.ci_low < plain.ci_high - plain.ci_low
        hits += corrected.ci_low <= whole <= corrected.ci_high
    assert 0.93 <= hits / trials <= 0.97
    full = paired_change(dense, pruned, np.ones(40), population=40)
    assert full.ci_low == full.change == full.ci_high == pytest.approx(whole, rel=1e-12)
