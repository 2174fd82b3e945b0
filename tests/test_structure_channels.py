"""Channel groups (issue 3): coupling from the graph, exact masks, shrinking, saving, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_unchanged, mixed_mode, snapshot
from torch import nn

from prunescope.digits import DigitsCNN
from prunescope.errors import PrunescopeError
from prunescope.structure import (
    channel_unit_scores,
    find_channel_groups,
    load_shrunk_channels,
    mask_channels,
    plan_channel_removals,
    predicted_params,
    save_shrunk_channels,
    shrink_channels,
)
from prunescope.structure.channel_shrink import TOLERANCE, _output, masked_output, relative_difference

torchvision = pytest.importorskip("torchvision")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_shrink_matches_masks(model: nn.Module, x: torch.Tensor, level: float = 0.5, criterion: str = "l1"):
    """Masked == shrunk, both != dense, exact parameter count, input model untouched."""
    model.eval()
    before = snapshot(model)
    groups = find_channel_groups(model, x)
    removals = plan_channel_removals(model, groups, level, criterion)
    small = shrink_channels(model, removals, x)
    assert_unchanged(model, before)
    dense = _output(model, x)
    masked = masked_output(model, groups, removals, x)
    shrunk = _output(small, x)
    assert_unchanged(model, before)
    assert relative_difference(masked, shrunk) <= TOLERANCE
    assert relative_difference(dense, shrunk) > 1e-3
    assert _params(small) == predicted_params(model, groups, removals) < _params(model)
    return groups, removals, small


class ConcatNet(nn.Module):
    """DenseNet-like: every layer reads the concatenation of all earlier features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(6 + 4 * i), nn.ReLU(), nn.Conv2d(6 + 4 * i, 4, 3, padding=1)) for i in range(3)
        )
        self.head = nn.Linear(18, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        for layer in self.layers:
            features = torch.cat([features, layer(features)], 1)
        return self.head(features.mean((2, 3)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], layer_scale=1.0, num_classes=7)
    with torch.no_grad():  # random init gives zero biases and layer scale 1e-6 elsewhere; make every path count
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


def _randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN scales, shifts and running statistics, so that every channel changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


def _images(px: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(seed))


# ---- masked == shrunk on real architectures ---------------------------------------------------


def test_digits_cnn_flatten_into_linear():
    torch.manual_seed(0)
    groups, removals, small = check_shrink_matches_masks(DigitsCNN(8), torch.randn(3, 1, 8, 8))
    by_name = {g.name: g for g in groups}
    # the last conv's channels reach the classifier through Flatten: 2x2 = 4 input columns per channel
    last = by_name["features.7"]
    assert any(s.tensor == "classifier.1.weight" and s.width == 4 and s.role == "in" for s in last.slices)
    assert "classifier.3" not in by_name  # the output layer is never pruned
    assert small.classifier[3].out_features == 10


def test_resnet18_residual_streams_are_one_group():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    groups, _, _ = check_shrink_matches_masks(model, _images(32))
    stream = next(g for g in groups if any(s.tensor == "layer1.1.bn2.weight" for s in g.slices))
    producers = {s.tensor for s in stream.slices if s.role == "norm" and s.tensor.endswith("weight")}
    assert {"bn1.weight", "layer1.0.bn2.weight", "layer1.1.bn2.weight"} <= producers
    assert stream.flops_per_unit and stream.flops_per_unit > 0


def test_mobilenet_v3_small_depthwise_and_squeeze_excitation():
    torch.manual_seed(0)
    check_shrink_matches_masks(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), _images(32))


def test_concatenation_offsets():
    torch.manual_seed(0)
    groups, _, small = check_shrink_matches_masks(ConcatNet(), _images(12))
    stem = next(g for g in groups if g.name == "stem")
    # the stem's channels sit at offset 0 of every later concat; layer 1's output at offset 6
    assert {s.offset for s in stem.slices if s.role == "in"} == {0}
    first = next(g for g in groups if g.name == "layers.0.2")
    assert {s.offset for s in first.slices if s.tensor == "head.weight"} == {6}
    assert small.head.in_features == 9


