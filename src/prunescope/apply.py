"""Apply a Plan: masks that live in the state_dict, and baking them into plain weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .errors import PrunescopeError
from .masks import CALIBRATED_CRITERIA, keep_mask
from .plan import Plan
from .targets import prunable_modules
from .weight_masks import WeightMask

MODES = ("mask", "shrink")


def apply(
    model: nn.Module,
    plan: Plan,
    mode: str = "mask",
    *,
    inplace: bool = False,
    seed: int = 0,
    example: Any = None,
    calibration: Iterable[Any] | None = None,
) -> nn.Module:
    """Prune ``model`` as ``plan`` says and return it (a copy unless ``inplace``).

    ``mode="mask"`` on a weight plan registers a :class:`WeightMask` parametrization on each
    planned weight: the model computes with masked weights, the masks appear in ``state_dict()``
    as ``<module>.parametrizations.weight.0.mask``, and gradients reach the kept weights only.
    Masks use the plan's criterion and the same seed as ``scan``, so they equal the scanned ones.

    Structured plans (channel, head, neuron, block) take the same units the scan removed:
    ``mode="mask"`` emulates their removal in a copy (zeroed consumer columns; a removed block is
    bypassed by a forward hook, which ``state_dict`` does not carry), and ``mode="shrink"``
    returns a new, physically smaller model (the input model is never changed). Channel plans
    trace the model and need ``example`` (one batch).

    A plan made with a calibrated criterion (``"wanda"``, ``"sparsegpt"``) is applied by
    :func:`prunescope.oneshot.prune_oneshot` on ``calibration`` (a list of batches, required):
    block by block, each block calibrated on the outputs of the pruned blocks before it, so its
    masks differ from the scan's (which pruned one layer of the dense model at a time). SparseGPT
    also updates the kept weights; the masks are registered the same way.
    """
    Plan.check_for(plan, model)  # a Plan, whose names and sizes are this model's
    if mode not in MODES:
        raise PrunescopeError(f"unknown apply mode {mode!r}; accepted: {', '.join(MODES)}")
    if plan.granularity != "weight":
        return _apply_structured(model, plan, mode, inplace, example)
    if mode == "shrink":
        raise PrunescopeError("mode 'shrink' removes structured units; a weight plan applies as mode 'mask'")
    if plan.criterion in CALIBRATED_CRITERIA:
        if calibration is None:
            raise PrunescopeError(f"plan criterion {plan.criterion!r} calibrates on data: pass calibration= "
                                  "(a list of batches, e.g. held-out windows of the evaluation text)")
        from .oneshot import prune_oneshot

        return prune_oneshot(model, calibration, plan.criterion, plan.levels, inplace=inplace, mask=True)[0]
    result = model if inplace else copy.deepcopy(model)
    modules = dict(prunable_modules(result))
    missing = [name for name in plan.levels if name not in modules]
    if missing:
        raise PrunescopeError(f"plan names layers this model does not have: {', '.join(missing[:5])}")
    for name, level in plan.levels.items():
        if level == 0:
            continue
        module = modules[name]
        if parametrize.is_parametrized(module, "weight"):
            raise PrunescopeError(f"{name}.weight is already masked; call make_permanent first")
        input_dim = 0 if type(module).__name__ == "Conv1D" else 1
        mask = keep_mask(module.weight, level, plan.criterion, input_dim, seed=seed, key=name)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))
    return result


def _apply_structured(model: nn.Module, plan: Plan, mode: str, inplace: bool, example: Any) -> nn.Module:
    from .structure import UnitGroup
    from .structured import mask_target, shrink, units_removed
    from .targets import Target

    groups = plan.details.get("groups")
    if not groups:
        raise PrunescopeError(f"this {plan.granularity} plan has no unit groups; make it with allocate() from a scan profile")
    head_mode = plan.details.get("head_mode", "kv_group")
    unknown = [name for name in plan.levels if name not in groups]
    if unknown:
        raise PrunescopeError(f"plan levels name groups it has no description of: {', '.join(unknown[:5])}")
    targets = [
        Target(name=name, kind=plan.granularity, shape=(groups[name]["units"],), params=plan.params[name], input_dim=0,
               granularity=plan.granularity, parameter="", group=UnitGroup.from_dict(groups[name]))
        for name in plan.levels
    ]
    removals = {
        t.name: units_removed(model, t, float(plan.levels[t.name]), plan.criterion, plan.details.get("seed", 0), plan.details.get("round_to"))
        for t in targets
        if plan.levels.get(t.name, 0) > 0
    }
    if mode == "shrink":
        if inplace:
            raise PrunescopeError("mode 'shrink' builds a new model; inplace=True is not accepted with it")
        return shrink(model, targets, removals, example, head_mode)
    result = model if inplace else copy.deepcopy(model)
    for target in targets:
        if target.name in removals:
            mask_target(result, target, removals[target.name])
    return result
