"""The layer-wise baselines of allocate (erk, lamp, owl) on cases small enough to compute by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot, tiny_llama, token_batches
from torch import nn

import prunescope as ps
from prunescope.baselines.lamp import lamp_scores
from prunescope.baselines.owl import block_groups


def _profile(targets, criterion="magnitude", cells=(), provenance=None, granularity="weight"):
    """A profile of ``targets`` with hand-set cells: drop = change (loss, lower is better)."""
    return ps.Profile(metric="loss", higher_is_better=False, dense_value=1.0, criterion=criterion, granularity=granularity,
                      levels=sorted({c.level for c in cells}), targets=list(targets), cells=list(cells),
                      provenance=dict(provenance or {}))


def _cell(target, level, change):
    return ps.Cell(target, repr(level), level, 1.0 + change, change, None, None, 1, 0.0)


def _linear_target(name, shape):
    return ps.Target(name, "Linear", tuple(shape), shape[0] * shape[1])


def _assert_one_line_refusal(call, *words):
    with pytest.raises(ps.PrunescopeError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# ---- ERK -----------------------------------------------------------------------------------


def test_erk_makes_the_small_layer_dense_and_rescales_the_rest():
    targets = [_linear_target("a", (2, 4)), _linear_target("b", (10, 10)), _linear_target("c", (20, 20))]
    cells = [_cell("b", 0.5, 1.0), _cell("b", 0.9, 3.0), _cell("c", 0.5, 1.0), _cell("c", 0.9, 3.0),
             _cell("a", 0.5, 0.5), _cell("a", 0.9, 1.0)]
    plan = ps.allocate(_profile(targets, cells=cells), ps.Budget(sparsity=0.5), method="erk")
    # raw densities (n_in + n_out) / (n_in n_out): a 6/8, b 20/100, c 40/400; keep 254 of 508 weights
    epsilon = 254 / (0.75 * 8 + 0.2 * 100 + 0.1 * 400)
    assert 0.75 * epsilon > 1  # a would be denser than dense: a is kept whole, epsilon recomputed over b, c
    epsilon = (254 - 8) / (0.2 * 100 + 0.1 * 400)
    assert epsilon == pytest.approx(4.1)
    assert plan.levels == pytest.approx({"a": 0.0, "b": 1 - 0.2 * 4.1, "c": 1 - 0.1 * 4.1})
    assert abs(plan.sparsity - 0.5) < 1e-6
    assert plan.details["erk"]["dense"] == ["a"] and plan.details["erk"]["epsilon"] == pytest.approx(4.1)
    # the profile's additive prediction at those levels: b at 0.18 of the way to 0.5, c between 0.5 and 0.9
    assert plan.predicted_drop == pytest.approx(0.18 / 0.5 * 1.0 + (1.0 + (0.59 - 0.5) / 0.4 * 2.0), abs=1e-4)


def test_erk_counts_kernel_dimensions_of_a_convolution():
    conv = ps.Target("conv", "Conv2d", (4, 2, 3, 3), 72)
    targets = [conv, _linear_target("fc", (8, 72))]
    plan = ps.allocate(_profile(targets), ps.Budget(sparsity=0.5), method="erk")
    raw_conv, raw_fc = (4 + 2 + 3 + 3) / 72, (8 + 72) / 576
    epsilon = 0.5 * (72 + 576) / (raw_conv * 72 + raw_fc * 576)
    assert plan.levels == pytest.approx({"conv": 1 - raw_conv * epsilon, "fc": 1 - raw_fc * epsilon})
    assert abs(plan.sparsity - 0.5) < 1e-6


def test_erk_holds_a_layer_at_the_maximum_level_and_still_meets_the_budget():
    targets = [_linear_target("small", (50, 50)), _linear_target("big", (1000, 1000))]
    plan = ps.allocate(_profile(targets), ps.Budget(sparsity=0.9898), method="erk")
    kept = (1 - 0.9898) * (2500 + 1_000_000)
    assert 0.002 * kept / (0.04 * 2500 + 0.002 * 1_000_000) < 0.01  # big would keep under 1%: held at 99% removed
    assert plan.levels["big"] == pytest.approx(0.99)
    assert plan.levels["small"] == pytest.approx(1 - (kept - 10_000) / 2500)
    assert abs(plan.sparsity - 0.9898) < 1e-6 and plan.details["erk"]["at_max_level"] == ["big"]


# ---- LAMP ----------------------------------------------------------------------------------


def _two_linears():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-3.0, 1.0], [4.0, -2.0]]))
        model[1].weight.copy_(torch.tensor([[2.5, -0.5], [1.0, 3.0], [-1.5, 2.0]]))
    return model


def test_lamp_scores_and_levels_by_hand():
    model = _two_linears()
    # ascending squares a: 1 4 9 16 (suffix sums 30 29 25 16); b: .25 1 2.25 4 6.25 9 (22.75 22.5 21.5 19.25 15.25 9)
    a = [1 / 30, 4 / 29, 9 / 25, 1.0]
    b = [0.25 / 22.75, 1 / 22.5, 2.25 / 21.5, 4 / 19.25, 6.25 / 15.25, 1.0]
    assert lamp_scores(model[0].weight).tolist() == pytest.approx(a)
    assert lamp_scores(model[1].weight).tolist() == pytest.approx(b)
    profile = _profile(ps.find_targets(model, exclude=[]), criterion="sparsegpt", provenance={"seed": 3, "options": {"block_size": 64, "damp": 0.05}},
                       cells=[_cell("0", 0.5, 0.2), _cell("1", 0.5, 0.4)])
    before = snapshot(model)
    # all ten scores ascending: b .011, a .033, b .044, b .105, a .138, b .208, a .36 ...
    plan = ps.allocate(profile, 0.4, method="lamp", model=model)  # 4 removed: 1 of a, 3 of b
    assert plan.levels == pytest.approx({"0": 1 / 4, "1": 3 / 6})
    plan = ps.allocate(profile, 0.45, method="lamp", model=model)  # 4.5: the 5th weight (a's .138) half removed
    assert plan.levels == pytest.approx({"0": 1.5 / 4, "1": 3 / 6})
    assert abs(plan.sparsity - 0.45) < 1e-6
    assert plan.details["lamp"]["threshold"] == pytest.approx(4 / 29)
    # a SparseGPT profile gives a SparseGPT plan at LAMP's levels, with the scan's removal settings
    assert (plan.criterion, plan.seed, plan.options) == ("sparsegpt", 3, {"block_size": 64, "damp": 0.05})
    assert plan.predicted_drop == pytest.approx(0.375 / 0.5 * 0.2 + 0.4, abs=1e-5)
    beyond = ps.allocate(profile, 0.6, method="lamp", model=model)  # b at 4/6: past the scanned 0.5
    assert beyond.levels["1"] == pytest.approx(4 / 6) and beyond.predicted_drop is None
    assert_unchanged(model, before)


# ---- OWL -----------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.Linear(2, width, bias=False)
        self.mlp = nn.Linear(width, 2, bias=False)

    def forward(self, x):
        return self.mlp(self.attn(x))


class TwoBlocks(nn.Module):
    """Two blocks of different sizes and a head outside them; counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(2), Block(4)])
        self.head = nn.Linear(2, 2, bias=False)
        self.calls = 0
        with torch.no_grad():
            self.layers[0].attn.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 1.0]]))
            self.layers[0].mlp.weight.copy_(torch.tensor([[0.1, 0.0], [0.0, 1.0]]))
            self.layers[1].attn.weight.fill_(1.0)
            self.layers[1].mlp.weight.fill_(0.5)
            self.head.weight.copy_(torch.tensor([[9.0, 1.0], [1.0, 1.0]]))

    def forward(self, x):
        self.calls += 1
        for block in self.layers:
            x = block(x)
        return self.head(x)


