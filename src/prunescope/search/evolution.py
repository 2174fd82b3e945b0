"""A (1 + lambda) evolutionary search with multi-step selection, in the spirit of EvoPress.

Each generation mutates the parent into ``offspring`` distinct candidates (budget-preserving moves,
see :mod:`.space`), screens them on ``screen`` fitness batches drawn at random, re-measures the best
``survivors`` on every fitness batch and keeps the best of those if it beats the parent (elitist:
the parent's fitness on the full data is known, so it is never re-measured). The state is saved
after every generation, so a killed search resumes from the last finished one with the same
random draws and ends exactly where an uninterrupted search of the same seed ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..progress import progress_bar
from .space import LevelSpace
from .state import SearchState


class Fitness(Protocol):
    """``fitness(states, batch_indices, record)``: one fitness (lower is better) per state on those batches;
    ``record`` asks to keep what is needed to make one of them the parent, which ``adopt`` then does."""

    def __call__(self, states: Sequence[tuple[int, ...]], batch_indices: Sequence[int], record: bool = False) -> list[float]: ...

    def adopt(self, state: tuple[int, ...]) -> None: ...


@dataclass(frozen=True)
class Selection:
    """Candidates per generation and how they are selected.

    ``offspring``: candidates mutated from the parent; ``survivors``: how many of them, ranked on
    ``screen`` random fitness batches, are measured on all ``batches`` (screening is skipped when
    ``survivors >= offspring``).
    """

    offspring: int = 8
    survivors: int = 2
    screen: int = 1
    batches: int = 1

    @property
    def screens(self) -> bool:
        return self.survivors < self.offspring and self.screen < self.batches

    @property
    def per_generation(self) -> int:
        """Candidate evaluations one generation spends."""
        return (self.offspring + self.survivors) if self.screens else self.offspring


def another_generation(state: SearchState, selection: Selection, evaluations: int | None, seconds: float | None,
                       elapsed: float) -> bool:
    """Whether a search at ``state`` runs another generation: it would not pass ``evaluations`` and
    ``elapsed`` (seconds of wall time spent so far) is under ``seconds``."""
    if evaluations is not None and state.evaluations + selection.per_generation > evaluations:
        return False
    return seconds is None or elapsed < seconds


def evolve(space: LevelSpace, state: SearchState, fitness: Fitness, selection: Selection, *, evaluations: int | None,
           seconds: float | None, path: str | Path | None = None, progress: bool = False) -> SearchState:
    """Run generations until the next one would pass ``evaluations`` or ``seconds`` (wall time of
    this and earlier runs) is spent; ``state`` is updated and saved to ``path`` after each."""
    everything = list(range(selection.batches))
    started = time.perf_counter() - state.seconds
    rng = state.random()

    total = None if evaluations is None else max(0, (evaluations - state.evaluations) // selection.per_generation)
    with progress_bar(total or 0, "search", progress) as bar:
        while another_generation(state, selection, evaluations, seconds, time.perf_counter() - started):
            children: list[tuple[int, ...]] = []
            parent = tuple(state.parent)
            for _ in range(50 * selection.offspring):
                if len(children) == selection.offspring:
                    break
                child = space.mutate(parent, rng)
                if child != parent and child not in children:
                    children.append(child)
            spent = 0
            if selection.screens:
                shown = sorted(rng.sample(everything, selection.screen))
                screened = fitness(children, shown)
                spent += len(children)
                order = sorted(range(len(children)), key=lambda i: (screened[i], i))
                children = [children[i] for i in order[: selection.survivors]]
            measured = fitness(children, everything, record=True)
            spent += len(children)
            best = min(range(len(children)), key=lambda i: (measured[i], i))
            if measured[best] < state.fitness:
                state.parent, state.fitness = list(children[best]), float(measured[best])
            fitness.adopt(tuple(state.parent))
            state.generation += 1
            state.evaluations += spent
            state.seconds = time.perf_counter() - started
            state.history.append({"generation": state.generation, "evaluations": state.evaluations,
                                  "seconds": round(state.seconds, 2), "fitness": state.fitness})
            state.keep_random(rng)
            if path is not None:
                state.save(path)
            bar.advance(1, f"generation {state.generation}, best fitness {state.fitness:.5g}")
    return state