def test_regnet_grouped_convs_prune_in_slots():
    torch.manual_seed(0)
    model = torchvision.models.regnet_y_400mf(weights=None, num_classes=10)
    groups, removals, small = check_shrink_matches_masks(model, _images(32))
    grouped = model.trunk_output.block1[0].f.b[0]
    assert grouped.groups == 6
    for name in ("trunk_output.block1.block1-0.f.a.0", "trunk_output.block1.block1-0.f.b.0"):
        group = next(g for g in groups if g.name == name)
        assert group.units == 48 // 6  # one unit = one channel slot of every conv group
        assert group.params_per_unit % 6 == 0
    assert small.trunk_output.block1[0].f.b[0].groups == 6
    assert small.trunk_output.block1[0].f.b[0].out_channels == 24


def test_convnext_channels_last_layernorm_and_layer_scale():
    model = tiny_convnext()
    groups, _, small = check_shrink_matches_masks(model, _images(32))
    stream = next(g for g in groups if any(s.tensor.endswith("layer_scale") for s in g.slices) and
                  any(s.tensor == "features.1.0.block.2.weight" for s in g.slices))
    assert any(s.tensor == "features.0.1.weight" for s in stream.slices)  # the stem's LayerNorm2d
    assert small.features[1][0].layer_scale.shape[0] < 16


def test_mlp_and_groupnorm():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 3))
    groups, _, _ = check_shrink_matches_masks(mlp, torch.randn(5, 6))
    assert sorted((g.name, g.units) for g in groups) == [("0", 16), ("2", 12)]
    check_shrink_matches_masks(GroupNormNet(), _images(8))


def test_shufflenet_branches_shrink_and_shuffled_streams_are_refused_naming_the_op():
    torch.manual_seed(0)
    model = _randomize_batchnorms(torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10))
    x = _images(32)
    with pytest.raises(PrunescopeError, match=r"op View in module 'stage\d\.\d' moves channels off axis 1"):
        find_channel_groups(model, x, strict=True)
    with pytest.warns(UserWarning, match="channel shuffle"):
        groups, _, _ = check_shrink_matches_masks(model, x)
    # inside a branch (conv-BN-ReLU-depthwise-BN-conv), the stem, and the last conv: no group crosses a shuffle
    assert {g.name for g in groups} == {f"{s}.branch2.3" for s in ("stage2.0", "stage2.1", "stage2.2", "stage2.3")} | {
        f"stage3.{i}.branch2.3" for i in range(8)} | {f"stage4.{i}.branch2.3" for i in range(4)} | {"conv1.0", "conv5.0"}


# ---- masks, restore, criteria -----------------------------------------------------------------


