"""The search space: one level per layer on an equally spaced grid, with the removed weights fixed.

Layer ``l`` (``P_l`` weights) sits at grid index ``k_l``, i.e. level ``levels[k_l]`` with
``levels[k] = first + k * step``; it removes ``levels[k_l] * P_l`` weights. Moving one layer one
step up removes ``step * P_l`` more, so a budget stays exact when the steps up and the steps down of
one mutation move the same total ``P``: ``sum_l k_l P_l`` is the invariant (integers, so exact).
With layers of unequal size one step up of a large layer is paid by steps down of several smaller
ones (SmolLM2: an MLP layer of 884,736 weights = 8 K/V projections of 110,592, or 2 Q/O + 2 K/V).
EvoPress keeps the budget the same way with a fixed weight count per step; a common fraction per
step lets one bank level serve every layer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..errors import PrunescopeError

MAX_FLIPS = 3


@dataclass(frozen=True)
class LevelSpace:
    """Layers ``names`` with weight counts ``params``, each at a level ``levels[k]`` (ascending, equal steps)."""

    names: tuple[str, ...]
    params: tuple[int, ...]
    levels: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.levels) < 2:
            raise PrunescopeError(f"a search needs at least two levels per layer to move between; got {list(self.levels)}")
        steps = np.diff(self.levels)
        if (steps <= 0).any() or not np.allclose(steps, steps[0], rtol=0, atol=1e-9):
            raise PrunescopeError(f"search levels must be ascending and equally spaced (e.g. 0.4, 0.5, ..., 0.9); got {list(self.levels)}")
        if self.levels[0] < 0 or self.levels[-1] >= 1:
            raise PrunescopeError(f"search levels must lie in [0, 1); got {list(self.levels)}")

    @property
    def unit(self) -> int:
        """The greatest common divisor of the layers' weight counts."""
        return reduce(math.gcd, self.params)

    def level_of(self, state: Sequence[int]) -> dict[str, float]:
        return {name: self.levels[k] for name, k in zip(self.names, state, strict=True)}

    def removed(self, state: Sequence[int]) -> float:
        """Fraction of the layers' weights the state removes."""
        return sum(self.levels[k] * p for k, p in zip(state, self.params, strict=True)) / sum(self.params)

    def index_of(self, level: float) -> int:
        """The grid index of ``level``; refuses a level off the grid."""
        for k, value in enumerate(self.levels):
            if abs(value - level) <= 1e-9:
                return k
        raise PrunescopeError(f"level {level:g} is not on the search grid {', '.join(f'{v:g}' for v in self.levels)}")

    def uniform(self, fraction: float) -> tuple[int, ...]:
        """Every layer at ``fraction`` (a grid level)."""
        return tuple(self.index_of(fraction) for _ in self.names)

    def best_start(self, drops: np.ndarray, fraction: float) -> tuple[int, ...]:
        """The state of least summed ``drops[l, k]`` removing exactly ``fraction`` of the weights:
        a multiple-choice knapsack with an equality constraint, solved exactly by dynamic
        programming over ``sum_l k_l P_l / unit`` (integers). Refuses a fraction no state removes."""
        unit = self.unit
        sizes = [p // unit for p in self.params]
        goal_float = (fraction - self.levels[0]) / (self.levels[1] - self.levels[0]) * sum(sizes)
        goal = round(goal_float)
        most = (len(self.levels) - 1) * sum(sizes)
        if abs(goal - goal_float) > 1e-6 or not 0 <= goal <= most:
            raise PrunescopeError(f"no plan on the grid {', '.join(f'{v:g}' for v in self.levels)} removes exactly {fraction:.4%}; "
                                  "choose a budget on the grid or other levels")
        best = np.full(goal + 1, np.inf)
        best[0] = 0.0
        choices = np.zeros((len(sizes), goal + 1), dtype=np.int16)
        for layer, size in enumerate(sizes):
            new = np.full(goal + 1, np.inf)
            for k in range(len(self.levels)):
                shift = k * size
                if shift > goal:
                    break
                candidate = np.full(goal + 1, np.inf)
                candidate[shift:] = best[: goal + 1 - shift] + drops[layer, k]
                better = candidate < new
                new[better] = candidate[better]
                choices[layer, better] = k
            best = new
        if not np.isfinite(best[goal]):
            raise PrunescopeError(f"no plan on the search grid removes exactly {fraction:.4%} of the weights")
        state, left = [], goal
        for layer in range(len(sizes) - 1, -1, -1):
            k = int(choices[layer, left])
            state.append(k)
            left -= k * sizes[layer]
        return tuple(reversed(state))

    def mutate(self, state: Sequence[int], rng: random.Random, tries: int = 100) -> tuple[int, ...]:
        """A neighbour of ``state`` removing the same weights: 1 to 3 moves (biased to 1, as EvoPress),
        each one layer a step in one direction paid by steps of other layers in the other."""
        flips = min(rng.randint(1, MAX_FLIPS), rng.randint(1, MAX_FLIPS))
        for _ in range(tries):
            current, done = list(state), 0
            for _ in range(tries):
                if done == flips:
                    break
                moved = self._move(current, rng)
                if moved is not None:
                    current, done = moved, done + 1
            if done and current != list(state):
                return tuple(current)
        raise PrunescopeError("no move keeps the budget exact from this plan: the layers' sizes share no common step "
                              "or every layer sits at the end of the grid")

    def _move(self, state: list[int], rng: random.Random) -> list[int] | None:
        top = len(self.levels) - 1
        direction = rng.choice((1, -1))
        movable = [i for i, k in enumerate(state) if 0 <= k + direction <= top]
        if not movable:
            return None
        first = rng.choice(movable)
        new = list(state)
        new[first] += direction
        owed = self.params[first]
        while owed:
            partners = [i for i, k in enumerate(new) if i != first and 0 <= k - direction <= top and self.params[i] <= owed
                        and new[i] == state[i]]
            if not partners:
                return None
            other = rng.choice(partners)
            new[other] -= direction
            owed -= self.params[other]
        return new

