"""torchvision's ViT (nn.MultiheadAttention): heads, MLP neurons and encoder blocks are found,
masked exactly, shrunk into a smaller model that computes the same, costed, saved and loaded."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

import prunescope as ps
from prunescope import PrunescopeError
from prunescope.cost import CostModel
from prunescope.structure import find_transformer_groups, load_shrunk, mask_units, save_shrunk, shrink_transformer
from prunescope.structure.pruned_attention import HeadPrunedAttention

torchvision = pytest.importorskip("torchvision")
torch.set_num_threads(1)
VIT = dict(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=48, num_classes=10)
LAYER = "encoder.layers.encoder_layer_{}"


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(**VIT).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: outputs would ignore the input
    return model


def _images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _out(model: nn.Module) -> torch.Tensor:
    return model(_images())


def _removals() -> dict[str, list[int]]:
    """Non-uniform: two heads of layer 0, one of layer 2, a third of layer 1's neurons, block 1 kept."""
    return {
        f"{LAYER.format(0)}.self_attention": [1, 3],
        f"{LAYER.format(2)}.self_attention": [0],
        f"{LAYER.format(1)}.mlp": list(range(0, 48, 3)),
    }


def test_groups_of_a_vit():
    model = _vit()
    heads = find_transformer_groups(model, "head")
    assert [g.name for g in heads] == [f"{LAYER.format(i)}.self_attention" for i in range(3)]
    assert {g.units for g in heads} == {4}
    # a head owns 8 rows of q, k and v (weights + biases) and 8 output-projection columns
    assert heads[0].params_per_unit == 3 * 8 * (32 + 1) + 8 * 32
    neurons = find_transformer_groups(model, "neuron")
    assert [g.units for g in neurons] == [48] * 3 and neurons[0].params_per_unit == 32 + 1 + 32
    blocks = find_transformer_groups(model, "block")
    assert [g.name for g in blocks] == [LAYER.format(i) for i in range(3)]
    with pytest.raises(PrunescopeError, match="head_mode='query' needs grouped-query attention"):
        find_transformer_groups(model, "head", head_mode="query")


def test_masks_equal_shrunk_vit_and_input_is_untouched():
    model = _vit()
    before = snapshot(model)
    dense = _out(model)
    masked = copy.deepcopy(model)
    groups = {g.name: g for kind in ("head", "neuron") for g in find_transformer_groups(masked, kind)}
    for name, remove in _removals().items():
        mask_units(masked, groups[name], remove)
    shrunk = shrink_transformer(model, _removals())
    assert_unchanged(model, before)
    a, b = _out(masked), _out(shrunk)
    assert (a - b).abs().max() <= 1e-4 * dense.abs().max()
    assert (a - dense).abs().max() > 1e-2
    attention = shrunk.get_submodule(f"{LAYER.format(0)}.self_attention")
    assert isinstance(attention, HeadPrunedAttention) and attention.num_heads == 2
    assert attention.in_proj_weight.shape == (3 * 2 * 8, 32) and attention.out_proj.in_features == 16
    assert isinstance(shrunk.get_submodule(f"{LAYER.format(1)}.self_attention"), nn.MultiheadAttention)
    # the shrunk model's heads can be pruned again, and blocks dropped keep torchvision's names
    again = shrink_transformer(shrunk, {f"{LAYER.format(0)}.self_attention": [0], LAYER.format(1): [0]})
    assert [name for name, _ in again.encoder.layers.named_children()] == ["encoder_layer_0", "encoder_layer_2"]
    assert again.get_submodule(f"{LAYER.format(0)}.self_attention").num_heads == 1
    assert _out(again).shape == (4, 10)


