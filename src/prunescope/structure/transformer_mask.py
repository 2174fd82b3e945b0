"""Emulate the removal of transformer units in place, exactly, with a restore that undoes it bit for bit."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import PrunescopeError
from .groups import UnitGroup


def check_removal(group: UnitGroup, remove: Sequence[int]) -> list[int]:
    """``remove`` as a sorted list of distinct unit indices, refusing out-of-range indices and
    removals that would leave fewer than ``group.min_units`` units."""
    indices = []
    for index in remove:
        try:
            if isinstance(index, bool):
                raise TypeError
            indices.append(operator.index(index))
        except TypeError:
            raise PrunescopeError(f"unit indices of {group.name} must be integers; got {index!r}") from None
    if len(set(indices)) != len(indices):
        raise PrunescopeError(f"unit indices of {group.name} repeat: {sorted(indices)}")
    bad = [i for i in indices if not 0 <= i < group.units]
    if bad:
        raise PrunescopeError(f"unit indices {bad} are out of range for {group.name}, which has {group.units} {group.granularity} units (0..{group.units - 1})")
    if group.units - len(indices) < group.min_units:
        raise PrunescopeError(
            f"removing all {group.units} {group.granularity} units of {group.name} is not allowed: "
            f"at least {group.min_units} must remain (remove the whole block instead)"
        )
    return sorted(indices)


def slice_indices(offset: int, width: int, units: Sequence[int]) -> torch.Tensor:
    """Positions along a slice's axis owned by ``units`` (unit ``u`` owns ``offset + u*width ...``)."""
    return torch.tensor([offset + u * width + j for u in units for j in range(width)], dtype=torch.long)


def _identity_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    """Forward hook: the block returns its input hidden states, in the output structure it used."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise PrunescopeError(f"cannot bypass block {type(module).__name__}: its first input is not a hidden-states tensor")
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (hidden, *output[1:])
    raise PrunescopeError(
        f"cannot bypass block {type(module).__name__}: it returns {type(output).__name__}, "
        "not a tensor or a tuple starting with the hidden states"
    )


def mask_units(model: nn.Module, group: UnitGroup, remove: Sequence[int]) -> Callable[[], None]:
    """Make ``model`` compute as if units ``remove`` of ``group`` were removed, in place.

    Heads: the output projection's input columns of the removed heads are zeroed (each head's
    contribution to the output passes only through those columns, so this is exact; the o_proj bias
    stays, as it does in the shrunk model). Neurons: the down projection's input columns are zeroed.
    Blocks: a forward hook makes the block return its input hidden states unchanged.

    Returns:
        ``restore()``, which puts back the original values (bit-identical) and removes the hook.
    """
    indices = check_removal(group, remove)
    if not indices:
        return lambda: None
    if group.granularity == "block":
        handle = model.get_submodule(group.name).register_forward_hook(_identity_hook, with_kwargs=True)
        return handle.remove
    if group.granularity not in ("head", "neuron"):
        raise PrunescopeError(f"mask_units handles head, neuron and block groups; {group.name} is a {group.granularity!r} group")
    tensors = dict(model.named_parameters(remove_duplicate=False))
    zeroing = [s for s in group.slices if s.role == "in"]
    missing = [s.tensor for s in zeroing if s.tensor not in tensors]
    if missing or not zeroing:
        raise PrunescopeError(f"group {group.name} does not match this model: no parameter {', '.join(missing) or 'with role in'}")
    for s in zeroing:
        size = tensors[s.tensor].shape[s.dim]
        if s.offset + group.units * s.width > size:
            raise PrunescopeError(
                f"group {group.name} does not match this model: {s.tensor} has {size} entries along dim {s.dim}, "
                f"the group needs {s.offset + group.units * s.width} (was it found on another model?)"
            )
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for s in zeroing:
            tensor = tensors[s.tensor]
            saved.setdefault(s.tensor, tensor.detach().clone())
            tensor.index_fill_(s.dim, slice_indices(s.offset, s.width, indices).to(tensor.device), 0)

    def restore() -> None:
        with torch.no_grad():
            for name, original in saved.items():
                tensors[name].copy_(original)

    return restore
