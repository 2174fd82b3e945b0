"""scan leaves the model exactly as it was, and an interrupted scan resumes to the same profile."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torchvision
from helpers import assert_unchanged, mixed_mode, snapshot, tiny_llama, token_batches

import prunescope as ps

# ---- the model is never left changed ----------------------------------------------------------


def _check_scan_and_evaluate_leave_model_alone(model, batches, metric, levels, include=None):
    before = snapshot(model)
    evaluator = ps.Evaluator(model, batches, metric)
    targets = None if include is None else ps.find_targets(model, include=include, example=batches[0])
    profile = ps.scan(model, evaluator, targets, levels=levels)
    assert_unchanged(model, before)
    assert profile.cells and all(torch.isfinite(torch.tensor(c.value)) for c in profile.cells)
    # a pruned cell actually changed the metric: the scan pruned the live weights, not a copy
    assert any(c.change != 0 for c in profile.cells)

    evaluator.evaluate(model)
    ps.evaluate(model, evaluator)
    assert_unchanged(model, before)
    return profile


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_scan_leaves_trained_digits_cnn_unchanged(digits_model, digits_val, mode):
    model = copy.deepcopy(digits_model)
    if mode == "train":
        model.train()
        model.features[0].bias.requires_grad_(False)
    elif mode == "mixed":
        mixed_mode(model)
    else:
        model.eval()
    # BatchNorm buffers must hold real statistics, so a forward in train mode would change them
    assert int(model.features[1].num_batches_tracked) > 0
    _check_scan_and_evaluate_leave_model_alone(model, digits_val[:1], "accuracy", [0.5, 0.9])


@pytest.mark.parametrize("metric", ["loss", "kl"])
def test_scan_leaves_untrained_digits_cnn_unchanged(small_cnn, metric):
    model, batches = small_cnn
    mixed_mode(model)
    _check_scan_and_evaluate_leave_model_alone(model, batches, metric, [0.3, 0.8])


def _calibrated(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """Give a randomly initialised vision model real BatchNorm statistics and O(1) logits."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, 0.0, module.in_features**-0.5)
    return model


@pytest.mark.parametrize("train", [True, False])
def test_scan_leaves_resnet18_unchanged(train):
    torch.manual_seed(0)
    model = _calibrated(torchvision.models.resnet18(weights=None, num_classes=10), 32)
    model.train(train)
    model.conv1.weight.requires_grad_(False)
    model.layer1[0].bn1.bias.requires_grad_(False)
    batches = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    _check_scan_and_evaluate_leave_model_alone(model, batches, "kl", [0.5, 0.9], include=["conv1", "layer1.*", "layer4.1.*"])


@pytest.mark.parametrize("train", [True, False])
def test_scan_leaves_mobilenet_v3_small_unchanged(train):
    torch.manual_seed(0)
    model = _calibrated(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), 64)
    model.train(train)
    for parameter in model.features[1].parameters():
        parameter.requires_grad_(False)
    batches = [torch.randn(2, 3, 64, 64)]
    # features.1 holds a depthwise conv and the squeeze-excite 1x1 convs; classifier.0 a Linear
    _check_scan_and_evaluate_leave_model_alone(model, batches, "kl", [0.5], include=["features.1.*", "features.2.*", "classifier.0"])


@pytest.mark.parametrize("metric", ["perplexity", "kl"])
@pytest.mark.parametrize("train", [True, False])
def test_scan_leaves_tiny_llama_unchanged(metric, train):
    model = tiny_llama()
    model.train(train)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    profile = _check_scan_and_evaluate_leave_model_alone(model, token_batches(), metric, [0.5, "2:4"])
    names = {t.name for t in profile.targets}
    assert "lm_head" not in names  # the output layer is left out by default
    assert "model.layers.1.mlp.down_proj" in names


# ---- interruption and resume --------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a kill or Ctrl-C in the middle of a scan."""


