"""LAMP layer sparsities (Lee et al. 2021, "Layer-adaptive Sparsity for the Magnitude-based Pruning").

Within a layer the weights are sorted ascending by magnitude, and weight ``u`` scores
``w_u^2 / sum_{v >= u} w_v^2`` (its squared magnitude over that of itself and every larger weight);
a layer's largest weight scores 1. One global threshold on the scores removes the budget's
fraction of all the weights, and a layer's level is the fraction of its weights under it. Scores
grow with magnitude inside a layer, so each layer loses its smallest weights, as magnitude
pruning at that level would.

Exactness: the budget's count of weights is rarely whole, so the weights at the threshold (ties
included, in target order) are removed in part, giving fractional counts that meet the budget
exactly. A layer that would pass its maximum level (see :mod:`.fit`) is held there and the
threshold raised over the other layers until the budget is met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..target import Target, weight_of
from .fit import check_reachable, max_levels


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """The LAMP score of every weight, in ascending order (the order of ascending magnitude), float32.

    A weight whose own and every larger weight are zero scores 0.
    """
    squares = weight.detach().reshape(-1).to(torch.float64).pow(2).sort().values
    from_here = squares.flip(0).cumsum(0).flip(0)
    scores = torch.where(from_here > 0, squares / from_here.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return torch.cummax(scores, 0).values.to(torch.float32)  # rounding must not unsort them


def _remove_lowest(scores: dict[str, torch.Tensor], goal: float) -> tuple[dict[str, float], float]:
    """Weights removed per layer when the ``goal`` (a real count) lowest scores over all layers go;
    the weights at the threshold share the remainder in layer order. Returns (counts, threshold)."""
    whole = math.floor(goal)
    everything = torch.cat(list(scores.values()))
    threshold = torch.kthvalue(everything, min(whole + 1, everything.numel())).values
    below = {n: int(torch.searchsorted(s, threshold, side="left")) for n, s in scores.items()}
    left = goal - sum(below.values())
    counts = {}
    for name, layer_scores in scores.items():
        ties = int(torch.searchsorted(layer_scores, threshold, side="right")) - below[name]
        share = min(left, float(ties))
        left -= share
        counts[name] = below[name] + share
    return counts, float(threshold)


def lamp_levels(model: nn.Module, targets: Sequence[Target], fraction: float) -> tuple[dict[str, float], dict]:
    """The level of each target and the details: the score ``threshold`` and the layers held at their maximum level."""
    params = [t.params for t in targets]
    tops = max_levels(params)
    check_reachable("lamp", fraction, params, tops)
    weights = [weight_of(model, t) for t in targets]
    scores = {t.name: lamp_scores(w) for t, w in zip(targets, weights, strict=True)}
    ceilings = {t.name: float(top) * t.params for t, top in zip(targets, tops, strict=True)}
    goal = fraction * sum(t.params for t in targets)
    capped: dict[str, float] = {}
    counts, threshold = {}, float("nan")
    while len(capped) < len(scores):
        free = {n: s for n, s in scores.items() if n not in capped}
        counts, threshold = _remove_lowest(free, max(0.0, goal - sum(capped.values())))
        over = [n for n, count in counts.items() if count > ceilings[n]]
        if not over:
            break
        capped.update({n: ceilings[n] for n in over})
    removed = {**counts, **capped}
    levels = {t.name: removed[t.name] / t.params for t in targets}
    return levels, {"threshold": threshold, "at_max_level": [n for n in levels if n in capped]}
