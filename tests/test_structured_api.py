"""Structured granularities through the public API: find_targets -> scan -> allocate -> apply(mask|shrink)."""

import json

import pytest
import torch
from helpers import assert_unchanged, snapshot, tiny_llama, token_batches

import prunescope as ps
from prunescope.structure import save_shrunk, save_shrunk_channels


def _logits(model, batch):
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return getattr(out, "logits", out)


@pytest.fixture
def llama():
    model = tiny_llama()
    return model, ps.Evaluator(model, token_batches(), "perplexity")


@pytest.mark.parametrize("granularity", ["head", "neuron", "block"])
def test_transformer_scan_plan_mask_equals_shrink(llama, granularity):
    model, evaluator = llama
    targets = ps.find_targets(model, granularity)
    assert {t.granularity for t in targets} == {granularity} and all(t.group is not None for t in targets)
    before = snapshot(model)
    levels = (0.5,) if granularity == "head" else (0.25, 0.5)  # a KV group of 2 heads loses none at 0.25: refused
    profile = ps.scan(model, evaluator, targets, levels=levels)
    assert_unchanged(model, before)
    assert ps.Profile.from_json(profile.to_json()) == profile and ps.Profile.from_csv(profile.to_csv()) == profile
    plan = ps.Plan.from_json(ps.allocate(profile, ps.Budget(0.4)).to_json())
    masked, shrunk = ps.apply(model, plan, shrink=False), ps.apply(model, plan, shrink=True)
    assert_unchanged(model, before)
    batch = evaluator.batches[0]
    dense, a, b = _logits(model, batch), _logits(masked, batch), _logits(shrunk, batch)
    assert (a - b).abs().max() <= 1e-4 * dense.abs().max()
    assert (a - dense).abs().max() > 1e-3
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    if granularity == "block":
        assert sorted(set(plan.levels.values())) == [0.0, 1.0]
        assert [c.level for c in profile.cells] == ["1"] * len(targets)


def test_scanned_cell_is_what_apply_gives(llama):
    """A one-group plan at a scanned level evaluates to that cell's value, masked or shrunk."""
    model, evaluator = llama
    targets = ps.find_targets(model, "neuron")
    profile = ps.scan(model, evaluator, targets, levels=(0.5,))
    cell = profile.cell(targets[1].name, "0.5")
    plan = ps.Plan({targets[1].name: 0.5}, {targets[1].name: targets[1].params}, "magnitude", "neuron",
                   details=ps.allocate(profile, 0.2).details)
    for mode in ("mask", "shrink"):
        assert evaluator.evaluate(ps.apply(model, plan, shrink=mode == "shrink")).value == pytest.approx(cell.value, rel=1e-5)


def test_query_head_mode_round_trips_through_the_plan():
    model = tiny_llama()
    evaluator = ps.Evaluator(model, token_batches(), "kl")
    targets = ps.find_targets(model, "head", head_mode="query")
    assert all(t.kind == "head/query" and t.group.units == 2 for t in targets)  # 4 query heads over 2 KV groups
    plan = ps.allocate(ps.scan(model, evaluator, targets, levels=(0.5,)), 0.5, method="uniform")
    assert plan.head_mode == "query" and "head_mode" not in plan.details
    shrunk = ps.apply(model, plan, shrink=True)
    batch = evaluator.batches[0]
    assert torch.allclose(_logits(ps.apply(model, plan, shrink=False), batch), _logits(shrunk, batch), atol=1e-5)
    assert shrunk.model.layers[0].self_attn.k_proj.out_features == model.model.layers[0].self_attn.k_proj.out_features


