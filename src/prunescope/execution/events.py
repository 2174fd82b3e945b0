"""The messages between the scanning process and its executors: work in, cells and failures out."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..profile import Cell


@dataclass(frozen=True)
class Task:
    """Measure every level of target number ``index``; ``known`` cells (by level key) are reused as they are."""

    index: int
    known: dict[str, Cell] = field(default_factory=dict)


@dataclass(frozen=True)
class CellFinished:
    """One newly measured cell of target ``index``: the parent stores it at once."""

    index: int
    cell: Cell


@dataclass(frozen=True)
class TargetFinished:
    """All the cells of target ``index``, in level order (known and new), and how its replay went."""

    index: int
    cells: list[Cell]
    replay: dict | None = None


@dataclass(frozen=True)
class TargetFailed:
    """Target ``index`` failed ``attempts`` times; ``error`` says how the last attempt failed."""

    index: int
    error: str
    attempts: int


Event = CellFinished | TargetFinished | TargetFailed
