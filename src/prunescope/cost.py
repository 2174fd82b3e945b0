"""What a plan saves: the parameters and FLOPs left in the pruned model.

Every parameter tensor keeps ``numel x prod over axes (1 - fraction of that axis removed)``, and
every Conv/Linear weight's FLOPs shrink by the same factor (a conv that loses a quarter of its
input channels and half of its output channels keeps 3/8 of its multiply-accumulates). Axes are
removed by structured groups through their slices; a weight target's level removes that fraction
of its elements. FLOPs count Conv/Linear layers only (2 x MACs per sample): attention score
products and elementwise ops are not included.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .levels import Level, removed_share
from .targets import Target, measure_flops, prunable_modules


@dataclass(frozen=True)
class CostModel:
    """Shapes of a model's distinct parameters and the FLOPs per sample of its Conv/Linear weights."""

    shapes: dict[str, tuple[int, ...]]
    flops: dict[str, float]

    @classmethod
    def of(cls, model: nn.Module, example: Any = None) -> CostModel:
        """Read the shapes from ``model``; FLOPs are measured on ``example`` (one batch) when given."""
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        flops: dict[str, float] = {}
        if example is not None:
            names = [name for name, _ in prunable_modules(model)]
            flops = {f"{name}.weight": value for name, value in measure_flops(model, example, names).items()}
        return cls(shapes, {k: v for k, v in flops.items() if k in shapes})

    def to_dict(self) -> dict:
        return {"shapes": {k: list(v) for k, v in self.shapes.items()}, "flops": dict(self.flops)}

    @classmethod
    def from_dict(cls, data: Mapping) -> CostModel:
        return cls({k: tuple(v) for k, v in data["shapes"].items()}, dict(data["flops"]))

    @property
    def params(self) -> int:
        """Parameters of the dense model."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def total_flops(self) -> float:
        """Conv/Linear FLOPs per sample of the dense model."""
        return float(sum(self.flops.values()))

    def kept_fractions(self, targets: Sequence[Target], levels: Mapping[str, Level | float]) -> dict[str, float]:
        """Fraction of each tensor that the plan keeps (tensors the plan does not touch are left out)."""
        axes: dict[str, dict[int | None, float]] = defaultdict(lambda: defaultdict(float))
        for target in targets:
            level = levels.get(target.name, 0)
            if not level:
                continue
            if target.group is None:
                axes[f"{target.name}.{target.parameter}"][None] += removed_share(level)
                continue
            removed_units = float(level) * target.group.units
            for piece in target.group.slices:
                shape = self.shapes.get(piece.tensor)
                if shape is None:
                    continue
                axis = piece.dim if shape else None
                size = shape[piece.dim] if shape else 1
                axes[piece.tensor][axis] += removed_units * piece.width / size
        return {tensor: math.prod(max(0.0, 1.0 - share) for share in removed.values()) for tensor, removed in axes.items()}

    def remaining(self, targets: Sequence[Target], levels: Mapping[str, Level | float]) -> tuple[float, float]:
        """(parameters, FLOPs per sample) the pruned model keeps."""
        kept = self.kept_fractions(targets, levels)
        params = sum(math.prod(shape) * kept.get(name, 1.0) for name, shape in self.shapes.items())
        flops = sum(value * kept.get(name, 1.0) for name, value in self.flops.items())
        return params, flops