def test_channel_scan_and_shrink_on_the_digits_cnn(digits_model, digits_val, tmp_path):
    evaluator = ps.Evaluator(digits_model, digits_val, "accuracy")
    example = digits_val[0][0]
    targets = ps.find_targets(digits_model, "channel", example=digits_val[0])
    assert "classifier.3" not in {t.name for t in targets}  # the output layer's channels are never pruned
    before = snapshot(digits_model)
    profile = ps.scan(digits_model, evaluator, targets, levels=(0.25, 0.5, 0.75), criterion="l1", round_to=4)
    assert_unchanged(digits_model, before)
    plan = ps.allocate(profile, 0.5)
    masked, shrunk = ps.apply(digits_model, plan, shrink=False, example=example), ps.apply(digits_model, plan, shrink=True, example=example)
    assert_unchanged(digits_model, before)
    assert torch.allclose(_logits(masked, example), _logits(shrunk, example), atol=1e-4)
    assert evaluator.evaluate(shrunk).value == pytest.approx(evaluator.evaluate(masked).value)
    for module in shrunk.modules():  # round_to=4: every kept channel count is a multiple of 4
        if isinstance(module, torch.nn.Conv2d) and module.in_channels > 1:
            assert module.out_channels % 4 == 0
    save_shrunk_channels(shrunk, tmp_path, "prunescope:digits_cnn")
    assert torch.equal(_logits(ps.load(tmp_path).eval(), example), _logits(shrunk, example))


def test_shrunk_transformer_saves_and_loads_without_pickle(llama, tmp_path):
    model, evaluator = llama
    profile = ps.scan(model, evaluator, ps.find_targets(model, "neuron"), levels=(0.5,))
    shrunk = ps.apply(model, ps.allocate(profile, 0.5, method="uniform"), shrink=True)
    save_shrunk(shrunk, tmp_path, model)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    batch = evaluator.batches[0]
    assert torch.equal(_logits(ps.load(tmp_path), batch), _logits(shrunk, batch))


def test_structured_bad_input(llama, small_cnn, tmp_path):
    model, evaluator = llama
    heads = ps.find_targets(model, "head")
    with pytest.raises(ps.PrunescopeError, match="N:M levels apply to weights only"):
        ps.scan(model, evaluator, heads, levels=("2:4",))
    with pytest.raises(ps.PrunescopeError, match="mix granularities"):
        ps.scan(model, evaluator, heads + ps.find_targets(model, "neuron"), levels=(0.5,))
    store = tmp_path / "store.jsonl"
    with pytest.raises(ps.PrunescopeError, match="at least 1 must remain"):
        ps.scan(model, evaluator, heads, levels=(0.99,), store=store)
    assert not store.exists()
    with pytest.raises(ps.PrunescopeError, match="bn_scale"):
        ps.scan(model, evaluator, heads, levels=(0.5,), criterion="bn_scale")
    with pytest.raises(ps.PrunescopeError, match="needs example|give example"):
        ps.find_targets(small_cnn[0], "channel")
    with pytest.raises(ps.PrunescopeError, match="granularity 'banana'"):
        ps.find_targets(model, "banana")
    profile = ps.scan(model, evaluator, ps.find_targets(model, "block"))
    with pytest.raises(ps.PrunescopeError, match="use method 'threshold'"):
        ps.allocate(profile, 0.5, method="uniform")
    weight_plan = ps.allocate(ps.scan(model, evaluator, ps.find_targets(model, include="*.mlp.*"), levels=(0.5,)), 0.5, method="uniform")
    with pytest.raises(ps.PrunescopeError, match="a weight plan applies as masks"):
        ps.apply(model, weight_plan, shrink=True)
    assert json.loads(weight_plan.to_json())["granularity"] == "weight"


def test_store_refuses_to_mix_head_modes(tmp_path):
    model = tiny_llama()
    evaluator = ps.Evaluator(model, token_batches(), "kl")
    store = tmp_path / "heads.jsonl"
    ps.scan(model, evaluator, ps.find_targets(model, "head"), levels=(0.5,), store=store)
    with pytest.raises(ps.PrunescopeError, match="different head_mode"):
        ps.scan(model, evaluator, ps.find_targets(model, "head", head_mode="query"), levels=(0.5,), store=store)