def test_block_removal_is_the_identity():
    model = _vit()
    masked = copy.deepcopy(model)
    (block,) = [g for g in find_transformer_groups(masked, "block") if g.name == LAYER.format(1)]
    mask_units(masked, block, [0])
    shrunk = shrink_transformer(model, {LAYER.format(1): [0]})
    assert len(shrunk.encoder.layers) == 2
    assert (_out(masked) - _out(shrunk)).abs().max() <= 1e-4 * _out(model).abs().max()


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_pruned_attention_computes_what_multihead_attention_does(batch_first):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    mine = HeadPrunedAttention.from_mha(reference).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    memory = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    float_mask = torch.randn(5, 7)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": float_mask}, {"attn_mask": float_mask < -1},
                   {"need_weights": True, "average_attn_weights": False}):
        want, want_weights = reference(x, memory, memory, **kwargs)
        got, got_weights = mine(x, memory, memory, **kwargs)
        assert torch.allclose(got, want, atol=1e-5), kwargs
        if want_weights is not None:
            assert torch.allclose(got_weights, want_weights, atol=1e-6)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.allclose(mine(x, x, x, attn_mask=causal, is_causal=True)[0],
                          reference(x, x, x, attn_mask=causal, is_causal=True)[0], atol=1e-5)


def test_unsupported_multihead_attention_is_named():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attention = nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    model = nn.Sequential(*[Block() for _ in range(2)])
    with pytest.raises(PrunescopeError, match=r"'0\.self_attention'.*kdim/vdim"):
        find_transformer_groups(model, "head")
    assert [g.units for g in find_transformer_groups(model, "neuron")] == [32, 32]


def test_flops_count_packed_attention_and_follow_the_plan():
    model = _vit()
    images = _images(2)
    cost = CostModel.of(model, images)
    tokens = (32 // 8) ** 2 + 1
    attention = f"{LAYER.format(0)}.self_attention"
    assert cost.flops[f"{attention}.in_proj_weight"] == 2 * 3 * 32 * 32 * tokens
    assert cost.flops[f"{attention}.out_proj.weight"] == 2 * 32 * 32 * tokens
    targets = ps.find_targets(model, "head")
    levels = {attention: 0.5, f"{LAYER.format(2)}.self_attention": 0.25}
    predicted_params, predicted_flops = cost.remaining(targets, levels)
    shrunk = shrink_transformer(model, {attention: [0, 1], f"{LAYER.format(2)}.self_attention": [3]})
    measured = CostModel.of(shrunk, images)
    assert predicted_params == measured.params
    assert predicted_flops == pytest.approx(measured.total_flops)


def test_scan_allocate_shrink_save_load(tmp_path):
    model = _vit()
    before = snapshot(model)
    images = _images(8)
    evaluator = ps.Evaluator(model, [images[:4], images[4:]], "kl")
    for granularity in ("head", "neuron", "block"):
        targets = ps.find_targets(model, granularity, example=images[:4])
        profile = ps.scan(model, evaluator, targets, levels=(0.25, 0.5))
        assert_unchanged(model, before)
        budget = ps.Budget(flops=0.05) if granularity != "block" else ps.Budget(params=0.2)
        plan = ps.allocate(profile, budget)
        masked, shrunk = ps.apply(model, plan, shrink=False), ps.apply(model, plan, shrink=True)
        dense = _out(model)
        assert (_out(masked) - _out(shrunk)).abs().max() <= 1e-4 * dense.abs().max()
        assert (_out(masked) - dense).abs().max() > 1e-3
        save_shrunk(shrunk, tmp_path / granularity, "torchvision:VisionTransformer", VIT)
        loaded = load_shrunk(tmp_path / granularity)
        assert torch.equal(_out(loaded), _out(shrunk.eval()))
        assert torch.equal(_out(ps.load(tmp_path / granularity)), _out(loaded))
    assert_unchanged(model, before)


def test_load_refuses_weights_of_another_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    shrunk = shrink_transformer(_vit(), _removals())
    save_shrunk(shrunk, tmp_path, "torchvision:VisionTransformer", VIT)
    tensors = load_file(tmp_path / "model.safetensors")
    key = f"{LAYER.format(0)}.self_attention.in_proj_weight"
    tensors[key] = torch.zeros(3 * 3 * 8, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(PrunescopeError, match=rf"{key}.*\(72, 32\).*\(48, 32\)"):
        load_shrunk(tmp_path)
    with pytest.raises(PrunescopeError, match="torchvision has no model or model class 'NoSuchNet'"):
        save_shrunk(shrunk, tmp_path / "x", "torchvision:NoSuchNet", VIT)
