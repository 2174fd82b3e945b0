"""What a plan saves: the parameters and FLOPs left in the pruned model.

Every parameter tensor keeps ``numel x prod over axes (1 - fraction of that axis removed)``, and
every Conv/Linear weight's FLOPs shrink by the same factor (a conv that loses a quarter of its
input channels and half of its output channels keeps 3/8 of its multiply-accumulates). Axes are
removed by structured groups through their slices; a weight target's level removes that fraction
of its elements. FLOPs count Conv/Linear layers and the packed q/k/v and output projections of
``nn.MultiheadAttention`` (2 x MACs per sample): attention score products and elementwise ops are
not included.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import run_model
from .levels import Level, removed_share
from .modes import eval_mode
from .target import Target, prunable_modules
from .targets import measure_flops


def packed_attention_flops(model: nn.Module, example: Any) -> dict[str, float]:
    """FLOPs per sample of every packed multi-head attention's ``in_proj_weight`` and
    ``out_proj.weight``, from one forward pass on ``example`` (none if the model has no such attention).

    ``nn.MultiheadAttention`` in eval mode runs a fused kernel that never calls its ``out_proj``
    module, so module hooks cannot see these projections; the sequence lengths are read off its inputs.
    """
    from .structure.pruned_attention import HeadPrunedAttention

    attentions = {name: m for name, m in model.named_modules() if isinstance(m, (nn.MultiheadAttention, HeadPrunedAttention))}
    flops: dict[str, float] = {}

    def hook_for(name: str, module: nn.Module):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs.get("key", query)
            time_axis = 1 if module.batch_first and query.dim() == 3 else 0
            length_q, length_k = query.shape[time_axis], key.shape[time_axis]
            inner = module.in_proj_weight.shape[0] // 3
            flops[f"{name}.in_proj_weight"] = flops.get(f"{name}.in_proj_weight", 0.0) + 2.0 * module.embed_dim * inner * (length_q + 2 * length_k)
            flops[f"{name}.out_proj.weight"] = flops.get(f"{name}.out_proj.weight", 0.0) + 2.0 * inner * module.embed_dim * length_q

        return hook

    if not attentions:
        return flops
    handles = [m.register_forward_pre_hook(hook_for(n, m), with_kwargs=True) for n, m in attentions.items()]
    try:
        with eval_mode(model), torch.no_grad():
            run_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return flops


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
            flops.update(packed_attention_flops(model, example))
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