def _owl_profile(model):
    return _profile(ps.find_targets(model, exclude=[]))


def test_owl_outlier_ratios_spread_and_exact_mean():
    model = TwoBlocks()
    batch = torch.eye(2)  # two tokens; every input norm below follows from the weights
    before = snapshot(model)
    plan = ps.allocate(_owl_profile(model), 0.5, method="owl", model=model, calibration=[batch], owl_m=2)
    owl = plan.details["owl"]
    assert owl["groups"] == {"layers.0": ["layers.0.attn", "layers.0.mlp"], "layers.1": ["layers.1.attn", "layers.1.mlp"],
                             "head": ["head"]}
    # block 0: inputs norms (1, 1) then (10, 1): A = 10 0 0 1 | 1 0 0 1, mean 13/8, one entry above 2 x mean
    # block 1: A = 1 (x8) | 0.5 sqrt(2) (x8): none above 2 x mean; head: inputs (2 sqrt2, 2 sqrt2), A ~ 9 1 1 1: one of four
    assert owl["outlier_ratios"] == pytest.approx({"layers.0": 1 / 8, "layers.1": 0.0, "head": 1 / 4})
    scaled = {"layers.0": 0.5, "layers.1": 0.0, "head": 1.0}
    params = {"layers.0": 8, "layers.1": 16, "head": 4}
    mean = sum(scaled[g] * params[g] for g in params) / 28  # 2/7, weighted by the groups' parameters
    expected = {g: 0.5 - 2 * 0.08 * (scaled[g] - mean) for g in params}  # more outliers, lower level
    assert owl["group_levels"] == pytest.approx(expected)
    assert plan.levels["layers.1.attn"] == plan.levels["layers.1.mlp"] == pytest.approx(expected["layers.1"])
    assert abs(plan.sparsity - 0.5) < 1e-6
    assert (owl["m"], owl["lambda"], owl["calibration_batches"]) == (2.0, 0.08, 1)
    assert model.calls == 1
    assert_unchanged(model, before)


