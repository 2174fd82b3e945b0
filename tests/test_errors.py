"""Bad input: a PrunescopeError that names the problem, and nothing half-written on disk."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import prunescope as ps
from prunescope.digits import DigitsCNN


def assert_refused(call, match: str, tmp_path, store=None):
    """``call`` raises PrunescopeError matching ``match`` and leaves no file behind in tmp_path."""
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ps.PrunescopeError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused call wrote files"
    if store is not None:
        assert not store.exists()
    return str(info.value)


def test_prunescope_error_is_a_value_error():
    assert issubclass(ps.PrunescopeError, ValueError)


# ---- data ---------------------------------------------------------------------------------


def test_empty_data_list(small_cnn, tmp_path):
    model, _ = small_cnn
    store = tmp_path / "store.jsonl"
    assert_refused(lambda: ps.scan(model, ps.Evaluator(model, [], "loss"), store=store), "empty", tmp_path, store)
    assert_refused(lambda: ps.Evaluator(model, None), "batches is None", tmp_path)


def test_exhausted_generator(small_cnn, tmp_path):
    model, batches = small_cnn
    generator = (batch for batch in batches)
    list(generator)
    store = tmp_path / "store.jsonl"
    message = assert_refused(lambda: ps.scan(model, ps.Evaluator(model, generator, "loss"), store=store),
                             "exhausted", tmp_path, store)
    assert "at least one batch" in message


def test_generator_of_batches_is_accepted_once(small_cnn):
    model, batches = small_cnn
    evaluator = ps.Evaluator(model, (b for b in batches), "loss")
    assert evaluator.dense.samples == 12
    assert evaluator.evaluate().value == evaluator.evaluate().value  # kept as a list, re-usable


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_metric_on_the_dense_model(small_cnn, tmp_path, bad):
    model, batches = small_cnn

    def broken(output, batch):
        values = torch.ones(output.shape[0])
        values[0] = bad
        return values

    evaluator = ps.Evaluator(model, batches, broken, higher_is_better=True)
    store = tmp_path / "store.jsonl"
    message = assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5], store=store), "not finite", tmp_path, store)
    assert "broken" in message and "dense model" in message


def test_metric_needing_labels_without_labels(small_cnn, tmp_path):
    model, batches = small_cnn
    store = tmp_path / "store.jsonl"
    evaluator = ps.Evaluator(model, [x for x, _ in batches], "accuracy")
    assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5], store=store), "needs labels", tmp_path, store)


def test_unknown_metric_criterion_and_callable_without_direction(small_cnn, tmp_path):
    model, batches = small_cnn
    assert_refused(lambda: ps.Evaluator(model, batches, "f1"), "unknown metric 'f1'", tmp_path)
    assert_refused(lambda: ps.Evaluator(model, batches, lambda o, b: o[:, 0]), "higher_is_better", tmp_path)
    store = tmp_path / "store.jsonl"
    evaluator = ps.Evaluator(model, batches, "loss")
    assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5], criterion="taylor", store=store),
                   "unknown criterion 'taylor'", tmp_path, store)


# ---- levels -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1, 0.0, 1.0, "1.5", "0"])
def test_level_outside_the_open_interval(small_cnn, tmp_path, level):
    model, batches = small_cnn
    store = tmp_path / "store.jsonl"
    evaluator = ps.Evaluator(model, batches, "loss")
    assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5, level], store=store), r"outside \(0, 1\)", tmp_path, store)
    assert_refused(lambda: ps.parse_level(level), r"outside \(0, 1\)", tmp_path)
    assert_refused(lambda: ps.keep_mask(torch.ones(4, 4), level), r"outside \(0, 1\)", tmp_path)


@pytest.mark.parametrize("level", ["4:2", "0:4", "2:2", "2:x", "a:b", "half", None, True])
def test_malformed_levels(small_cnn, tmp_path, level):
    model, batches = small_cnn
    store = tmp_path / "store.jsonl"
    evaluator = ps.Evaluator(model, batches, "loss")
    message = assert_refused(lambda: ps.scan(model, evaluator, levels=[level], store=store), "level", tmp_path, store)
    assert repr(level) in message
    if isinstance(level, str) and re.fullmatch(r"\d+:\d+", level):
        assert "malformed" in message and "0 < N < M" in message
    else:
        assert "N:M" in message  # says what is accepted


def test_empty_levels(small_cnn, tmp_path):
    model, batches = small_cnn
    store = tmp_path / "store.jsonl"
    assert_refused(lambda: ps.scan(model, ps.Evaluator(model, batches, "loss"), levels=[], store=store),
                   "levels is empty", tmp_path, store)


def test_nm_on_a_layer_whose_input_dim_is_not_a_multiple_of_m(small_cnn, tmp_path):
    model, batches = small_cnn  # features.0 has one input channel
    store = tmp_path / "store.jsonl"
    evaluator = ps.Evaluator(model, batches, "loss")
    message = assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5, "2:4"], store=store),
                             "multiple of 4", tmp_path, store)
    assert "features.0" in message and "it is 1" in message
    plan = ps.Plan({"features.0": "2:4"}, {"features.0": 36})
    message = assert_refused(lambda: ps.apply(model, plan), "multiple of 4", tmp_path)
    assert "features.0" in message
    # the other layers are fine with 2:4
    targets = ps.find_targets(model, exclude=["features.0"])
    assert ps.scan(model, evaluator, targets, levels=["2:4"]).cells


# ---- targets ------------------------------------------------------------------------------


def test_patterns_that_match_no_target(small_cnn, tmp_path):
    model, _ = small_cnn
    message = assert_refused(lambda: ps.find_targets(model, include=["layer9.*"]), "matches no target", tmp_path)
    assert "'layer9.*'" in message and "features.0" in message  # shows what names look like
    message = assert_refused(lambda: ps.find_targets(model, exclude=["features.0", "encoder"]), "matches no target", tmp_path)
    assert "'encoder'" in message and "exclude" in message
    assert_refused(lambda: ps.find_targets(model, include=["features.0"], exclude=["features.*"]), "leave no target", tmp_path)
    assert_refused(lambda: ps.find_targets(nn.Sequential(nn.ReLU())), "no prunable layer", tmp_path)
    assert_refused(lambda: ps.find_targets(model, granularity="channel"), "granularity 'channel'", tmp_path)


def test_empty_target_list(small_cnn, tmp_path):
    model, batches = small_cnn
    store = tmp_path / "store.jsonl"
    assert_refused(lambda: ps.scan(model, ps.Evaluator(model, batches, "loss"), [], levels=[0.5], store=store),
                   "targets is empty", tmp_path, store)


# ---- budgets ------------------------------------------------------------------------------


def test_budget_no_plan_can_meet(small_cnn, tmp_path):
    model, batches = small_cnn
    profile = ps.scan(model, ps.Evaluator(model, batches, "loss"), levels=[0.2, 0.5])
    message = assert_refused(lambda: ps.allocate(profile, 0.8, method="threshold"), "budget unreachable", tmp_path)
    assert "80.0%" in message and "0.5" in message


def test_global_magnitude_that_would_remove_a_whole_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(1e-4)  # every weight of layer 0 is below any global threshold
    profile = ps.scan(model, ps.Evaluator(model, [torch.randn(4, 8)], "kl"), levels=[0.5])
    message = assert_refused(lambda: ps.allocate(profile, 0.5, method="global_magnitude", model=model),
                             "would remove every weight", tmp_path)
    assert "every weight of 0;" in message  # names the layer (Sequential index 0)


# ---- stores -------------------------------------------------------------------------------


@pytest.fixture
def written_store(small_cnn, tmp_path):
    model, batches = small_cnn
    store = tmp_path / "store.jsonl"
    ps.scan(model, ps.Evaluator(model, batches, "loss"), levels=[0.3, 0.6], store=store)
    return model, batches, store


def _changed_model(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.features[3].weight[0, 0, 0, 0] += 1e-3
    return other


def _changed_data(batches):
    other = [(x.clone(), y) for x, y in batches]
    other[1][0][0, 0, 0, 0] += 1e-3
    return other


@pytest.mark.parametrize(
    "change,what",
    [
        ("weights", "model"),
        ("data", "data"),
        ("metric", "metric"),
        ("criterion", "criterion"),
        ("levels", "levels"),
        ("seed", "seed"),
        ("confidence", "confidence"),
    ],
)
def test_store_written_for_something_else_is_refused(written_store, tmp_path, change, what):
    model, batches, store = written_store
    content = store.read_bytes()
    kwargs = {"levels": [0.3, 0.6], "store": store}
    metric = "loss"
    if change == "weights":
        model = _changed_model(model)
    elif change == "data":
        batches = _changed_data(batches)
    elif change == "metric":
        metric = "kl"
    elif change == "criterion":
        kwargs["criterion"] = "random"
    elif change == "levels":
        kwargs["levels"] = [0.3, 0.6, 0.9]
    elif change == "seed":
        kwargs["seed"] = 1
    elif change == "confidence":
        kwargs["confidence"] = 0.9
    evaluator = ps.Evaluator(model, batches, metric)
    with pytest.raises(ps.PrunescopeError, match=f"different .*{what}") as info:
        ps.scan(model, evaluator, **kwargs)
    message = str(info.value)
    assert str(store) in message and "delete" in message.lower() and "another store path" in message
    assert store.read_bytes() == content, "a refused store was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.jsonl"]


def test_file_that_is_not_a_store_is_refused(small_cnn, tmp_path):
    model, batches = small_cnn
    store = tmp_path / "notes.jsonl"
    store.write_text("my own notes\n")
    with pytest.raises(ps.PrunescopeError, match="not a prunescope store"):
        ps.scan(model, ps.Evaluator(model, batches, "loss"), levels=[0.5], store=store)
    assert store.read_text() == "my own notes\n"


# ---- a model that fails -------------------------------------------------------------------


class Broken(nn.Module):
    """A model whose forward raises a RuntimeError with a long, multi-line message."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        self.a(x)
        raise RuntimeError("shapes do not line up " + "x" * 2000 + "\nsecond line of the traceback text")


