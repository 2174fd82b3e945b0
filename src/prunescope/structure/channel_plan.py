"""Rank the channels of a group and choose the ones a level removes.

Reuses the generic :func:`unit_scores` / :func:`units_to_remove` of :mod:`.unit_criteria` (shared
with heads and neurons) and adds the channel-only criterion ``"bn_scale"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PrunescopeError
from .channels import bn_scales
from .groups import UnitGroup
from .unit_criteria import unit_scores, units_to_remove

CHANNEL_CRITERIA = ("l1", "l2", "bn_scale", "random")


def channel_unit_scores(model: nn.Module, group: UnitGroup, criterion: str, seed: int = 0) -> torch.Tensor:
    """One score per unit of a channel group (float64, ``[group.units]``); low scores go first.

    ``"l1"`` / ``"l2"``: norm of all the group's *parameter* slices (producer rows, norm scales and
    shifts, consumer columns; BatchNorm running statistics are buffers and do not count).
    ``"bn_scale"``: sum of |gamma| over the group's BatchNorms (refused if it has none).
    ``"random"``: seeded by ``seed`` and the group name.
    """
    if criterion not in CHANNEL_CRITERIA:
        raise PrunescopeError(f"unknown channel criterion {criterion!r}; accepted: {', '.join(CHANNEL_CRITERIA)}")
    if criterion == "bn_scale":
        return bn_scales(model, group)
    parameters = dict(model.named_parameters())
    weights_only = dataclasses.replace(group, slices=tuple(s for s in group.slices if s.tensor in parameters))
    return unit_scores(model, weights_only, criterion, seed=seed)


def plan_channel_removals(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    level: float,
    criterion: str = "l1",
    *,
    round_to: int | None = None,
    seed: int = 0,
) -> dict[str, list[int]]:
    """The same ``level`` (fraction of each group's units removed) for every group: group name ->
    unit indices to remove, lowest ``criterion`` scores first. A level that would leave a group
    with fewer than ``min_units`` units is refused with the group's name."""
    removals = {}
    for group in groups:
        scores = channel_unit_scores(model, group, criterion, seed=seed)
        try:
            removals[group.name] = units_to_remove(scores, level, group.units, round_to=round_to, min_units=group.min_units)
        except PrunescopeError as error:
            raise PrunescopeError(f"channel group {group.name} ({group.units} units): {error}") from None
    return removals
