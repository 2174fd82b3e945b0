"""How much of a budget's quantity (prunable parameters, all parameters, FLOPs) a plan's levels
remove, for the whole plan and for each target pruned alone, and the refusal of a budget that
the levels cannot reach."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from .cost import CostModel
from .errors import PrunescopeError
from .levels import removed_share
from .plan import Budget
from .profile import Profile
from .target import Target


def removed_fraction(profile: Profile, budget: Budget) -> Callable[[dict], float]:
    """A function of a level dict giving the fraction of the budget's quantity that the levels remove."""
    if budget.kind == "sparsity":
        params = {t.name: t.params for t in profile.targets}
        total = float(sum(params.values()))
        return lambda levels: sum(removed_share(lv) * params[n] for n, lv in levels.items() if lv) / total
    cost, dense, index = _cost_model(profile, budget)
    return lambda levels: 1.0 - cost.remaining(profile.targets, levels)[index] / dense


def marginal_removal(profile: Profile, budget: Budget) -> Callable[[Target, float], float]:
    """A function of (target, level) giving the fraction of the budget's quantity that this target
    alone at that level removes (every other target dense)."""
    if budget.kind == "sparsity":
        total = float(sum(t.params for t in profile.targets))
        return lambda target, level: removed_share(level) * target.params / total
    cost, dense, _ = _cost_model(profile, budget)
    sizes = {name: float(math.prod(shape)) for name, shape in cost.shapes.items()} if budget.kind == "params" else cost.flops

    def removal(target: Target, level: float) -> float:
        kept = cost.kept_fractions([target], {target.name: level})
        return sum(sizes.get(tensor, 0.0) * (1.0 - fraction) for tensor, fraction in kept.items()) / dense

    return removal


def removal_is_additive(profile: Profile, budget: Budget) -> bool:
    """True when the plan's removal is the sum of its targets' marginal removals: always for a
    sparsity budget; for params and FLOPs unless two targets cut one tensor along different axes
    (a conv between two channel groups keeps the product of their kept fractions, so the sum of
    the marginals then overstates what the plan removes)."""
    if budget.kind == "sparsity":
        return True
    cuts: dict[str, set[tuple[str, int | None]]] = defaultdict(set)
    for target in profile.targets:
        if target.group is None:
            cuts[f"{target.name}.{target.parameter}"].add((target.name, None))
            continue
        for piece in target.group.slices:
            cuts[piece.tensor].add((target.name, piece.dim))
    return all(len({name for name, _ in by}) < 2 or len({axis for _, axis in by}) < 2 for by in cuts.values())


def unreachable(budget: Budget, most: float, why: str) -> PrunescopeError:
    """The one-line refusal of a budget above the ``most`` (a fraction) that ``why`` allows."""
    return PrunescopeError(
        f"budget unreachable: {budget.fraction:.1%} of {_BUDGET_WORDS[budget.kind]} asked, but {why} allow at most "
        f"{most:.1%}; scan higher levels, include more targets or lower the budget"
    )


_BUDGET_WORDS = {"sparsity": "prunable parameters", "params": "the model's parameters", "flops": "the model's FLOPs"}


def _cost_model(profile: Profile, budget: Budget) -> tuple[CostModel, float, int]:
    """The profile's cost model, the dense amount of the budget's quantity and its index in ``remaining``."""
    if profile.costs is None:
        raise PrunescopeError(f"a {budget.kind} budget needs the profile's cost model; re-scan with this version of prunescope")
    cost = CostModel.from_dict(profile.costs)
    if budget.kind == "flops" and not cost.flops:
        raise PrunescopeError("this profile has no FLOPs; scan with an evaluator so one batch can be measured")
    if budget.kind == "params":
        return cost, float(cost.params), 0
    return cost, cost.total_flops, 1