@pytest.mark.parametrize("explicit_targets", [False, True])
def test_model_whose_forward_fails(tmp_path, explicit_targets):
    model = Broken()
    batches = [torch.randn(3, 4)]
    store = tmp_path / "store.jsonl"
    evaluator = ps.Evaluator(model, batches, "kl")
    targets = ps.find_targets(model) if explicit_targets else None
    message = assert_refused(lambda: ps.scan(model, evaluator, targets, levels=[0.5], store=store),
                             "forward failed", tmp_path, store)
    assert "RuntimeError" in message and "shapes do not line up" in message
    assert "second line" not in message and len(message) < 600  # brief: first line, truncated


def test_forward_failure_from_evaluate_and_find_targets(tmp_path):
    model = Broken()
    evaluator = ps.Evaluator(model, [torch.randn(3, 4)], "kl")
    assert "RuntimeError" in assert_refused(evaluator.evaluate, "forward failed", tmp_path)
    assert "RuntimeError" in assert_refused(lambda: ps.find_targets(model, example=torch.randn(3, 4)),
                                            "forward failed", tmp_path)


def test_forward_failure_on_bad_input_shape(tmp_path):
    model = DigitsCNN(width=4)
    evaluator = ps.Evaluator(model, [(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))], "accuracy")
    message = assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5], store=tmp_path / "s.jsonl"),
                             "forward failed on", tmp_path, tmp_path / "s.jsonl")
    assert "RuntimeError" in message
