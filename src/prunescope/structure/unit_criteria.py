"""Criteria that rank the units of a UnitGroup, and the choice of units a level removes.

Generic over groups: a unit's weights are whatever its slices own, so the same scores serve
heads, neurons, blocks and channel groups.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PrunescopeError
from .groups import UnitGroup

UNIT_CRITERIA = ("l1", "l2", "random")


def unit_scores(model: nn.Module, group: UnitGroup, criterion: str, seed: int = 0) -> torch.Tensor:
    """One score per unit of ``group`` (float64, shape ``[group.units]``); low scores are removed first.

    ``"l1"``: sum of |w| over every element a unit owns (all its slices: rows, columns, biases).
    ``"l2"``: sqrt of the sum of w**2 over the same elements. ``"random"``: uniform in [0, 1),
    from a generator seeded by ``seed`` and the group's name (same seed, same scores).
    """
    if criterion not in UNIT_CRITERIA:
        raise PrunescopeError(f"unknown unit criterion {criterion!r}; accepted: {', '.join(UNIT_CRITERIA)}")
    if criterion == "random":
        digest = hashlib.sha256(f"{seed}|{group.name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(group.units, generator=generator, dtype=torch.float64)
    tensors = {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}
    total = torch.zeros(group.units, dtype=torch.float64)
    for s in group.slices:
        if s.tensor not in tensors:
            raise PrunescopeError(f"group {group.name} names {s.tensor}, which this model does not have")
        tensor = tensors[s.tensor].detach().to(torch.float64)
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor.movedim(s.dim, 0)
        owned = tensor[s.offset: s.offset + group.units * s.width].reshape(group.units, -1)
        total += owned.abs().sum(1) if criterion == "l1" else owned.square().sum(1)
    return total if criterion == "l1" else total.sqrt()


def units_to_remove(
    scores: torch.Tensor | Sequence[float],
    level: float,
    units: int,
    round_to: int | None = None,
    min_units: int = 1,
) -> list[int]:
    """Indices (ascending) of the lowest-scoring units that a removal ``level`` takes out.

    Args:
        scores: one score per unit; ties go to the lower index.
        level: fraction of the units removed, in [0, 1]; round(level * units) are removed.
        units: number of units (must equal ``len(scores)``).
        round_to: if given, the number of units KEPT is rounded to the nearest multiple of it
            (ties keep more), at least ``round_to`` if any unit was to stay, never above ``units``.
        min_units: units that must remain; a level that keeps fewer is refused.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if scores.numel() != units:
        raise PrunescopeError(f"got {scores.numel()} scores for {units} units")
    if not isinstance(level, (int, float)) or not 0.0 <= float(level) <= 1.0 or math.isnan(level):
        raise PrunescopeError(f"level must be a fraction of units in [0, 1]; got {level!r}")
    kept = units - round(level * units)
    if round_to is not None:
        if not isinstance(round_to, int) or round_to < 1:
            raise PrunescopeError(f"round_to must be a positive integer; got {round_to!r}")
        if units < round_to and min_units > 0:
            raise PrunescopeError(f"round_to={round_to} cannot keep a multiple of {round_to} of only {units} units")
        if kept > 0:
            nearest = max(round_to, math.floor(kept / round_to + 0.5) * round_to)
            kept = min(nearest, units // round_to * round_to)
    if kept < min_units:
        rounding = f" with round_to={round_to}" if round_to is not None else ""
        raise PrunescopeError(
            f"level {level} would keep {kept} of {units} units{rounding}; at least {min_units} must remain. "
            "Use a lower level"
        )
    order = sorted(range(units), key=lambda i: (float(scores[i]), i))
    return sorted(order[: units - kept])
