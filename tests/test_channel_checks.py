"""Channel-group discovery that cannot hang and cannot offer a wrong group (issue 12, defect 7):
shortcuts added into a slice of the channels, cross-stage partial (CSP / C2f) splits, and a size
computed from the channel count."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

from prunescope.errors import PrunescopeError
from prunescope.structure import channel_discovery, find_channel_groups, refused_channel_groups, shrink_channels
from prunescope.structure.channel_discovery import discover_channel_groups, probe_units
from prunescope.structure.channel_shrink import TOLERANCE, _output, masked_output, relative_difference
from prunescope.targets import find_targets


def cbr(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SliceShortcutNet(nn.Module):
    """PyramidNet-like: widths grow by 2 per block and each block adds its input into the first
    channels of its output (``x[:, :c] += shortcut`` in place, or ``torch.cat([y[:, :c] + x, y[:, c:]], 1)``)."""

    def __init__(self, blocks: int, inplace: bool) -> None:
        super().__init__()
        widths = [4 + 2 * i for i in range(blocks + 1)]
        self.inplace = inplace
        self.stem = cbr(3, widths[0], 3)
        self.body = nn.ModuleList(nn.Sequential(cbr(a, b, 3), cbr(b, b, 3)) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Linear(widths[-1], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.body:
            y = block(x)
            c = x.shape[1]
            if self.inplace:
                y[:, :c] += x
            else:
                y = torch.cat([y[:, :c] + x, y[:, c:]], 1)
            x = y
        return self.head(x.mean((2, 3)))


class CSPNet(nn.Module):
    """Cross-stage partial blocks: a 1x1 conv, split in two (``chunk`` or ``split``), one half
    through a branch, concatenated back and fused by another 1x1 conv."""

    def __init__(self, split: str, blocks: int = 2, width: int = 8) -> None:
        super().__init__()
        self.how = split
        self.stem = cbr(3, width, 3)
        self.split = nn.ModuleList(cbr(width, width) for _ in range(blocks))
        self.branch = nn.ModuleList(nn.Sequential(cbr(width // 2, width // 2, 3), cbr(width // 2, width // 2, 3)) for _ in range(blocks))
        self.fuse = nn.ModuleList(cbr(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for split, branch, fuse in zip(self.split, self.branch, self.fuse, strict=True):
            h = split(x)
            x1, x2 = h.chunk(2, 1) if self.how == "chunk" else h.split(h.shape[1] // 2, 1)
            x = fuse(torch.cat([branch(x1), x2], 1))
        return self.head(x.mean((2, 3)))


class C3Net(nn.Module):
    """YOLOv5's C3: two 1x1 convs from the same input (one through bottlenecks), concat, 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.cv1, self.cv2, self.cv3 = cbr(8, 4), cbr(8, 4), cbr(8, 8)
        self.m = nn.Sequential(cbr(4, 4), cbr(4, 4, 3))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))
        return self.head(x.mean((2, 3)))


