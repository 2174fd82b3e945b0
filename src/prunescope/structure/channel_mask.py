"""Emulate removing channels of a group, in place and exactly, with a bit-exact restore.

Method: the consumers' input columns of the removed channels are zeroed (Conv/Linear weights with
role ``"in"``), which is exactly what removing them does to every Conv/Linear that reads them,
whatever lies between (BatchNorm with bias, activations, residual additions, pooling, concat,
flatten, depthwise convs, squeeze-excitation gates): those ops act per channel, so a removed
channel can only reach the output through a consumer's input columns. Zeroing the producer's
rows instead would not be removal, because a BatchNorm bias or a sigmoid turns a zero back into
a non-zero. The one place channels meet without a weight is a normalisation over channels
(LayerNorm, GroupNorm): there a forward hook recomputes the norm over the kept channels only, as
the smaller model does (GroupNorm regroups the kept channels into its groups, as Torch-Pruning's
shrunk GroupNorm does). The producers' rows are left alone, so masking costs no copy of the
model. Groups that would change the model's output (role ``"output"``) cannot be masked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PrunescopeError
from .groups import UnitGroup
from .transformer_mask import check_removal, slice_indices


def _positions(group: UnitGroup, tensor: str, units: Sequence[int]) -> torch.Tensor:
    return torch.cat([slice_indices(s.offset, s.width, units) for s in group.slices if s.tensor == tensor]).sort().values


def _norm_hook(module: nn.Module, kept: torch.Tensor, name: str) -> Callable:
    """A forward hook making a LayerNorm/GroupNorm compute over the kept channels only (removed ones give 0)."""
    if isinstance(module, nn.GroupNorm) and kept.numel() % module.num_groups:
        raise PrunescopeError(
            f"GroupNorm {name} has {module.num_groups} groups; keeping {kept.numel()} of its {module.num_channels} "
            f"channels is not a multiple of {module.num_groups}. Use round_to={module.num_groups}"
        )
    channels_last = type(module).forward is nn.LayerNorm.forward

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        index = kept.to(x.device)
        weight = mod.weight.index_select(0, index) if mod.weight is not None else None
        bias = mod.bias.index_select(0, index) if mod.bias is not None else None
        if isinstance(mod, nn.GroupNorm):
            y = F.group_norm(x.index_select(1, index), mod.num_groups, weight, bias, mod.eps)
            return x.new_zeros(x.shape).index_copy(1, index, y)
        axis = -1 if channels_last or x.shape[1] != mod.normalized_shape[0] else 1
        moved = x.movedim(axis, -1)
        y = F.layer_norm(moved.index_select(-1, index), (index.numel(),), weight, bias, mod.eps)
        return moved.new_zeros(moved.shape).index_copy(-1, index, y).movedim(-1, axis)

    return hook


def mask_channels(model: nn.Module, group: UnitGroup, remove: Sequence[int]) -> Callable[[], None]:
    """Make ``model`` compute exactly as the model with units ``remove`` of ``group`` removed, in place.

    Args:
        model: the model ``group`` was found on (by :func:`find_channel_groups`).
        group: a ``"channel"`` UnitGroup.
        remove: unit indices in ``[0, group.units)``, distinct; at least ``group.min_units`` must remain.

    Returns:
        ``restore()``: puts every changed weight back bit for bit and removes the hooks.
    """
    if group.granularity != "channel":
        raise PrunescopeError(f"mask_channels takes channel groups; {group.name} is a {group.granularity!r} group")
    indices = check_removal(group, remove)
    if not indices:
        return lambda: None
    if any(s.role == "output" for s in group.slices):
        raise PrunescopeError(f"group {group.name} changes the model's output width; it can be shrunk, not masked")
    parameters = dict(model.named_parameters())
    modules = dict(model.named_modules())
    missing = sorted({s.tensor for s in group.slices if s.tensor not in parameters and s.role in ("in", "norm")
                      and s.tensor.endswith((".weight", ".bias"))})
    if missing:
        raise PrunescopeError(f"group {group.name} does not match this model: it has no parameter {', '.join(missing[:3])}")
    norms = []
    for tensor in dict.fromkeys(s.tensor for s in group.slices if s.role == "norm" and s.tensor.endswith(".weight")):
        module_name = tensor.rsplit(".", 1)[0]
        module = modules.get(module_name)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            size = parameters[tensor].shape[0]
            removed = set(_positions(group, tensor, indices).tolist())
            kept = torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)
            norms.append((module, _norm_hook(module, kept, module_name)))
    saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    handles = []

    def restore() -> None:
        with torch.no_grad():
            for tensor, dim, index, original in reversed(saved):
                tensor.index_copy_(dim, index, original)
        for handle in handles:
            handle.remove()
        saved.clear()
        handles.clear()

    try:
        with torch.no_grad():
            for s in group.slices:
                if s.role != "in":
                    continue
                tensor = parameters[s.tensor]
                index = slice_indices(s.offset, s.width, indices).to(tensor.device)
                saved.append((tensor, s.dim, index, tensor.index_select(s.dim, index).clone()))
                tensor.index_fill_(s.dim, index, 0)
        for module, hook in norms:
            handles.append(module.register_forward_hook(hook))
    except BaseException:
        restore()
        raise
    return restore
