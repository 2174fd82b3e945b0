"""apply (masks): a masked copy whose masks live in the state_dict, save, reload and bake in."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file

import prunescope as ps
from prunescope.digits import DigitsCNN

MASK_SUFFIX = ".parametrizations.weight.0.mask"


@pytest.fixture
def plan(digits_profile):
    return ps.allocate(digits_profile, 0.7, method="threshold")


@pytest.fixture
def images(digits_test):
    return torch.cat([x for x, _ in digits_test[:2]])


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_apply_leaves_the_input_model_untouched(digits_model, plan):
    model = copy.deepcopy(digits_model)
    model.train()
    before = snapshot(model)
    masked = ps.apply(model, plan)
    assert masked is not model
    assert_unchanged(model, before)
    assert not ps.masks_of(model)
    assert all(not torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())


def test_masked_state_dict_holds_the_masks(digits_model, plan, images):
    masked = ps.apply(digits_model, plan)
    state = masked.state_dict()
    mask_keys = sorted(k for k in state if k.endswith(MASK_SUFFIX))
    assert mask_keys == sorted(f"{name}{MASK_SUFFIX}" for name in plan.levels)
    for name, level in plan.levels.items():
        mask = state[f"{name}{MASK_SUFFIX}"]
        assert mask.dtype == torch.bool
        assert abs(int((~mask).sum()) - level * mask.numel()) <= 1
        # the weight the model computes with is zero exactly where the mask is False
        weight = masked.get_submodule(name).weight
        assert torch.equal(weight == 0, ~mask)
    # the masked model really computes with sparse weights
    assert not torch.equal(_outputs(masked, images), _outputs(digits_model, images))


def test_masked_model_round_trips_through_torch_save(digits_model, plan, images, tmp_path):
    masked = ps.apply(digits_model, plan)
    path = tmp_path / "masked.pt"
    torch.save(masked.state_dict(), path)
    fresh = ps.load_masked(DigitsCNN(), torch.load(path, weights_only=True))
    assert torch.equal(_outputs(fresh, images), _outputs(masked, images))
    fresh_masks, masks = ps.masks_of(fresh), ps.masks_of(masked)
    assert set(fresh_masks) == set(plan.levels)
    assert all(torch.equal(fresh_masks[name], masks[name]) for name in masks)


def test_masked_model_round_trips_through_safetensors(digits_model, plan, images, tmp_path):
    masked = ps.apply(digits_model, plan)
    path = tmp_path / "masked.safetensors"
    save_file({k: v.contiguous() for k, v in masked.state_dict().items()}, path)
    fresh = ps.load_masked(DigitsCNN(), load_file(path))
    assert torch.equal(_outputs(fresh, images), _outputs(masked, images))
    assert set(ps.masks_of(fresh)) == set(plan.levels)


def test_make_permanent_bakes_in_the_zeros(digits_model, plan, images):
    masked = ps.apply(digits_model, plan)
    masks = {k: v.clone() for k, v in ps.masks_of(masked).items()}
    before = _outputs(masked, images)
    permanent = ps.make_permanent(masked)
    assert torch.equal(_outputs(permanent, images), before)
    assert not ps.masks_of(permanent)
    assert set(permanent.state_dict()) == set(digits_model.state_dict())
    for name, mask in masks.items():
        weight = permanent.get_submodule(name).weight
        assert isinstance(weight, torch.nn.Parameter)
        assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).all())
    sparsity = ps.sparsity_of(permanent)
    for name, level in plan.levels.items():
        assert sparsity[name] == pytest.approx(level, abs=1 / masks[name].numel() + 1e-12)
    # a plain model of the same architecture loads it strictly
    plain = DigitsCNN()
    plain.load_state_dict(permanent.state_dict())
    assert torch.equal(_outputs(plain, images), before)


def test_gradients_reach_only_kept_weights(digits_model, plan, digits_test):
    masked = ps.apply(digits_model, plan).train()
    x, y = digits_test[0]
    torch.nn.functional.cross_entropy(masked(x), y).backward()
    for name, mask in ps.masks_of(masked).items():
        module = masked.get_submodule(name)
        grad = module.parametrizations.weight.original.grad
        assert grad is not None and bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any())


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_apply_prunes_what_scan_measured(digits_model, digits_val, criterion):
    """A one-target plan evaluates to exactly the scanned cell's value (same masks, same seed)."""
    evaluator = ps.Evaluator(digits_model, digits_val[:1], "loss")
    targets = ps.find_targets(digits_model, include=["features.3", "classifier.1"])
    profile = ps.scan(digits_model, evaluator, targets, levels=[0.6, "2:4"], criterion=criterion, seed=5)
    for cell in profile.cells:
        plan = ps.Plan({cell.target: cell.level}, {cell.target: profile.target(cell.target).params}, criterion=criterion, seed=5)
        # equal up to float rounding (the cell's value is dense mean + mean paired difference)
        assert evaluator.evaluate(ps.apply(digits_model, plan)).value == pytest.approx(cell.value, rel=1e-12)


