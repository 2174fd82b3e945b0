"""Keep-masks remove what was asked: the right count, the right elements, the right N:M groups."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn

import prunescope as ps


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert bool((weight != 0).all()), "test weights must have no zeros beforehand"
    return weight


def _groups(mask: torch.Tensor, input_dim: int, m: int) -> torch.Tensor:
    """Non-zeros per group of ``m`` consecutive elements along ``input_dim``."""
    moved = mask.movedim(input_dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).sum(-1)


# ---- fractions ----------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
@pytest.mark.parametrize("shape", [(7, 5), (16, 3, 3, 3), (33,), (10, 4, 5)])
@pytest.mark.parametrize("level", [0.1, 0.25, 0.5, 0.73, 0.9, 0.99])
def test_fraction_removes_exactly_the_requested_count(criterion, shape, level):
    weight = _weight(*shape)
    mask = ps.keep_mask(weight, level, criterion, key="layer")
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    removed = int((~mask).sum())
    assert abs(removed - level * weight.numel()) <= 1
    assert int(((weight * mask) == 0).sum()) == removed


def test_magnitude_removes_the_smallest_weights():
    weight = _weight(64, 48)
    for level in (0.2, 0.5, 0.8):
        mask = ps.keep_mask(weight, level, "magnitude")
        assert weight.abs()[~mask].max() <= weight.abs()[mask].min()


def test_magnitude_ignores_sign():
    weight = torch.tensor([-5.0, 0.1, 3.0, -0.2, 4.0, -0.05])
    mask = ps.keep_mask(weight, 0.5, "magnitude")
    assert mask.tolist() == [True, False, True, False, True, False]


def test_random_is_reproducible_per_seed_and_differs_across_seeds():
    weight = _weight(32, 32)
    first = ps.keep_mask(weight, 0.5, "random", seed=7, key="fc")
    assert torch.equal(first, ps.keep_mask(weight, 0.5, "random", seed=7, key="fc"))
    assert torch.equal(first, ps.keep_mask(weight.clone() * 3, 0.5, "random", seed=7, key="fc"))  # magnitudes don't matter
    assert not torch.equal(first, ps.keep_mask(weight, 0.5, "random", seed=8, key="fc"))
    assert not torch.equal(first, ps.keep_mask(weight, 0.5, "random", seed=7, key="other"))
    # a random mask is not secretly the magnitude mask
    assert not torch.equal(first, ps.keep_mask(weight, 0.5, "magnitude"))


def test_random_removal_is_spread_over_the_tensor():
    weight = _weight(100, 100)
    mask = ps.keep_mask(weight, 0.5, "random", seed=0, key="fc")
    kept_per_row = mask.sum(dim=1).float()
    assert 30 < kept_per_row.min() and kept_per_row.max() < 70  # no block of rows or columns wiped out
    assert abs(float(mask[:50].float().mean()) - float(mask[50:].float().mean())) < 0.05


# ---- N:M ----------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_2_4_on_linear_groups_along_inputs(criterion):
    layer = nn.Linear(16, 6)
    weight = layer.weight.detach()
    assert bool((weight != 0).all())
    mask = ps.keep_mask(weight, "2:4", criterion, input_dim=1, key="fc")
    assert bool((_groups(mask, 1, 4) == 2).all())
    assert int(((weight * mask) != 0).sum()) == weight.numel() // 2


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_2_4_on_conv2d_groups_along_input_channels(criterion):
    conv = nn.Conv2d(8, 5, kernel_size=3)
    weight = conv.weight.detach()  # [out, in, kh, kw]
    assert bool((weight != 0).all())
    mask = ps.keep_mask(weight, "2:4", criterion, input_dim=1, key="conv")
    assert bool((_groups(mask, 1, 4) == 2).all())
    # a mask grouped along the kernel's last axis instead would not pass this for every position
    kept = (weight * mask) != 0
    for o in range(5):
        for i in range(3):
            for j in range(3):
                column = kept[o, :, i, j]
                assert column[:4].sum() == 2 and column[4:].sum() == 2


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_2_4_on_gpt2_conv1d_groups_along_axis_0(criterion):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=12, nx=8)  # weight is [in=8, out=12]
    torch.nn.init.normal_(layer.weight, 0.0, 1.0)
    weight = layer.weight.detach()
    assert bool((weight != 0).all())
    target = next(t for t in ps.find_targets(nn.Sequential(layer, nn.Linear(12, 2))) if t.kind == "Conv1D")
    assert target.input_dim == 0
    mask = ps.keep_mask(weight, "2:4", criterion, input_dim=target.input_dim, key="c")
    assert bool((_groups(mask, 0, 4) == 2).all())
    # for each output, two of every four consecutive inputs survive
    kept = (weight * mask) != 0
    assert bool((kept.reshape(2, 4, 12).sum(dim=1) == 2).all())


def test_2_4_magnitude_keeps_the_two_largest_of_each_group():
    weight = _weight(6, 16)
    mask = ps.keep_mask(weight, "2:4", "magnitude", input_dim=1)
    groups = weight.abs().reshape(6, 4, 4)
    kept = mask.reshape(6, 4, 4)
    for row in range(6):
        for g in range(4):
            assert groups[row, g][~kept[row, g]].max() <= groups[row, g][kept[row, g]].min()


@pytest.mark.parametrize("pattern,n,m", [("1:4", 1, 4), ("4:8", 4, 8), ("2:8", 2, 8)])
def test_other_nm_patterns(pattern, n, m):
    weight = _weight(4, 16, 3)
    mask = ps.keep_mask(weight, pattern, "magnitude", input_dim=1)
    assert bool((_groups(mask, 1, m) == n).all())
    assert ps.parse_level(pattern).sparsity == pytest.approx(1 - n / m)


def test_2_4_through_apply_on_tiny_gpt2():
    model = tiny_gpt2()
    targets = ps.find_targets(model)
    assert targets and all(t.kind == "Conv1D" and t.input_dim == 0 for t in targets)
    plan = ps.Plan({t.name: "2:4" for t in targets}, {t.name: t.params for t in targets})
    masked = ps.apply(model, plan)
    masks = ps.masks_of(masked)
    assert set(masks) == {t.name for t in targets}
    for name, mask in masks.items():
        assert bool((_groups(mask, 0, 4) == 2).all()), name
        weight = masked.get_submodule(name).weight  # the masked weight the model computes with
        assert bool((_groups(weight != 0, 0, 4) == 2).all()), name


# ---- apply removes the planned fraction per target ------------------------------------------


def test_apply_removes_the_planned_fraction_of_each_target(digits_model):
    targets = ps.find_targets(digits_model)
    levels = dict(zip([t.name for t in targets], [0.15, 0.5, 0.77, 0.9], strict=True))
    plan = ps.Plan(levels, {t.name: t.params for t in targets})
    for criterion in ("magnitude", "random"):
        plan.criterion = criterion
        plan.seed = 1
        masks = ps.masks_of(ps.apply(digits_model, plan))
        assert set(masks) == set(levels)
        for target in targets:
            removed = int((~masks[target.name]).sum())
            assert abs(removed - levels[target.name] * target.params) <= 1, (criterion, target.name)
