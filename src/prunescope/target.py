"""Target: one prunable unit of a model (a weight tensor, or a structured unit group), with its cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import PrunescopeError
from .layer_kinds import weight_input_dim
from .structure.groups import UnitGroup

GRANULARITIES = ("weight", "channel", "head", "neuron", "block")


@dataclass(frozen=True)
class Target:
    """One prunable weight tensor.

    Attributes:
        name: module path in ``model.named_modules()``.
        kind: module class name (``Linear``, ``Conv2d``, ``Conv1D`` ...).
        shape: shape of the weight tensor.
        params: elements in the weight tensor.
        flops: FLOPs (2 x multiply-accumulates) of this module for one sample, or None if unmeasured.
        input_dim: axis of the weight that indexes input features (N:M groups run along it).
        granularity: ``"weight"`` (elements of one tensor) or a structured unit: ``"channel"``,
            ``"head"``, ``"neuron"``, ``"block"``; then ``group`` holds the units and their slices,
            ``shape`` is ``(units,)`` and ``params`` counts every coupled parameter.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    flops: float | None = None
    input_dim: int = 1
    granularity: str = "weight"
    parameter: str = field(default="weight")
    group: UnitGroup | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["group"] = None if self.group is None else self.group.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Target:
        group = data.get("group")
        return cls(**{**data, "shape": tuple(data["shape"]), "group": None if group is None else UnitGroup.from_dict(group)})


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear, Conv1d/2d/3d and Hugging Face Conv1D, in registration order."""
    return [(name, m) for name, m in model.named_modules() if name and weight_input_dim(m) is not None]


def weight_of(model: nn.Module, target: Target) -> torch.Tensor:
    """The live weight tensor of a target (a Parameter of the model)."""
    try:
        module = model.get_submodule(target.name)
    except AttributeError:
        raise PrunescopeError(f"target {target.name!r} is not a module of this model") from None
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and target.parameter in parametrizations:
        raise PrunescopeError(f"target {target.name!r} is already masked; call make_permanent(model) first")
    weight = getattr(module, target.parameter)
    if tuple(weight.shape) != tuple(target.shape):
        raise PrunescopeError(f"target {target.name!r} has shape {tuple(weight.shape)}, expected {target.shape}")
    return weight