def test_owl_clips_at_dense_and_shifts_the_rest_to_meet_the_budget():
    model = TwoBlocks()
    plan = ps.allocate(_owl_profile(model), 0.3, method="owl", model=model, calibration=[torch.eye(2)], owl_m=2, owl_lambda=0.5)
    # densities 0.7 + (u - 2/7) + t: the head's 0.7 + 5/7 passes 1, so it is kept dense and
    # 8 (0.7 + 3/14 + t) + 16 (0.7 - 2/7 + t) + 4 = 0.7 * 28 gives t = 29/420
    shift = 29 / 420
    levels = plan.details["owl"]["group_levels"]
    assert levels == pytest.approx({"layers.0": 1 - (0.7 + 3 / 14 + shift), "layers.1": 1 - (0.7 - 2 / 7 + shift), "head": 0.0})
    assert plan.details["owl"]["shift"] == pytest.approx(shift)
    assert abs(plan.sparsity - 0.3) < 1e-6


def test_owl_groups_by_transformer_block_and_applies():
    model = tiny_llama()
    profile = ps.Profile(metric="loss", higher_is_better=False, dense_value=1.0, criterion="magnitude", granularity="weight",
                         levels=[], targets=ps.find_targets(model), cells=[])
    before = snapshot(model)
    plan = ps.allocate(profile, 0.6, method="owl", model=model, calibration=token_batches(1))
    assert_unchanged(model, before)
    groups = plan.details["owl"]["groups"]
    assert list(groups) == ["model.layers.0", "model.layers.1"] and all(len(names) == 7 for names in groups.values())
    assert abs(plan.sparsity - 0.6) < 1e-6 and plan.predicted_drop is None
    zeros = ps.sparsity_of(ps.apply(model, plan))
    assert all(zeros[name] == pytest.approx(level, abs=0.01) for name, level in plan.levels.items())


def test_a_model_without_blocks_gives_each_layer_its_own_group():
    assert block_groups(_two_linears(), ["0", "1"]) == {"0": ["0"], "1": ["1"]}


# ---- refusals ------------------------------------------------------------------------------


def test_bad_input_is_refused_in_one_line_before_any_work():
    model = TwoBlocks()
    profile, batches = _owl_profile(model), [torch.eye(2)]
    for method in ("lamp", "owl"):
        _assert_one_line_refusal(lambda m=method: ps.allocate(profile, 0.5, method=m, calibration=batches), "needs the model")
    _assert_one_line_refusal(lambda: ps.allocate(profile, 0.5, method="owl", model=model), "calibration=")
    _assert_one_line_refusal(lambda: ps.allocate(profile, 0.5, method="owl", model=model, calibration=[]), "calibration=")
    _assert_one_line_refusal(lambda: ps.allocate(profile, ps.Budget(params=0.5), method="erk"), "Budget(sparsity=...)")
    channels = _profile(profile.targets, granularity="channel")
    _assert_one_line_refusal(lambda: ps.allocate(channels, 0.5, method="lamp", model=model), "granularity 'weight'")
    for lam in (-0.1, 0.6, "0.1", True):
        _assert_one_line_refusal(lambda v=lam: ps.allocate(profile, 0.5, method="owl", model=model, calibration=batches,
                                                            owl_lambda=v), "owl_lambda", "[0, 0.5]")
    for m in (0, -1.0, float("inf"), "5"):
        _assert_one_line_refusal(lambda v=m: ps.allocate(profile, 0.5, method="owl", model=model, calibration=batches,
                                                          owl_m=v), "owl_m")
    _assert_one_line_refusal(lambda: ps.allocate(profile, 0.5, method="lamp", model=model, owl_m=3), "method 'owl' only")
    _assert_one_line_refusal(lambda: ps.allocate(profile, 0.995, method="erk"), "budget unreachable")
    convs = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    _assert_one_line_refusal(lambda: ps.allocate(_profile(ps.find_targets(convs, exclude=[])), 0.5, method="owl",
                                                 model=convs, calibration=[torch.ones(1, 1, 3, 3)]), "Conv2d", "erk")
    assert model.calls == 0
