"""Torch-Pruning's per-group dependency search, with a budget: a group whose search runs over it
is refused by name instead of being waited for.

``DependencyGraph.get_pruning_group`` walks the graph from a root layer and keeps a dependency
whenever it reaches a node with an index list it has not seen there. Where each block adds its
shortcut into a slice of the channels (``torch.cat([y[:, :c] + x, y[:, c:]], 1)``, PyramidNet-like
streams) the concat offsets make the indices drift, the same nodes are reached with ever new
index lists, and their number grows two- to fivefold per block: 7 blocks took 24 s (0.4 s with the
hashed look-up below), 11 blocks 31 s even so, 16 would take hours. The search itself is
Torch-Pruning's; here its ``Group`` (the list it appends every reached dependency to) is swapped,
during one call, for one that counts the dependencies added, checks the clock, and finds an
already-reached (node, handler, index list) by hashing instead of a scan of the list (same answer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import PrunescopeError

SEARCH_STEPS = 50_000
"""Default bound on the dependencies one group's search may reach: 19x the largest group of any
torchvision classification model (2603 in swin_v2_b; resnet152 183, densenet201 198), about a
second of searching."""
SEARCH_SECONDS = 5.0
"""Default bound on one group's search, in wall-clock seconds (a backstop for a slow machine)."""


@dataclass(frozen=True)
class SearchBudget:
    """Bounds on one group's dependency search: ``steps`` dependencies reached (deterministic) and
    ``seconds`` of wall-clock time (a backstop on a slow machine); over either, the group is refused."""

    steps: int = SEARCH_STEPS
    seconds: float = SEARCH_SECONDS

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PrunescopeError(f"search steps must be a positive integer; got {self.steps!r}")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not self.seconds > 0:
            raise PrunescopeError(f"search seconds must be a positive number; got {self.seconds!r}")


class SearchExceeded(Exception):
    """A group's dependency search ran over its budget; the message says which bound and by how much.
    ``reached`` holds the dependencies found so far (all coupled to the root, so all in its group)."""

    def __init__(self, message: str, reached: list[Any]) -> None:
        super().__init__(message)
        self.reached = reached


def _bounded_group_class(base: type, budget: SearchBudget) -> type:
    started = time.perf_counter()

    class BoundedGroup(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._reached: dict[tuple[Any, Any], set[tuple]] | None = {}

        def add_dep(self, dep: Any, idxs: Any) -> None:
            if len(self) >= budget.steps:
                raise SearchExceeded(f"reached more than {budget.steps} dependencies (search steps)", self.items)
            elapsed = time.perf_counter() - started
            if elapsed > budget.seconds:
                raise SearchExceeded(
                    f"ran {elapsed:.1f} s, over {budget.seconds:g} s (search seconds) after {len(self)} dependencies", self.items
                )
            super().add_dep(dep, idxs)
            if self._reached is not None:
                self._reached.setdefault((dep.target, dep.handler), set()).add(tuple(idxs))

        def has_pruning_op(self, dep: Any, idxs: Any) -> bool:
            if self._reached is None:
                return super().has_pruning_op(dep, idxs)
            return tuple(idxs) in self._reached.get((dep.target, dep.handler), ())

        def __setitem__(self, k: int, v: Any) -> None:  # the merged group rewrites items: stop using the index
            self._reached = None
            super().__setitem__(k, v)

    return BoundedGroup


@contextmanager
def bounded_search(budget: SearchBudget) -> Iterator[None]:
    """Within the block, each ``get_pruning_group`` call raises :class:`SearchExceeded` once it
    has reached ``budget.steps`` dependencies or run ``budget.seconds``; enter it once per group."""
    from torch_pruning.dependency import graph

    original = graph.Group
    graph.Group = _bounded_group_class(original, budget)
    try:
        yield
    finally:
        graph.Group = original