def test_mask_restore_is_bit_exact_and_keeps_flags():
    torch.manual_seed(0)
    model = mixed_mode(tiny_convnext())
    x = _images(32)
    before = snapshot(model)
    groups = find_channel_groups(model, x)  # traces in eval mode with grad: both restored
    assert_unchanged(model, before)
    dense = _output(model, x)
    restores = [mask_channels(model, g, list(range(g.units // 2))) for g in groups]
    assert relative_difference(dense, _output(model, x)) > 1e-3
    for restore in reversed(restores):
        restore()
    assert_unchanged(model, before)
    assert torch.equal(_output(model, x), dense)


def test_criteria_and_round_to():
    torch.manual_seed(0)
    model = DigitsCNN(8).eval()
    x = torch.randn(2, 1, 8, 8)
    groups = find_channel_groups(model, x)
    conv = next(g for g in groups if g.name == "features.0")
    gamma = model.features[1].weight.detach().abs().double()
    assert torch.allclose(channel_unit_scores(model, conv, "bn_scale"), gamma)
    assert torch.equal(channel_unit_scores(model, conv, "random", seed=3), channel_unit_scores(model, conv, "random", seed=3))
    l1 = channel_unit_scores(model, conv, "l1")
    expected = (model.features[0].weight.abs().sum((1, 2, 3)) + model.features[0].bias.abs() + gamma.float()
                + model.features[1].bias.abs() + model.features[3].weight.abs().sum((0, 2, 3))).double()
    assert torch.allclose(l1, expected, rtol=1e-6)
    removals = plan_channel_removals(model, groups, 0.3, "l2", round_to=4)
    assert all((g.units - len(removals[g.name])) % 4 == 0 for g in groups)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(PrunescopeError, match="no BatchNorm"):
        channel_unit_scores(mlp, find_channel_groups(mlp, torch.randn(2, 4))[0], "bn_scale")


def test_output_groups_only_on_request_and_never_masked():
    model = DigitsCNN(4).eval()
    x = torch.randn(2, 1, 8, 8)
    assert "classifier.3" not in {g.name for g in find_channel_groups(model, x)}
    output = next(g for g in find_channel_groups(model, x, exclude_output=False) if g.name == "classifier.3")
    assert {s.role for s in output.slices} == {"output"}
    with pytest.raises(PrunescopeError, match="changes the model's output width"):
        mask_channels(model, output, [0])


# ---- save / load --------------------------------------------------------------------------------


def test_save_load_round_trip_and_shape_mismatch(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(8).eval()
    x = torch.randn(2, 1, 8, 8)
    groups = find_channel_groups(model, x)
    small = shrink_channels(model, plan_channel_removals(model, groups, 0.5, "l1"), x)
    save_shrunk_channels(small, tmp_path / "m", "prunescope:digits_cnn", {"width": 8})
    spec = json.loads((tmp_path / "m" / "prunescope_channels.json").read_text())
    assert spec["origin"] == "prunescope:digits_cnn" and len(spec["steps"][0]["kept"]["features.0"]) == 4
    loaded = load_shrunk_channels(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert torch.equal(_output(loaded, x), _output(small, x))

    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["features.3.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(PrunescopeError, match=r"features\.3\.weight.*\(3, 3, 3, 3\).*\(8, 4, 3, 3\)"):
        load_shrunk_channels(tmp_path / "m")


# ---- bad input ----------------------------------------------------------------------------------


def test_level_removing_every_channel_is_refused_naming_the_group():
    model = DigitsCNN(4).eval()
    groups = find_channel_groups(model, torch.randn(2, 1, 8, 8))
    with pytest.raises(PrunescopeError, match="channel group .* at least 1 must remain"):
        plan_channel_removals(model, groups, 1.0)


def test_units_outside_a_group_and_unknown_groups_are_refused():
    model = DigitsCNN(4).eval()
    x = torch.randn(2, 1, 8, 8)
    groups = find_channel_groups(model, x)
    with pytest.raises(PrunescopeError, match=r"\[4\] are out of range for features.0"):
        shrink_channels(model, {"features.0": [0, 4]}, x)
    with pytest.raises(PrunescopeError, match="out of range"):
        mask_channels(model, groups[-1], [groups[-1].units])
    with pytest.raises(PrunescopeError, match="no channel group named 'classifier.3'"):
        shrink_channels(model, {"classifier.3": [0]}, x)


class ChannelMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.flip(self.a(x), dims=[1]))  # reverses the channel order: not elementwise
        return self.c(h.mean((2, 3)))


def test_unknown_op_is_named_and_its_group_never_pruned():
    model = ChannelMix()
    x = _images(4)
    with pytest.raises(PrunescopeError, match=r"op Flip in module '<model>'"):
        find_channel_groups(model, x, strict=True)
    with pytest.warns(UserWarning, match="Flip"):
        groups = find_channel_groups(model, x)
    assert [g.name for g in groups] == ["b"]
    with pytest.raises(PrunescopeError, match="cannot be pruned: op Flip"):
        shrink_channels(model, {"a": [0]}, x)


def test_untraceable_model_names_where():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    with pytest.raises(PrunescopeError, match="in module 'head'"):
        find_channel_groups(Broken(), _images(4))
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    with pytest.raises(PrunescopeError, match="did not run in the example forward pass.*aux1"):
        find_channel_groups(model, _images(64))
