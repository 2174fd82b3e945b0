"""Structured targets (channels, heads, neurons, blocks) in the common API: find, choose, mask, shrink.

A structured :class:`Target` carries its :class:`~prunescope.structure.UnitGroup`; a level is the
fraction of the group's units removed (a block is removed whole, level 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .criteria import check_criterion
from .errors import PrunescopeError
from .target import Target

STRUCTURED_GRANULARITIES = ("channel", "head", "neuron", "block")
BLOCK_LEVEL = "1"
"""The one level of a block target: the block becomes the identity."""


def structured_targets(model: nn.Module, granularity: str, example: Any = None, head_mode: str = "kv_group") -> list[Target]:
    """One :class:`Target` per unit group of ``granularity`` (channel groups need ``example``)."""
    from .structure import find_channel_groups, find_residual_blocks, find_transformer_groups
    from .structure.transformer_layout import has_transformer_layers

    if granularity == "channel":
        if example is None:
            raise PrunescopeError("granularity 'channel' traces the model: give example= (one batch)")
        groups = find_channel_groups(model, example)
    elif granularity == "block" and not has_transformer_layers(model):
        if example is None:
            raise PrunescopeError("residual blocks of a CNN are found by running the model: give example= (one batch)")
        groups = find_residual_blocks(model, example)
    else:
        groups = find_transformer_groups(model, granularity, head_mode=head_mode)
    return [
        Target(
            name=group.name,
            kind=f"head/{head_mode}" if granularity == "head" else granularity,
            shape=(group.units,),
            params=group.params,
            flops=None if group.flops_per_unit is None else group.flops_per_unit * group.units,
            input_dim=0,
            granularity=granularity,
            parameter="",
            group=group,
        )
        for group in groups
    ]


def units_removed(
    model: nn.Module, target: Target, level: float, criterion: str, seed: int = 0, round_to: int | None = None
) -> list[int]:
    """Indices of the units of ``target`` that ``level`` removes, lowest criterion score first."""
    from .structure import channel_unit_scores, unit_scores, units_to_remove

    group = target.group
    if target.granularity == "block":
        return [0]
    criterion = check_criterion(criterion, target.granularity)
    score = channel_unit_scores if target.granularity == "channel" else unit_scores
    scores = score(model, group, criterion, seed=seed)
    try:
        return units_to_remove(scores, level, group.units, round_to=round_to, min_units=group.min_units)
    except PrunescopeError as error:
        raise PrunescopeError(f"{target.granularity} group {target.name} ({group.units} units): {error}") from None


def mask_target(model: nn.Module, target: Target, remove: Sequence[int]) -> Callable[[], None]:
    """Emulate removing ``remove`` units of ``target`` in place, exactly; returns the bit-exact restore."""
    from .structure import mask_channels, mask_units

    mask = mask_channels if target.granularity == "channel" else mask_units
    return mask(model, target.group, remove)


def shrink_model(
    model: nn.Module, targets: Sequence[Target], removals: dict[str, list[int]], example: Any = None, head_mode: str = "kv_group"
) -> nn.Module:
    """A new, physically smaller model without the ``removals`` (group name -> unit indices)."""
    from .structure import shrink_channels, shrink_residual_blocks, shrink_transformer
    from .structure.transformer_layout import has_transformer_layers

    granularities = {t.granularity for t in targets if t.name in removals}
    if granularities == {"channel"}:
        if example is None:
            raise PrunescopeError("shrinking channel groups traces the model: give example= (one batch)")
        return shrink_channels(model, removals, example)
    if granularities == {"block"} and not has_transformer_layers(model):
        return shrink_residual_blocks(model, [t.group for t in targets if t.group is not None], removals)
    if granularities and granularities <= {"head", "neuron", "block"}:
        return shrink_transformer(model, removals, head_mode=head_mode)
    if not granularities:
        import copy

        return copy.deepcopy(model)
    raise PrunescopeError(f"cannot shrink a mix of {', '.join(sorted(granularities))} targets in one plan")


def head_mode_of(targets: Sequence[Target]) -> str:
    """The head mode the head targets were found with (``"kv_group"`` unless marked ``head/query``)."""
    return "query" if any(t.kind == "head/query" for t in targets) else "kv_group"


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def nonzero_parameters(model: nn.Module) -> int:
    """Distinct non-zero parameter values as the model computes them (tied weights counted once; a
    masked weight counts the values its mask keeps)."""
    from torch.nn.utils import parametrize

    tensors = {}
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name, parametrization in module.parametrizations.items():
                tensors[id(parametrization.original)] = getattr(module, name).detach()
    for parameter in model.parameters():
        tensors.setdefault(id(parameter), parameter)
    return sum(int(t.count_nonzero()) for t in tensors.values())


__all__ = [
    "BLOCK_LEVEL", "STRUCTURED_GRANULARITIES", "head_mode_of", "mask_target", "nonzero_parameters", "parameter_count", "shrink_model",
    "structured_targets", "units_removed",
]
