"""Residual blocks of CNNs as block targets: found from the graph, removed as the identity, shrunk,
saved and loaded."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

import prunescope as ps
from prunescope import PrunescopeError
from prunescope.structure import (
    find_residual_blocks,
    load_shrunk_channels,
    save_shrunk_channels,
    shrink_residual_blocks,
)

torchvision = pytest.importorskip("torchvision")
torch.set_num_threads(1)


class _Residual(nn.Module):
    def __init__(self, width: int, shortcut: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = torch.relu(self.conv(x))
        return torch.relu(x + branch) if self.shortcut else branch + 1


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_blocks_with_identity_shortcuts_are_found_from_the_graph():
    names = [g.name for g in find_residual_blocks(_resnet(), _images())]
    # the first block of layers 2-4 has a downsample shortcut and changes the shape: not removable
    assert names == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _Residual(8), _Residual(8, shortcut=False), nn.Sequential(_Residual(8), _Residual(8)))
    groups = find_residual_blocks(model, torch.randn(2, 3, 8, 8))
    # innermost blocks: the nested Sequential is itself input + residual, but its two blocks are the units
    assert [g.name for g in groups] == ["1", "3.0", "3.1"]
    assert all(g.units == 1 and g.min_units == 0 for g in groups)
    assert groups[0].params == 8 * 8 * 9 + 8
    with pytest.raises(PrunescopeError, match="found no removable blocks in VGG"):
        find_residual_blocks(torchvision.models.vgg11(num_classes=10), _images())


def test_scan_plan_shrink_save_load_resnet(tmp_path):
    model = _resnet()
    before = snapshot(model)
    images = _images()
    evaluator = ps.Evaluator(model, [images[:2], images[2:]], "kl")
    targets = ps.find_targets(model, "block", example=images[:2])
    assert [t.name for t in targets][:2] == ["layer1.0", "layer1.1"] and {t.granularity for t in targets} == {"block"}
    profile = ps.scan(model, evaluator, targets)
    assert_unchanged(model, before)
    assert [c.level for c in profile.cells] == ["1"] * len(targets) and all(c.change > 0 for c in profile.cells)
    plan = ps.allocate(profile, ps.Budget(params=0.05))
    removed = [name for name, level in plan.levels.items() if level == 1.0]
    assert removed
    masked, shrunk = ps.apply(model, plan, shrink=False), ps.apply(model, plan, shrink=True)
    assert_unchanged(model, before)
    with torch.no_grad():
        dense, a, b = model(images), masked(images), shrunk(images)
    assert (a - b).abs().max() <= 1e-4 * dense.abs().max() and (a - dense).abs().max() > 1e-3
    assert sum(p.numel() for p in shrunk.parameters()) == sum(p.numel() for p in model.parameters()) - sum(
        t.params for t in targets if t.name in removed)
    for name in removed:
        with pytest.raises(AttributeError):
            shrunk.get_submodule(name)
    # the cell the scan measured is what the shrunk model scores
    (one,) = removed[:1]
    single = shrink_residual_blocks(model, [t.group for t in targets], {one: [0]})
    assert evaluator.evaluate(single).value == pytest.approx(profile.cell(one, "1").value, rel=1e-5)
    save_shrunk_channels(shrunk, tmp_path, "torchvision:resnet18", {"num_classes": 10})
    loaded = load_shrunk_channels(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(images), b)


def test_bad_block_removals():
    model = _resnet()
    groups = find_residual_blocks(model, _images())
    with pytest.raises(PrunescopeError, match="not residual blocks of this model: layer2.0"):
        shrink_residual_blocks(model, groups, {"layer2.0": [0]})
    with pytest.raises(PrunescopeError, match="out of range"):
        shrink_residual_blocks(model, groups, {"layer1.0": [1]})