def test_apply_refuses_bad_plans(digits_model, plan):
    masked = ps.apply(digits_model, plan)
    with pytest.raises(ps.PrunescopeError, match="already masked"):
        ps.apply(masked, plan, inplace=True)
    with pytest.raises(ps.PrunescopeError, match="does not have: nope"):
        ps.apply(digits_model, ps.Plan({"nope": 0.5}, {"nope": 3}))
    with pytest.raises(ps.PrunescopeError, match="shrink must be True"):
        ps.apply(digits_model, plan, shrink="banana")
    with pytest.raises(ps.PrunescopeError, match="a weight plan applies as masks"):
        ps.apply(digits_model, plan, shrink=True)
    with pytest.raises(TypeError):
        ps.apply(digits_model, plan, "shrink")  # keyword-only: a positional mode is not silently taken
    with pytest.raises(ps.PrunescopeError, match="does not have"):
        ps.load_masked(torch.nn.Sequential(torch.nn.Linear(2, 2)), masked.state_dict())


def test_a_plan_from_a_seeded_random_scan_applies_the_scanned_masks(digits_model, digits_val, tmp_path):
    """Regression: a plan allocated from a scan with criterion random, seed 7 was applied with seed 0."""
    evaluator = ps.Evaluator(digits_model, digits_val[:1], "loss")
    targets = ps.find_targets(digits_model, include=["features.3", "classifier.1"])
    profile = ps.scan(digits_model, evaluator, targets, levels=[0.5], criterion="random", seed=7)
    plan = ps.allocate(profile, ps.Budget(sparsity=0.5), method="uniform")
    plan = ps.Plan.load(plan.save(tmp_path / "plan.json"))  # the settings survive the file
    assert (plan.criterion, plan.seed) == ("random", 7)
    for cell in profile.cells:
        one = ps.Plan({cell.target: plan.levels[cell.target]}, plan.params, criterion=plan.criterion, seed=plan.seed)
        assert evaluator.evaluate(ps.apply(digits_model, one)).value == pytest.approx(cell.value, rel=1e-12)
    seed_zero = ps.Plan(plan.levels, plan.params, criterion="random", seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(ps.masks_of(ps.apply(digits_model, plan)).values(),
                                                     ps.masks_of(ps.apply(digits_model, seed_zero)).values(), strict=True))


def test_a_structured_plan_carries_the_scans_seed_and_rounding(digits_model, digits_val):
    evaluator = ps.Evaluator(digits_model, digits_val[:1], "accuracy")
    example = digits_val[0]
    targets = ps.find_targets(digits_model, "channel", example=example)
    profile = ps.scan(digits_model, evaluator, targets, levels=[0.5], criterion="random", seed=3, round_to=2)
    plan = ps.allocate(profile, ps.Budget(sparsity=0.5), method="uniform")
    assert (plan.seed, plan.round_to) == (3, 2)
    for cell in profile.cells:
        one = ps.Plan({cell.target: 0.5}, plan.params, criterion="random", granularity="channel", seed=3, round_to=2,
                      details=plan.details)
        assert evaluator.evaluate(ps.apply(digits_model, one)).value == pytest.approx(cell.value, abs=1e-12)


# ---- saving a masked model, and baking one of several copies -------------------------------------


def _hf_weight_plan(model):
    targets = ps.find_targets(model)
    return ps.Plan({t.name: 0.5 for t in targets}, {t.name: t.params for t in targets})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masked_hf_model_save_pretrained_reloads_the_same_logits(family, tmp_path):
    """Defect: save_pretrained wrote ``...parametrizations.weight.original`` / ``.0.mask`` keys, which
    from_pretrained drops with no error, re-initialising those weights at random."""
    from helpers import tiny_gpt2, tiny_llama
    from transformers import AutoModelForCausalLM

    model = (tiny_llama if family == "llama" else tiny_gpt2)().eval()
    masked = ps.apply(model, _hf_weight_plan(model))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = masked(input_ids=ids).logits
    for index, candidate in enumerate([masked, copy.deepcopy(masked)]):  # the deep copy carries the baking save
        candidate.save_pretrained(tmp_path / str(index))
        assert not any("parametrizations" in key for key in load_file(tmp_path / str(index) / "model.safetensors"))
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / str(index)).eval()(input_ids=ids).logits, expected)
    assert ps.masks_of(masked)  # the user's model keeps its masks
    permanent = ps.make_permanent(masked)
    assert "save_pretrained" not in permanent.__dict__
    permanent.save_pretrained(tmp_path / "baked")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "baked").eval()(input_ids=ids).logits, expected)


def test_make_permanent_on_a_deep_copy_leaves_the_other_copies_masked(digits_model, plan, images):
    """Defect: copies share torch's generated ParametrizedConv2d class, and baking one copy deleted the
    weight property from it: the others failed with "'ParametrizedConv2d' object has no attribute 'weight'"."""
    masked = ps.apply(digits_model, plan)
    expected = _outputs(masked, images)
    backup, other = copy.deepcopy(masked), copy.deepcopy(masked)
    ps.make_permanent(backup)
    assert torch.equal(_outputs(backup, images), expected)
    for model in (masked, other):
        assert set(ps.masks_of(model)) == set(plan.levels)
        assert torch.equal(_outputs(model, images), expected)
    assert torch.equal(_outputs(ps.make_permanent(other), images), expected)
    assert torch.equal(_outputs(masked, images), expected) and set(ps.masks_of(masked)) == set(plan.levels)
    assert type(ps.make_permanent(masked).get_submodule(next(iter(plan.levels)))) in (torch.nn.Conv2d, torch.nn.Linear)
