"""Heads, neurons and blocks of Hugging Face transformers: masks emulate removal exactly, shrinking
builds a smaller model that computes the same thing, and shrunk models save and load without pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

from prunescope import PrunescopeError
from prunescope.structure import (
    find_transformer_groups,
    load_shrunk,
    mask_units,
    save_shrunk,
    shrink_transformer,
    unit_scores,
    units_to_remove,
)

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
VOCAB = 64


def _build(family: str, **overrides):
    torch.manual_seed(0)
    t = transformers
    if family == "llama":
        config = t.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=VOCAB, **overrides)
        return t.LlamaForCausalLM(config).eval()
    if family == "mistral":
        config = t.MistralConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                                 num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, **overrides)
        return t.MistralForCausalLM(config).eval()
    if family == "qwen2":  # q/k/v biases; a full-attention first layer then sliding-window layers
        config = t.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=VOCAB, use_sliding_window=True, sliding_window=4,
                               max_window_layers=1, **overrides)
        return t.Qwen2ForCausalLM(config).eval()
    if family == "bert":
        config = t.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              vocab_size=VOCAB, max_position_embeddings=32, **overrides)
        return t.BertModel(config).eval()
    if family == "gpt2":  # fused c_attn = q|k|v in one Conv1D, tied LM head
        config = t.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_inner=48, vocab_size=VOCAB, n_positions=32, **overrides)
        return t.GPT2LMHeadModel(config).eval()
    raise AssertionError(family)


FAMILIES = ("llama", "mistral", "qwen2", "bert", "gpt2")
GQA_FAMILIES = ("llama", "mistral", "qwen2")


def _inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _output(model: nn.Module) -> torch.Tensor:
    out = model(**_inputs())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plan(groups, granularity: str) -> dict[str, list[int]]:
    """A non-uniform plan: different units (and counts) per layer, one layer left alone."""
    if granularity == "block":
        return {groups[1].name: [0]}
    plan = {groups[0].name: [0], groups[2].name: [groups[2].units - 1]}
    if granularity == "neuron":
        plan = {groups[0].name: [0, 5, 6, 30], groups[2].name: list(range(1, groups[2].units, 3))}
    return plan


CASES = [(f, "head", "kv_group") for f in FAMILIES] + [(f, "head", "query") for f in GQA_FAMILIES] \
    + [(f, "neuron", "kv_group") for f in FAMILIES] + [(f, "block", "kv_group") for f in FAMILIES]


@pytest.mark.parametrize("family,granularity,head_mode", CASES)
def test_masks_equal_shrunk_model(family, granularity, head_mode):
    model = _build(family)
    dense = _output(model)
    before = snapshot(model)
    groups = find_transformer_groups(model, granularity, head_mode=head_mode)
    assert len(groups) == 3 and all(g.granularity == granularity for g in groups)
    plan = _plan(groups, granularity)
    named = {g.name: g for g in groups}

    restores = [mask_units(model, named[name], units) for name, units in plan.items()]
    masked = _output(model)
    for restore in restores:
        restore()
    assert_unchanged(model, before)  # restore is bit-exact, hooks removed

    shrunk = shrink_transformer(model, plan, head_mode=head_mode)
    assert_unchanged(model, before)  # the input model is untouched
    out = _output(shrunk)
    scale = dense.abs().max().item()
    assert (masked - out).abs().max().item() <= 1e-4 * scale
    assert (masked - dense).abs().max().item() > 1e-3 * scale
    removed = sum(len(units) * named[name].params_per_unit for name, units in plan.items())
    assert _params(shrunk) == _params(model) - removed
    if granularity == "block":
        assert len(find_transformer_groups(shrunk, "block")) == 2


def test_head_units_and_slices():
    llama = _build("llama")
    kv = find_transformer_groups(llama, "head")[0]
    query = find_transformer_groups(llama, "head", head_mode="query")[0]
    # 4 query heads, 2 KV heads, head_dim 8, hidden 32, no biases
    assert (kv.units, kv.params_per_unit) == (2, 2 * 8 * 32 + 8 * 32 + 8 * 32 + 32 * 2 * 8)
    assert (query.units, query.params_per_unit) == (2, 2 * (8 * 32) * 2)
    assert {s.tensor.rsplit(".", 2)[-2] for s in query.slices} == {"q_proj", "o_proj"}  # K/V untouched
    gpt2 = find_transformer_groups(_build("gpt2"), "head")[0]
    assert gpt2.units == 4 and [s.offset for s in gpt2.slices if s.tensor.endswith("c_attn.weight")] == [0, 32, 64]
    bert = find_transformer_groups(_build("bert"), "neuron")[0]
    assert bert.name == "encoder.layer.0.intermediate" and bert.units == 48


def test_mixed_plan_and_query_mode_compose():
    model = _build("llama")
    dense = _output(model)
    heads = find_transformer_groups(model, "head")
    neurons = find_transformer_groups(model, "neuron")
    blocks = find_transformer_groups(model, "block")
    plan = {heads[0].name: [1], neurons[2].name: [0, 1, 2], blocks[1].name: [0]}
    named = {g.name: g for g in heads + neurons + blocks}
    restores = [mask_units(model, named[n], u) for n, u in plan.items()]
    masked = _output(model)
    for restore in restores:
        restore()
    shrunk = shrink_transformer(model, plan)
    assert (masked - _output(shrunk)).abs().max() <= 1e-4 * dense.abs().max()
    # then query heads inside the remaining groups of the shrunk model
    query = find_transformer_groups(shrunk, "head", head_mode="query")
    twice = shrink_transformer(shrunk, {query[1].name: [0]}, head_mode="query")
    assert twice.model.layers[1].self_attn.num_key_value_groups == 1
    assert twice.prunescope_kept_blocks == {"model.layers": (3, [0, 2])}
    assert _output(twice).shape == dense.shape


def test_generate_with_cache_after_block_removal():
    model = _build("qwen2")
    shrunk = shrink_transformer(model, {"model.layers.0": [0]})
    assert shrunk.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in shrunk.model.layers] == [0, 1]
    ids = _inputs()["input_ids"][:1]
    with torch.no_grad():
        cached = shrunk.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        plain = shrunk.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_gpt2_inverse_layer_scaling_survives_block_removal(tmp_path):
    model = _build("gpt2", scale_attn_by_inverse_layer_idx=True)
    group = find_transformer_groups(model, "block")[0]
    restore = mask_units(model, group, [0])
    masked = _output(model)
    restore()
    shrunk = shrink_transformer(model, {group.name: [0]})
    assert (masked - _output(shrunk)).abs().max() <= 1e-4 * masked.abs().max()
    save_shrunk(shrunk, tmp_path, model)  # plain transformers would rescale the renumbered layers
    assert not (tmp_path / "config.json").exists()
    assert torch.equal(_output(load_shrunk(tmp_path)), _output(shrunk))


# ---- save / load ---------------------------------------------------------------------------


def _mixed_plan(model: nn.Module) -> dict[str, list[int]]:
    """Two layers lose different heads, one loses neurons, and the middle block goes."""
    heads = find_transformer_groups(model, "head")
    neurons = find_transformer_groups(model, "neuron")
    block = find_transformer_groups(model, "block")[1]
    return {heads[0].name: [0], heads[2].name: [1], neurons[0].name: [3, 4, 9], block.name: [0]}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model = _build(family)
    plan = _mixed_plan(model)
    shrunk = shrink_transformer(model, plan)
    spec_file = save_shrunk(shrunk, tmp_path, model)
    spec = json.loads(spec_file.read_text())
    assert spec["origin_config"]["model_type"] == model.config.model_type and not spec["hf_loadable"]
    assert not (tmp_path / "config.json").exists()
    assert b"pickle" not in (tmp_path / "model.safetensors").read_bytes()[:200]
    loaded = load_shrunk(tmp_path)
    assert type(loaded) is type(model) and _params(loaded) == _params(shrunk)
    assert torch.equal(_output(loaded), _output(shrunk))


def test_save_load_query_mode(tmp_path):
    model = _build("mistral")
    query = find_transformer_groups(model, "head", head_mode="query")
    shrunk = shrink_transformer(model, {query[0].name: [0, 2], query[1].name: [1]}, head_mode="query")
    save_shrunk(shrunk, tmp_path, model)
    assert torch.equal(_output(load_shrunk(tmp_path)), _output(shrunk))


UNIFORM = [("llama", "kv_group"), ("qwen2", "kv_group"), ("mistral", "query"), ("bert", None), ("gpt2", None)]


@pytest.mark.parametrize("family,head_mode", UNIFORM)
def test_uniform_plan_loads_in_plain_transformers(family, head_mode, tmp_path):
    """Same counts in every layer: save_pretrained + the patched config load with from_pretrained."""
    model = _build(family)
    plan = {g.name: [0, 3, 17] for g in find_transformer_groups(model, "neuron")}
    if head_mode is not None:
        plan.update({g.name: [0] for g in find_transformer_groups(model, "head", head_mode=head_mode)})
    blocks = find_transformer_groups(model, "block")
    plan = {k: v for k, v in plan.items() if not k.startswith(f"{blocks[0].name}.")}
    plan[blocks[0].name] = [0]
    shrunk = shrink_transformer(model, plan, head_mode=head_mode or "kv_group")
    assert shrunk.config.num_hidden_layers == 2
    save_shrunk(shrunk, tmp_path, model)
    assert json.loads((tmp_path / "prunescope.json").read_text())["hf_loadable"]
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path).eval()
    assert type(plain) is type(model) and _params(plain) == _params(shrunk)
    assert torch.equal(_output(plain), _output(shrunk))
    folder = tmp_path / "hf"
    shrunk.save_pretrained(folder)
    assert torch.equal(_output(auto.from_pretrained(folder).eval()), _output(shrunk))


def test_uniform_heads_bert_config_cannot_say_so(tmp_path):
    model = _build("bert")
    shrunk = shrink_transformer(model, {g.name: [1] for g in find_transformer_groups(model, "head")})
    assert shrunk.config.num_attention_heads == 4  # head size is hidden_size / heads in BERT's config
    save_shrunk(shrunk, tmp_path, model)
    assert not (tmp_path / "config.json").exists()
    assert torch.equal(_output(load_shrunk(tmp_path)), _output(shrunk))


def test_load_refuses_mismatched_weights(tmp_path):
    model = _build("llama")
    neurons = find_transformer_groups(model, "neuron")
    save_shrunk(shrink_transformer(model, {neurons[0].name: [0, 1]}), tmp_path, model)
    spec = json.loads((tmp_path / "prunescope.json").read_text())
    spec["layer_lists"][0]["neurons"][0] = 40
    (tmp_path / "prunescope.json").write_text(json.dumps(spec))
    with pytest.raises(PrunescopeError, match=r"weight 'model\.layers\.0\.mlp\.\w+\.weight' has shape") as error:
        load_shrunk(tmp_path)
    assert "46" in str(error.value) and "40" in str(error.value)
    spec["layer_lists"][0]["neurons"][0] = 99
    (tmp_path / "prunescope.json").write_text(json.dumps(spec))
    with pytest.raises(PrunescopeError, match="keeps 99 neurons in model.layers.0.mlp, which has 48"):
        load_shrunk(tmp_path)
    with pytest.raises(PrunescopeError, match="no prunescope.json"):
        load_shrunk(tmp_path / "nothing")


# ---- criteria ------------------------------------------------------------------------------


def test_unit_scores():
    model = _build("llama")
    group = find_transformer_groups(model, "neuron")[0]
    mlp = model.model.layers[0].mlp
    own = torch.cat([mlp.gate_proj.weight[5], mlp.up_proj.weight[5], mlp.down_proj.weight[:, 5]]).double()
    l1, l2 = unit_scores(model, group, "l1"), unit_scores(model, group, "l2")
    assert l1.shape == (48,) and torch.isclose(l1[5], own.abs().sum())
    assert torch.isclose(l2[5], own.norm())
    assert torch.equal(unit_scores(model, group, "random", seed=3), unit_scores(model, group, "random", seed=3))
    assert not torch.equal(unit_scores(model, group, "random", seed=3), unit_scores(model, group, "random", seed=4))
    block = find_transformer_groups(model, "block")[0]
    expected = torch.cat([p.detach().flatten() for p in model.model.layers[0].parameters()]).double().norm()
    assert torch.isclose(unit_scores(model, block, "l2")[0], expected)
    with pytest.raises(PrunescopeError, match="accepted: l1, l2, random"):
        unit_scores(model, group, "taylor")


def test_units_to_remove():
    scores = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0, 2.0, 7.0, 8.0, 6.0, 4.0])
    assert units_to_remove(scores, 0.3, 10) == [1, 3, 5]
    assert units_to_remove(scores, 0.0, 10) == []
    assert units_to_remove(scores, 0.3, 10, round_to=4) == [1, 3]  # keeps 8
    assert units_to_remove(scores, 0.9, 10, round_to=4) == sorted([1, 3, 5, 2, 9, 0])  # keeps 4, not 1
    assert units_to_remove([1.0], 1.0, 1, min_units=0) == [0]  # a block may go
    with pytest.raises(PrunescopeError, match="would keep 0 of 10 units; at least 1 must remain"):
        units_to_remove(scores, 1.0, 10)
    assert len(units_to_remove(scores, 0.5, 10, round_to=8)) == 2  # keeps 8, the only multiple
    with pytest.raises(PrunescopeError, match="round_to=16 cannot keep a multiple of 16 of only 10 units"):
        units_to_remove(scores, 0.5, 10, round_to=16)
    with pytest.raises(PrunescopeError, match=r"in \[0, 1\]"):
        units_to_remove(scores, 1.5, 10)
    with pytest.raises(PrunescopeError, match="3 scores for 10 units"):
        units_to_remove([1, 2, 3], 0.5, 10)


# ---- bad input -----------------------------------------------------------------------------


class _OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8))  # a norm mixes neurons


class _OddModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_OddBlock(), _OddBlock()])


def test_bad_input():
    with pytest.raises(PrunescopeError, match=r"attention module 'layers\.0\.self_attn' \(nn.MultiheadAttention\) has .*bias_k"):
        find_transformer_groups(_OddModel(), "head")
    with pytest.raises(PrunescopeError, match=r"block 'layers\.0' \(_OddBlock\) has no feed-forward"):
        find_transformer_groups(_OddModel(), "neuron")
    assert len(find_transformer_groups(_OddModel(), "block")) == 2
    with pytest.raises(PrunescopeError, match="found no transformer layers in Linear"):
        find_transformer_groups(nn.Linear(2, 2), "head")
    llama = _build("llama")
    with pytest.raises(PrunescopeError, match="accepted: head, neuron, block"):
        find_transformer_groups(llama, "channel")
    with pytest.raises(PrunescopeError, match="accepted: kv_group, query"):
        find_transformer_groups(llama, "head", head_mode="value")
    with pytest.raises(PrunescopeError, match=r"head_mode='query' needs grouped-query attention.*BertAttention"):
        find_transformer_groups(_build("bert"), "head", head_mode="query")
    group = find_transformer_groups(llama, "head")[0]
    with pytest.raises(PrunescopeError, match="removing all 2 head units of model.layers.0.self_attn .*at least 1 must remain"):
        mask_units(llama, group, [0, 1])
    with pytest.raises(PrunescopeError, match="removing all 2 head units"):
        shrink_transformer(llama, {group.name: [1, 0]})
    with pytest.raises(PrunescopeError, match=r"out of range .* \(0\.\.1\)"):
        mask_units(llama, group, [2])
    with pytest.raises(PrunescopeError, match="repeat"):
        mask_units(llama, group, [1, 1])
    neurons = find_transformer_groups(llama, "neuron")[0]
    smaller = shrink_transformer(llama, {neurons.name: [0]})
    with pytest.raises(PrunescopeError, match="does not match this model: model.layers.0.mlp.down_proj.weight has 47"):
        mask_units(smaller, neurons, [3])
    with pytest.raises(PrunescopeError, match="groups this model does not have: model.layers.7.mlp"):
        shrink_transformer(llama, {"model.layers.7.mlp": [0]})
    with pytest.raises(PrunescopeError, match="inside removed blocks: model.layers.1.mlp"):
        shrink_transformer(llama, {"model.layers.1": [0], "model.layers.1.mlp": [0]})


# ---- the real SmolLM2 ----------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("PRUNESCOPE_SLOW") != "1", reason="loads SmolLM2-135M (~20 s); set PRUNESCOPE_SLOW=1")
def test_smollm2_masks_equal_shrunk(tmp_path):
    from prunescope.models import load_smollm2

    model = load_smollm2().model
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def logits(m):
        return m(input_ids=ids).logits

    dense = logits(model)
    heads = find_transformer_groups(model, "head")
    assert len(heads) == 30 and heads[0].units == 3
    assert find_transformer_groups(model, "head", head_mode="query")[0].units == 3
    neurons = find_transformer_groups(model, "neuron")
    blocks = find_transformer_groups(model, "block")
    plan = {heads[3].name: [1], heads[10].name: [0, 2], blocks[20].name: [0]}
    plan.update({g.name: units_to_remove(unit_scores(model, g, "l2"), 0.25, g.units) for g in neurons[:8]})
    named = {g.name: g for g in heads + neurons + blocks}
    before = snapshot(model)
    restores = [mask_units(model, named[n], u) for n, u in plan.items()]
    masked = logits(model)
    for restore in restores:
        restore()
    assert_unchanged(model, before)
    shrunk = shrink_transformer(model, plan)
    out = logits(shrunk)
    scale = dense.abs().max()
    assert (masked - out).abs().max() <= 1e-4 * scale and (masked - dense).abs().max() > 1e-3 * scale
    assert _params(shrunk) == _params(model) - sum(len(u) * named[n].params_per_unit for n, u in plan.items())
    save_shrunk(shrunk, tmp_path, model)
    assert torch.equal(logits(load_shrunk(tmp_path)), out)
