"""Coupled channel groups of CNNs and MLPs, derived from the traced graph (never hand-listed).

A group is one set of channels that can only be removed together: a conv's output rows with its
BatchNorm entries and every consumer's input columns, all producers of a residual stream, concat
offsets, flatten into Linear, depthwise convs, squeeze-excitation gates, layer scales. The
coupling comes from Torch-Pruning's DependencyGraph (see :mod:`.channel_graph`); this module
turns each of its groups into a :class:`UnitGroup` of plain data, and refuses what it cannot
express exactly.

Grouped (non-depthwise) convolutions keep their number of groups, so a removal must take the
same local channel from every conv group: there a unit is a *slot* (local channel ``k`` of each
of the ``g`` conv groups, ``g`` channels per unit).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PrunescopeError
from .channel_graph import (
    SUPPORTED_MODULES,
    ChannelTrace,
    tolerant_reshapes,
    unmapped_reason,
    unsupported_op,
)
from .channel_search import SearchBudget, SearchExceeded, bounded_search
from .groups import Slice, UnitGroup

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass
class CoupledGroup:
    """A :class:`UnitGroup` together with the Torch-Pruning items that remove it.

    ``items`` are ``(dependency, target positions, root channel of each position)`` from the
    full-range group; ``slot`` is ``(conv groups, channels per conv group)`` when units are slots.
    """

    group: UnitGroup
    items: list[tuple[Any, list[int], list[int]]]
    slot: tuple[int, int] | None
    channels: int

    def root_channels(self, units: Sequence[int]) -> set[int]:
        """Root channels owned by ``units``."""
        if self.slot is None:
            return set(units)
        conv_groups, per_group = self.slot
        return {j * per_group + u for u in units for j in range(conv_groups)}


class _Refused(Exception):
    """A group that cannot be removed exactly; the message says why."""


def _is_depthwise(conv: nn.Module) -> bool:
    return isinstance(conv, _CONVS) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _axes(trace: ChannelTrace, dep: Any) -> tuple[list[tuple[str, int, str]], tuple[int, int] | None, bool]:
    """Tensors a dependency prunes as ``(state_dict key, dim, role)``, the slot shape it imposes
    (grouped convs) and whether its positions are local to a conv group (grouped conv inputs)."""
    import torch_pruning as tp

    module = dep.target.module
    is_out = trace.graph.is_out_channel_pruning_fn(dep.handler)
    if isinstance(module, nn.Parameter):
        name = trace.names[module]
        return [(name, dep.target.pruning_dim % module.dim(), "norm")], None, False
    if isinstance(module, (tp.ops._ElementWiseOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._ReshapeOp,
                           tp.ops._SliceOp, tp.ops._ExpandOp, tp.ops._UnbindOp, tp.ops._OutputOp)):
        reason = unsupported_op(trace, dep.target)
        if reason:
            raise _Refused(reason)
        return [], None, False
    name = trace.names.get(module, "?")
    if not isinstance(module, SUPPORTED_MODULES):
        raise _Refused(f"module {name!r} ({type(module).__name__}) is not supported for channel pruning")
    prefix = f"{name}." if name else ""

    def present(*keys: str) -> list[str]:
        return [k for k in keys if getattr(module, k, None) is not None]

    if isinstance(module, _CONVS):
        if module.transposed:
            raise _Refused(f"transposed convolution {name!r} is not supported for channel pruning")
        if _is_depthwise(module):
            return [(prefix + k, 0, "out") for k in present("weight", "bias")], None, False
        if module.groups > 1:
            if module.groups == module.in_channels:
                raise _Refused(f"depthwise convolution {name!r} with a channel multiplier is not supported")
            if is_out:
                slot = (module.groups, module.out_channels // module.groups)
                return [(prefix + k, 0, "out") for k in present("weight", "bias")], slot, False
            return [(prefix + "weight", 1, "in")], (module.groups, module.in_channels // module.groups), True
        if is_out:
            return [(prefix + k, 0, "out") for k in present("weight", "bias")], None, False
        return [(prefix + "weight", 1, "in")], None, False
    if isinstance(module, nn.Linear):
        if is_out:
            return [(prefix + k, 0, "out") for k in present("weight", "bias")], None, False
        return [(prefix + "weight", 1, "in")], None, False
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1 or not module.elementwise_affine:
            raise _Refused(f"LayerNorm {name!r} must normalise one axis with a weight to be channel-pruned")
        return [(prefix + k, 0, "norm") for k in present("weight", "bias")], None, False
    if isinstance(module, nn.GroupNorm):
        if not module.affine:
            raise _Refused(f"GroupNorm {name!r} without affine parameters is not supported")
        return [(prefix + k, 0, "norm") for k in present("weight", "bias")], None, False
    if isinstance(module, nn.PReLU):
        if module.num_parameters == 1:
            return [], None, False
        return [(prefix + "weight", 0, "norm")], None, False
    keys = present("weight", "bias", "running_mean", "running_var")
    return [(prefix + k, 0, "norm") for k in keys], None, False


def _touches_output(trace: ChannelTrace, dep: Any) -> bool:
    import torch_pruning as tp

    node = dep.target
    if isinstance(node.module, tp.ops._OutputOp):
        return True
    if node.grad_fn not in trace.outputs:
        return False
    return not (isinstance(node.module, (nn.Linear, *_CONVS)) and trace.graph.is_in_channel_pruning_fn(dep.handler))


def _decompose(tensor: str, dim: int, role: str, per_unit: list[list[int]]) -> list[Slice]:
    """Slices whose union gives unit ``u`` exactly the positions ``per_unit[u]``."""
    first = per_unit[0]
    runs: list[tuple[int, int]] = []
    for p in first:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    width = runs[0][1]
    slices = [Slice(tensor, dim, start, width, role) for start, _ in runs]
    if any(length != width for _, length in runs) or any(
        sorted(p for s in slices for p in range(s.offset + u * width, s.offset + (u + 1) * width)) != positions
        for u, positions in enumerate(per_unit)
    ):
        raise _Refused(f"the channels of {tensor} are not a regular slice of the group's units (e.g. a channel shuffle)")
    return slices


def _coupled(trace: ChannelTrace, tp_group: Any, exclude_output: bool) -> CoupledGroup | None:
    items = [(item.dep, list(item.idxs), list(item.root_idxs)) for item in tp_group]
    root_dep = items[0][0]
    name = trace.names[root_dep.target.module]
    channels = len(items[0][1])
    axes = []
    slot = None
    output = False
    for dep, idxs, roots in items:
        tensors, needs_slot, local = _axes(trace, dep)
        output = output or _touches_output(trace, dep)
        if needs_slot is not None:
            if idxs != roots or (slot is not None and slot != needs_slot) or channels % needs_slot[0]:
                raise _Refused(
                    f"grouped convolution {trace.names.get(dep.target.module)!r} is coupled to channels it does not "
                    "own one to one; pruning it evenly across its groups is not supported here"
                )
            slot = needs_slot
        axes.append((tensors, idxs, roots, local))
    if output and exclude_output:
        return None
    units = channels if slot is None else channels // slot[0]
    coupled = CoupledGroup(UnitGroup(name, "channel", units, 0, ()), items, slot, channels)
    unit_of = {r: u for u in range(units) for r in coupled.root_channels([u])}  # root channel -> its unit
    parameters = dict(trace.model.named_parameters())
    state = trace.model.state_dict(keep_vars=True)
    seen: set[tuple] = set()
    slices: list[Slice] = []
    for tensors, idxs, roots, local in axes:
        for tensor, dim, role in tensors:
            if tensor not in state:
                raise _Refused(f"tensor {tensor} of the group is not in the model's state_dict")
            per_group = state[tensor].shape[dim]
            if not local and idxs and max(idxs) >= per_group:
                raise _Refused(
                    f"Torch-Pruning maps the group's channels to position {max(idxs)} of {tensor}, which has {per_group} "
                    f"along dim {dim} (a coupling it got wrong, e.g. through a chunk or split)"
                )
            owned: list[set[int]] = [set() for _ in range(units)]
            for i, r in zip(idxs, roots, strict=True):
                if r in unit_of:
                    owned[unit_of[r]].add(i % per_group if local else i)
            per_unit = [sorted(p) for p in owned]
            if not per_unit[0] or any(len(p) != len(per_unit[0]) for p in per_unit):
                raise _Refused(f"the channels of {tensor} do not split evenly over the group's units")
            if output and role == "out":
                role = "output"
            for s in _decompose(tensor, dim, role, per_unit):
                key = (s.tensor, s.dim, s.offset, s.width)
                if key not in seen:
                    seen.add(key)
                    slices.append(s)
    params = 0
    flops = 0.0
    for s in slices:
        if s.tensor in parameters:
            tensor = parameters[s.tensor]
            per_unit = tensor.numel() // tensor.shape[s.dim] * s.width
            params += per_unit
            module_name = s.tensor.rsplit(".", 1)[0]
            if s.tensor.endswith(".weight") and module_name in trace.positions:
                flops += 2.0 * per_unit * trace.positions[module_name]
    coupled.group = UnitGroup(name, "channel", units, params, tuple(slices), flops_per_unit=flops)
    return coupled


def _tp_groups(
    trace: ChannelTrace, refused: dict[str, str], budget: SearchBudget, roots: Collection[str] | None
) -> Iterator[tuple[str, Any]]:
    """Torch-Pruning's full-range group of every Conv/Linear not already in an earlier group (as
    ``DependencyGraph.get_all_groups``, but one group that Torch-Pruning fails to map, or whose
    search runs over ``budget``, is refused instead of ending or stalling the search); only the
    groups named in ``roots`` when given."""
    graph = trace.graph
    visited: set[int] = set()
    for module in list(graph.module2node):
        if not isinstance(module, (*_CONVS, nn.Linear)) or id(module) in visited:
            continue
        if roots is not None and trace.names.get(module) not in roots:
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if channels is None:
            continue
        name = trace.names[module]
        hits: list[Any] = []
        try:
            with tolerant_reshapes(trace, trace.unmapped, hits), warnings.catch_warnings(), bounded_search(budget):
                warnings.simplefilter("ignore")  # Torch-Pruning's shape-inference warnings; refusals are reported
                group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except SearchExceeded as why:  # what it reached is coupled to this root: one refusal for all of it
            visited.add(id(module))
            visited.update(id(dep.target.module) for dep, _ in why.reached if graph.is_out_channel_pruning_fn(dep.handler))
            refused[name] = f"the search for its channel coupling {why}, as when shortcuts are added into a slice of the channels"
            continue
        except Exception as error:
            visited.add(id(module))
            refused[name] = f"Torch-Pruning cannot map the channels of {name}: {type(error).__name__}: {str(error)[:160]}"
            continue
        if hits:
            refused[name] = unmapped_reason(trace, hits[0])
        visited.update(id(dep.target.module) for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler))
        if not hits:
            yield name, group


def coupled_groups(
    trace: ChannelTrace, *, exclude_output: bool = True, budget: SearchBudget | None = None,
    roots: Collection[str] | None = None,
) -> tuple[list[CoupledGroup], dict[str, str]]:
    """Every channel group of a traced model (or only those named in ``roots``), and the groups
    refused with their reasons; each group's dependency search is bounded by ``budget``
    (default ``SearchBudget()``)."""
    import torch_pruning as tp

    groups: list[CoupledGroup] = []
    refused: dict[str, str] = {}
    claimed: dict[tuple[int, int], str] = {}
    for name, tp_group in _tp_groups(trace, refused, budget or SearchBudget(), roots):
        try:
            coupled = _coupled(trace, tp_group, exclude_output)
        except _Refused as why:
            refused[name] = str(why)
            continue
        if coupled is None:
            continue
        for dep, idxs, _ in coupled.items:
            module = dep.target.module
            if trace.graph.is_out_channel_pruning_fn(dep.handler) and not type(module).__module__.startswith(tp.__name__):
                for i in idxs:  # each output channel of a module belongs to one group
                    owner = claimed.setdefault((id(dep.target.module), i), name)
                    if owner != name:
                        raise PrunescopeError(f"channel {i} of {trace.names.get(dep.target.module)} is claimed by groups {owner} and {name}")
        groups.append(coupled)
    return groups, refused


def bn_scales(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """Per-unit sum of |gamma| over the group's BatchNorm weights (float64, ``[group.units]``)."""
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    total = torch.zeros(group.units, dtype=torch.float64)
    found = False
    for s in group.slices:
        module = modules.get(s.tensor.rsplit(".", 1)[0])
        if s.tensor.endswith(".weight") and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            found = True
            gamma = parameters[s.tensor].detach().to(torch.float64)[s.offset: s.offset + group.units * s.width]
            total += gamma.abs().reshape(group.units, s.width).sum(1)
    if not found:
        raise PrunescopeError(f"group {group.name} has no BatchNorm, so 'bn_scale' cannot rank it; use 'l1' or 'l2'")
    return total
