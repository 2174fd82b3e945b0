"""Per-unit scores of structured targets (channel groups, heads, neurons), from the group's slices.

Removing a unit is emulated, as in ``scan``, by zeroing its ``role="in"`` slices: the consumer's
input columns (channels), the output projection's input columns (heads), the down projection's
input columns (neurons). Gradient scores are therefore summed over exactly those elements, which
makes ``taylor`` the first-order change of the very perturbation the scan measures:

- magnitude: ``sum |w|^p`` over every parameter slice of the unit, over the group's total (a share).
- snip ``sum |g w|``, taylor ``-sum g w``, fisher ``0.5 sum F w^2``: over the unit's "in" slices.
- head_importance (Michel et al. 2019): ``E_n |dl_n/dxi_u|`` for a gate ``xi_u`` (all ones) on the
  unit's slice of the output projection's input. ``dl/dxi_u = sum over the unit's o_proj columns of
  (dl/dW) * W`` exactly (the gate scales those columns' products), so it is read off per-sample
  gradients of the output projection, with no change to the model.
- activation: mean |x| of the unit's inputs to its consumers; apoz: the fraction of them that are
  non-zero (1 - APoZ of Hu et al. 2016). Both as shares of the group's total.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import PrunescopeError
from ..layer_kinds import is_conv1d
from ..structure.groups import UnitGroup
from .activations import FeatureActivations


def in_slice_tensors(group: UnitGroup) -> list[str]:
    """Names of the tensors a removal zeroes (the group's ``role="in"`` slices), in order."""
    return list(dict.fromkeys(s.tensor for s in group.slices if s.role == "in"))


def sum_over_units(group: UnitGroup, values: dict[str, torch.Tensor], roles: tuple[str, ...] | None = ("in",)) -> torch.Tensor:
    """Per unit, the sum of ``values[tensor]`` over the elements each slice gives the unit
    (slices of ``roles`` only; None: every slice whose tensor is in ``values``); float64 ``[units]``."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for s in group.slices:
        if (roles is not None and s.role not in roles) or s.tensor not in values:
            continue
        tensor = values[s.tensor].detach().to(torch.float64)
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor.movedim(s.dim, 0)
        owned = tensor[s.offset : s.offset + group.units * s.width].reshape(group.units, -1)
        total += owned.sum(1)
    return total


def share(values: torch.Tensor) -> torch.Tensor:
    """``values`` over their sum (left as is when the sum is 0)."""
    total = float(values.sum())
    return values / total if total > 0 else values


def magnitude_units(model: nn.Module, group: UnitGroup, p: float) -> torch.Tensor:
    """Share of the group's ``sum |w|^p`` (parameters of every slice) that each unit owns."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    masses = {s.tensor: parameters[s.tensor].detach().abs().to(torch.float64).pow(p) for s in group.slices if s.tensor in parameters}
    return share(sum_over_units(group, masses, roles=None))


def gradient_units(
    model: nn.Module, group: UnitGroup, method: str, grad: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]
) -> torch.Tensor:
    """snip / taylor / fisher per unit, summed over the unit's "in" slices (see the module docstring)."""
    from .weight_scores import gradient_scores

    parameters = dict(model.named_parameters(remove_duplicate=False))
    scores = {
        name: gradient_scores(method, parameters[name], grad.get(name), fisher.get(name)) for name in in_slice_tensors(group)
    }
    return sum_over_units(group, scores)


def gate_gradients(model: nn.Module, groups: list[UnitGroup]) -> tuple[Callable, Callable[[], dict[str, torch.Tensor]]]:
    """``(on_gradient, result)`` for :func:`.gradients.gradient_pass` with per-sample chunks:
    accumulates ``sum_n |d(w_n l_n)/dxi_u|`` per unit; ``result()`` divides by the total weight."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    totals = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    weight = [0.0]

    def on_gradient(grads: dict[str, torch.Tensor], chunk_weight: float) -> None:
        for group in groups:
            products = {name: grads[name] * parameters[name].detach() for name in in_slice_tensors(group)}
            totals[group.name] += sum_over_units(group, products).abs()
        weight[0] += chunk_weight

    return on_gradient, lambda: {name: total / weight[0] for name, total in totals.items()}


def consumer_features(model: nn.Module, group: UnitGroup) -> list[tuple[str, int, int]]:
    """``(module, offset, width)`` of every "in" slice whose positions index the module's input
    features directly (Linear, Conv1D, ungrouped Conv); grouped convs, whose weight indexes inputs
    within a group, are skipped. Refuses a group with no such consumer."""
    found = []
    for s in group.slices:
        if s.role != "in" or not s.tensor.endswith(".weight"):
            continue
        module_name = s.tensor[: -len(".weight")]
        module = model.get_submodule(module_name)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1:
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_conv1d(module):
            found.append((module_name, s.offset, s.width))
    if not found:
        raise PrunescopeError(f"group {group.name} has no Linear/Conv consumer whose inputs can be read per unit")
    return found


def activation_units(model: nn.Module, group: UnitGroup, stats: dict[str, FeatureActivations], statistic: str) -> torch.Tensor:
    """Per unit, the share of the group's mean |activation| (``"activation"``) or of its non-zero
    fraction (``"apoz"``: 1 - APoZ) over every consumer input the unit feeds."""
    numerator = torch.zeros(group.units, dtype=torch.float64)
    count = torch.zeros(group.units, dtype=torch.float64)
    for module_name, offset, width in consumer_features(model, group):
        entry = stats[module_name]
        per_feature = entry.abs_sum if statistic == "activation" else entry.nonzero
        owned = per_feature[offset : offset + group.units * width].reshape(group.units, width)
        numerator += owned.sum(1)
        count += width * entry.count
    return share(numerator / count)
