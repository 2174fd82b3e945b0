"""Apply a Plan: masks that live in the state_dict, and baking them into plain weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .criteria import is_calibrated
from .errors import PrunescopeError
from .layer_kinds import weight_input_dim
from .masks import keep_mask
from .plan import Plan
from .target import Target, prunable_modules
from .weight_masks import WeightMask, guard_save_pretrained


def apply(
    model: nn.Module,
    plan: Plan,
    *,
    shrink: bool = False,
    inplace: bool = False,
    example: Any = None,
    calibration: Iterable[Any] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Prune ``model`` as ``plan`` says and return the pruned model (a copy unless ``inplace``).

    A weight plan registers a :class:`~prunescope.weight_masks.WeightMask` parametrization on
    each planned weight: the model computes with masked weights, the masks appear in
    ``state_dict()`` as ``<module>.parametrizations.weight.0.mask``, and gradients reach the kept
    weights only. The masks follow the plan's criterion, seed and options, which a plan
    allocated from a profile takes from its scan, so they equal the scanned ones.

    Structured plans (channel, head, neuron, block) take the same units the scan removed (the
    plan's criterion, seed, round_to and head mode): by default their removal is emulated in a
    copy (zeroed consumer columns; a removed block is bypassed by a forward hook, which
    ``state_dict`` does not carry); ``shrink=True`` returns a new, physically smaller model (the
    input model is never changed). Channel plans trace the model and need ``example`` (one batch).

    A masked transformers model's ``save_pretrained`` saves a copy with the masks baked in, so plain
    ``from_pretrained`` reloads it (:func:`prunescope.save` writes the other formats).

    A plan made with a calibrated criterion (``"wanda"``, ``"sparsegpt"``) is applied by
    :func:`prunescope.prune_oneshot` on ``calibration`` (a list of batches, required): block by
    block, each block calibrated on the outputs of the pruned blocks before it, so its masks
    differ from the scan's (which pruned one layer of the dense model at a time). SparseGPT also
    updates the kept weights; the masks are registered the same way, and the returned model's
    ``prunescope_report`` is the one-shot report (per-layer errors, seconds). ``progress`` shows
    a progress bar where the work is long (calibrated plans).
    """
    Plan.check_for(plan, model)  # a Plan, whose names and sizes are this model's
    if not isinstance(shrink, bool):
        raise PrunescopeError(f"shrink must be True (a physically smaller model) or False (masks); got {shrink!r}")
    if plan.granularity != "weight":
        return _apply_structured(model, plan, shrink, inplace, example)
    if shrink:
        raise PrunescopeError("shrink=True removes structured units; a weight plan applies as masks (shrink=False)")
    if is_calibrated(plan.criterion):
        if calibration is None:
            raise PrunescopeError(f"plan criterion {plan.criterion!r} calibrates on data: pass calibration= "
                                  "(a list of batches, e.g. held-out windows of the evaluation text)")
        from .oneshot import prune_oneshot

        return prune_oneshot(model, calibration, criterion=plan.criterion, level=plan.levels, inplace=inplace, mask=True,
                             progress=progress, **plan.options)
    result = model if inplace else copy.deepcopy(model)
    modules = dict(prunable_modules(result))  # every planned name is one of them: Plan.check_for refused others
    for name, level in plan.levels.items():
        if level == 0:
            continue
        module = modules[name]
        if parametrize.is_parametrized(module, "weight"):
            raise PrunescopeError(f"{name}.weight is already masked; call make_permanent first")
        mask = keep_mask(module.weight, level, plan.criterion, weight_input_dim(module), seed=plan.seed, key=name)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))
    return guard_save_pretrained(result)


def _apply_structured(model: nn.Module, plan: Plan, shrink: bool, inplace: bool, example: Any) -> nn.Module:
    from .structure import UnitGroup
    from .structured import mask_target, shrink_model, units_removed

    groups = plan.details.get("groups")
    if not groups:
        raise PrunescopeError(f"this {plan.granularity} plan has no unit groups; make it with allocate() from a scan profile")
    unknown = [name for name in plan.levels if name not in groups]
    if unknown:
        raise PrunescopeError(f"plan levels name groups it has no description of: {', '.join(unknown[:5])}")
    targets = [
        Target(name=name, kind=plan.granularity, shape=(groups[name]["units"],), params=plan.params[name], input_dim=0,
               granularity=plan.granularity, parameter="", group=UnitGroup.from_dict(groups[name]))
        for name in plan.levels
    ]
    removals = {
        t.name: units_removed(model, t, float(plan.levels[t.name]), plan.criterion, plan.seed, plan.round_to)
        for t in targets
        if plan.levels.get(t.name, 0) > 0
    }
    if shrink:
        if inplace:
            raise PrunescopeError("shrink=True builds a new model; inplace=True is not accepted with it")
        return shrink_model(model, targets, removals, example, plan.head_mode or "kv_group")
    result = model if inplace else copy.deepcopy(model)
    for target in targets:
        if target.name in removals:
            mask_target(result, target, removals[target.name])
    return guard_save_pretrained(result)