class C2f(nn.Module):
    """YOLOv8's C2f: chunk a 1x1 conv in two, run bottlenecks on the last piece, concat every piece."""

    def __init__(self, cin: int, cout: int, n: int = 2) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = cbr(cin, 2 * self.c)
        self.cv2 = cbr((2 + n) * self.c, cout)
        self.m = nn.ModuleList(nn.Sequential(cbr(self.c, self.c, 3), cbr(self.c, self.c, 3)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.stages = nn.Sequential(C2f(8, 8), C2f(8, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class WidthScaled(nn.Module):
    """Blocks that scale by their own channel count (``h * h.shape[1] ** -0.5``): every op is
    channel-independent and every index in range, yet the shrunk model computes something else."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Sequential(nn.Conv2d(n, 8, 3, padding=1, bias=False), nn.ReLU()) for n in (3, 8, 8, 8))
        self.head = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.b(h * h.shape[1] ** -0.5)
        h = self.c(h)
        h = self.d(h * h.shape[1] ** -0.5)
        return self.head(h.mean((2, 3)))


class BufferScaled(nn.Module):
    """A per-channel buffer multiplied in: Torch-Pruning does not prune buffers, so the shrunk model fails."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x)) * self.scale).mean((2, 3)))


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _build(cls, *args, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = cls(*args, **kwargs).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random BatchNorm statistics, so that every channel reaches the output
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model


def assert_every_group_shrinks_to_its_mask(model: nn.Module, x: torch.Tensor, groups) -> None:
    """Each offered group alone, at two removals (its first unit; the second half): the shrunk
    model runs and matches the masked model."""
    for group in groups:
        for units in ([0], list(range(group.units // 2, group.units))):
            if group.units - len(units) < group.min_units:
                continue
            small = shrink_channels(model, {group.name: units}, x, verify=False)
            masked = masked_output(model, groups, {group.name: units}, x)
            assert relative_difference(masked, _output(small, x)) <= TOLERANCE, (group.name, units)


# ---- the search cannot hang -------------------------------------------------------------------


def test_shortcut_concatenated_into_a_slice_is_refused_by_the_search_bound_and_the_rest_offered():
    # 16 blocks: without a bound Torch-Pruning's search of the stream group grows ~5x per block (8 blocks took 25 s)
    model = _build(SliceShortcutNet, 16, inplace=False)
    x = _images()
    # the stream through every block: one refusal, not one per member
    with pytest.warns(UserWarning, match=r"leaves 1 channel group\(s\) unpruned: body\.15\.1\.0: the search for its "
                      r"channel coupling reached more than 50000 dependencies \(search steps\)"):
        targets = find_targets(model, "channel", example=x)
    groups = [t.group for t in targets]
    offered = {g.name for g in groups}
    assert offered == {f"body.{i}.0.0" for i in range(16)}  # each block's inner conv is still offered
    assert_every_group_shrinks_to_its_mask(model, x, [g for g in groups if g.name in ("body.0.0.0", "body.15.0.0")])


def test_search_seconds_bound_refuses_by_name_and_bad_bounds_are_refused():
    model = _build(SliceShortcutNet, 16, inplace=False)
    with pytest.warns(UserWarning, match=r"body\.15\.1\.0: the search for its channel coupling ran .* over 0\.2 s \(search seconds\)"):
        find_channel_groups(model, _images(), search_steps=10**9, search_seconds=0.2)
    with pytest.raises(PrunescopeError, match="search steps must be a positive integer; got 0"):
        find_channel_groups(model, _images(), search_steps=0)
    with pytest.raises(PrunescopeError, match="search seconds must be a positive number; got -1"):
        refused_channel_groups(model, _images(), search_seconds=-1)


def test_shortcut_added_in_place_into_a_slice_is_refused_naming_the_op():
    model = _build(SliceShortcutNet, 16, inplace=True)
    x = _images()
    groups, refused = discover_channel_groups(model, x)
    assert refused == {"stem.0": "op torch::autograd::CopySlices in module '<model>' is not known to keep channels independent"}
    assert {g.name for g in groups} == {f"body.{i}.0.0" for i in range(16)}
    assert_every_group_shrinks_to_its_mask(model, x, [g for g in groups if g.name in ("body.0.0.0", "body.15.0.0")])


# ---- wrong groups are refused before any scan ---------------------------------------------------


@pytest.mark.parametrize("split", ["chunk", "split"])
def test_csp_split_groups_are_refused_by_name_and_the_others_shrink_to_their_masks(split):
    model = _build(CSPNet, split)
    x = _images()
    before = snapshot(model)
    groups, refused = discover_channel_groups(model, x)
    assert_unchanged(model, before)
    assert set(refused) == {"split.0.0", "split.1.0"}
    assert all("a coupling it got wrong" in why for why in refused.values())
    assert {g.name for g in groups} == {"stem.0", "branch.0.0.0", "branch.1.0.0", "fuse.0.0", "fuse.1.0"}
    assert_every_group_shrinks_to_its_mask(model, x, groups)
    names = {t.name for t in find_targets(model, "channel", example=x)}  # the scan's entry point never sees them
    assert names.isdisjoint(refused)


def test_c2f_chunk_groups_are_refused_and_the_others_shrink_to_their_masks():
    model = _build(C2fNet)
    x = _images()
    with pytest.raises(PrunescopeError, match=r"2 channel group\(s\) cannot be pruned exactly: stages\.\d\.m\.1\.1\.0"):
        find_channel_groups(model, x, strict=True)
    groups, refused = discover_channel_groups(model, x)
    assert set(refused) == {"stages.0.m.1.1.0", "stages.1.m.1.1.0"}
    assert {g.name for g in groups} == {"stem.0"} | {f"stages.{i}.{n}" for i in (0, 1) for n in ("cv2.0", "m.0.0.0", "m.1.0.0")}
    assert_every_group_shrinks_to_its_mask(model, x, groups)


def test_a_group_whose_shrink_disagrees_with_its_mask_is_refused_by_the_check(monkeypatch):
    model = _build(WidthScaled)
    x = _images()
    traces = []
    original = channel_discovery.trace_channels
    monkeypatch.setattr(channel_discovery, "trace_channels", lambda *a: traces.append(1) or original(*a))
    before = snapshot(model)
    groups, refused = discover_channel_groups(model, x)
    assert_unchanged(model, before)
    assert set(refused) == {"a.0", "c.0"}  # bisected out of the four groups
    assert "removing its units [0, 6, 7] of 8: the shrunk model's output differs from the masked model's" in refused["a.0"]
    assert {g.name for g in groups} == {"b.0", "d.0"}
    assert_every_group_shrinks_to_its_mask(model, x, groups)
    assert len(traces) > 1
    traces.clear()
    unchecked, none_refused = discover_channel_groups(model, x, check=False)
    assert len(unchecked) == 4 and not none_refused and len(traces) == 1


def test_a_group_whose_shrunk_model_does_not_run_is_refused_by_the_check():
    model = _build(BufferScaled)
    groups, refused = discover_channel_groups(model, _images())
    assert list(refused) == ["a"]
    assert "shrinking fails or the shrunk model does not run" in refused["a"]
    assert "The size of tensor a (5) must match the size of tensor b (8)" in refused["a"]
    assert [g.name for g in groups] == ["b"]


def test_csp_without_a_split_offers_every_group_at_the_cost_of_one_trace(monkeypatch):
    model = _build(C3Net)
    x = _images()
    traces = []
    original = channel_discovery.trace_channels
    monkeypatch.setattr(channel_discovery, "trace_channels", lambda *a: traces.append(1) or original(*a))
    groups, refused = discover_channel_groups(model, x)
    assert not refused
    assert {g.name for g in groups} == {"stem.0", "cv1.0", "cv2.0", "cv3.0", "m.0.0", "m.1.0"}
    assert len(traces) == 1  # every group passed at once: no bisection
    assert_every_group_shrinks_to_its_mask(model, x, groups)


def test_probe_units_are_uneven_and_respect_groupnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    groups = find_channel_groups(model, torch.randn(1, 3, 4, 4), check=False)
    by_name = {g.name: g for g in groups}
    assert probe_units(model, by_name["0"]) == [0, 1, 2, 3]  # a multiple of the GroupNorm's 4 groups
    assert probe_units(model, by_name["2"]) == [0, 6, 7]  # 1 from the first half, 2 from the second
    mlp = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    sizes = {g.name: probe_units(mlp, g) for g in find_channel_groups(mlp, torch.randn(2, 3), check=False)}
    assert sizes == {"0": [0], "2": []}  # a one-unit group has nothing to spare and is not checked