class CountingEvaluator(ps.Evaluator):
    """Counts evaluation passes (the dense pass included) and optionally fails on pass ``fail_on``."""

    def __init__(self, *args, fail_on: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.fail_on = fail_on

    def evaluate(self, model=None, *args, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise Interrupted(f"interrupted on evaluation {self.calls}")
        return super().evaluate(model, *args, **kwargs)


RESUME_LEVELS = [0.3, 0.6, 0.9, "2:4"]


def _comparable(cell: ps.Cell) -> ps.Cell:
    return dataclasses.replace(cell, seconds=0.0)


def _assert_same_cells(resumed: ps.Profile, full: ps.Profile) -> None:
    assert [(c.target, c.level) for c in resumed.cells] == [(c.target, c.level) for c in full.cells]
    for got, want in zip(resumed.cells, full.cells, strict=True):
        assert _comparable(got) == _comparable(want), f"cell {want.target} @ {want.level} differs after resume"
    assert resumed.dense_value == full.dense_value
    assert resumed.levels == full.levels and resumed.targets == full.targets


@pytest.fixture
def resume_setup(digits_model, digits_val):
    model = copy.deepcopy(digits_model)
    batches = digits_val[:2]
    targets = ps.find_targets(model, include=["features.3", "features.7", "classifier.1"])
    full = ps.scan(model, ps.Evaluator(model, batches, "loss"), targets, levels=RESUME_LEVELS)
    return model, batches, targets, full


@pytest.mark.parametrize("done", [0, 1, 5, 11])
def test_interrupted_scan_resumes_to_the_same_profile(resume_setup, tmp_path, done):
    model, batches, targets, full = resume_setup
    total = len(targets) * len(RESUME_LEVELS)
    store = tmp_path / "scan.jsonl"
    before = snapshot(model)

    # evaluation 1 is the dense model; evaluation 2 + done is the (done+1)-th cell, which fails
    interrupted = CountingEvaluator(model, batches, "loss", fail_on=2 + done)
    with pytest.raises(Interrupted):
        ps.scan(model, interrupted, targets, levels=RESUME_LEVELS, store=store)
    assert_unchanged(model, before)  # the weights of the cell being measured were restored
    lines = store.read_text().splitlines()
    assert len(lines) == 1 + done, "the store must hold the header and exactly the finished cells"

    resumed_evaluator = CountingEvaluator(model, batches, "loss")
    resumed = ps.scan(model, resumed_evaluator, targets, levels=RESUME_LEVELS, store=store)
    assert resumed_evaluator.calls == 1 + total - done, "finished cells were evaluated again"
    _assert_same_cells(resumed, full)
    assert_unchanged(model, before)

    # a third run finds every cell in the store and evaluates only the dense model
    again = CountingEvaluator(model, batches, "loss")
    _assert_same_cells(ps.scan(model, again, targets, levels=RESUME_LEVELS, store=store), full)
    assert again.calls == 1


@pytest.mark.parametrize("torn", [True, False])
def test_truncated_store_with_torn_last_line_resumes(resume_setup, tmp_path, torn):
    model, batches, targets, full = resume_setup
    total = len(targets) * len(RESUME_LEVELS)
    store = tmp_path / "scan.jsonl"
    ps.scan(model, ps.Evaluator(model, batches, "loss"), targets, levels=RESUME_LEVELS, store=store)
    lines = store.read_text().splitlines()
    assert len(lines) == 1 + total
    kept = 4
    text = "\n".join(lines[: 1 + kept]) + "\n"
    if torn:  # the process died half-way through writing cell kept+1
        text += lines[1 + kept][: len(lines[1 + kept]) // 2]
    store.write_text(text)

    evaluator = CountingEvaluator(model, batches, "loss")
    resumed = ps.scan(model, evaluator, targets, levels=RESUME_LEVELS, store=store)
    assert evaluator.calls == 1 + total - kept
    _assert_same_cells(resumed, full)
    # the store is whole again: every line parses and every cell is there once
    stored = [json.loads(line) for line in store.read_text().splitlines()]
    assert len(stored) == 1 + total
    assert {(c["target"], c["level"]) for c in stored[1:]} == {(c.target, c.level) for c in full.cells}


def test_store_cells_equal_profile_cells(resume_setup, tmp_path):
    model, batches, targets, full = resume_setup
    store = tmp_path / "scan.jsonl"
    profile = ps.scan(model, ps.Evaluator(model, batches, "loss"), targets, levels=RESUME_LEVELS, store=store)
    stored = [ps.Cell.from_dict(json.loads(line)) for line in store.read_text().splitlines()[1:]]
    assert stored == profile.cells


# ---- what a scan measures -----------------------------------------------------------------


def test_cells_are_reproducible_and_ci_brackets_change(digits_model, digits_val):
    evaluator = ps.Evaluator(digits_model, digits_val[:2], "loss")
    targets = ps.find_targets(digits_model, include=["features.*"])
    first = ps.scan(digits_model, evaluator, targets, levels=[0.5, 0.9], criterion="random", seed=3)
    second = ps.scan(digits_model, ps.Evaluator(digits_model, digits_val[:2], "loss"), targets,
                     levels=[0.5, 0.9], criterion="random", seed=3)
    assert [_comparable(c) for c in first.cells] == [_comparable(c) for c in second.cells]
    for cell in first.cells:
        assert cell.samples == 240
        assert cell.ci_low <= cell.change <= cell.ci_high
        assert cell.value == pytest.approx(first.dense_value + cell.change, rel=1e-12)
    # removing 90% of a layer at random hurts more than removing 50% of it
    for target in targets:
        assert first.cell(target.name, "0.9").change > first.cell(target.name, "0.5").change


def test_max_drop_skips_levels_past_the_limit(digits_model, digits_val):
    evaluator = ps.Evaluator(digits_model, digits_val[:1], "loss")
    targets = ps.find_targets(digits_model, include=["features.0"])
    full = ps.scan(digits_model, evaluator, targets, levels=[0.5, 0.8, 0.9, 0.95])
    first_over = next(c for c in full.cells if c.change > 1.0)
    limited = ps.scan(digits_model, evaluator, targets, levels=[0.5, 0.8, 0.9, 0.95], max_drop=1.0)
    assert 1 < len(limited.cells) < len(full.cells)  # measured past a small drop, stopped after a big one
    assert limited.cells[-1].level == first_over.level
    assert [_comparable(c) for c in limited.cells] == [_comparable(c) for c in full.cells[: len(limited.cells)]]
