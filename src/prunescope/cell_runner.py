"""The per-cell engine: how one target's cells are removed, measured and restored, the same in the
calling process, a worker process and a Ray task. Below both :mod:`prunescope.scan` (which orders
the work and writes the store) and :mod:`prunescope.execution` (which runs it elsewhere)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .cell_measure import Measure, Replay
from .evaluator import Evaluator
from .levels import NMPattern, level_sparsity
from .masks import keep_mask, magnitude_order
from .profile import Cell
from .structured import mask_target, units_removed
from .target import Target, weight_of


@dataclass(frozen=True)
class ScanSettings:
    """How every cell of a scan is measured; the same in this process and in each worker."""

    granularity: str
    criterion: str
    levels: tuple[float | NMPattern, ...]
    level_keys: tuple[str, ...]
    seed: int
    round_to: int | None
    max_drop: float | None
    mode: str
    tolerance: float | None
    confidence: float
    incremental: bool
    cache_bytes: int
    min_batches: int = 2


class TargetRunner:
    """Measures all the levels of one target at a time on ``model``, which it changes in place for a
    cell and restores bit for bit. Used by the serial scan and, on its own copy of the model, by
    each worker process or Ray task.

    ``eager`` prepares the incremental replay of every target up front (and warns about refused
    replays); a worker prepares each target's replay when it first measures it, and reports it.
    """

    def __init__(self, model: torch.nn.Module, evaluator: Evaluator, targets: list[Target], settings: ScanSettings,
                 *, dense_stats=None, calibration: list[Any] | None = None, eager: bool = True) -> None:
        self.model, self.evaluator, self.settings = model, evaluator, settings
        self.weights = {t.name: weight_of(model, t) for t in targets} if settings.granularity == "weight" else {}
        if dense_stats is None and calibration is not None:
            from .oneshot.dense_stats import DenseStats

            dense_stats = DenseStats(model, calibration, [t.name for t in targets], settings.criterion)
        self.dense_stats = dense_stats
        self.replay = None
        if settings.incremental:
            self.replay = Replay(model, evaluator, targets, settings.granularity, settings.cache_bytes, eager=eager)
        self.measure = Measure(evaluator, self.replay, settings.mode, settings.tolerance, settings.confidence,
                                settings.max_drop, settings.seed, settings.min_batches)

    def cells(self, target: Target, known: Mapping[str, Cell]) -> Iterator[tuple[Cell, bool]]:
        """Yield (cell, measured now) for each level in order, taking ``known`` cells (by level key) as they
        are; fractional levels past ``max_drop`` are not yielded."""
        s = self.settings
        if self.replay is not None:
            self.replay.prepare(target)
        stopped = False
        order = None
        for level, key in zip(s.levels, s.level_keys, strict=True):
            fractional = not isinstance(level, NMPattern)
            if stopped and fractional:
                continue
            cell = known.get(key)
            fresh = cell is None
            if fresh:
                if s.granularity == "weight":
                    weight = self.weights[target.name]
                    if order is None and s.criterion == "magnitude" and self.dense_stats is None:
                        order = magnitude_order(weight)  # one sort serves every fractional level
                    removal = _weight_removal(target, weight, level, s.criterion, s.seed, self.model, self.dense_stats, order)
                else:
                    removal = _unit_removal(self.model, target, level, s.criterion, s.seed, s.round_to)
                cell = self.measure(self.model, target.name, key, removal)
            yield cell, fresh
            stopped = stopped or _stops(s, level, cell, self.evaluator.higher_is_better)

    @staticmethod
    def from_known(settings: ScanSettings, known: Mapping[str, Cell], higher_is_better: bool) -> list[Cell] | None:
        """The cells :meth:`cells` would yield if every cell it needs is in ``known``, else None."""
        cells: list[Cell] = []
        stopped = False
        for level, key in zip(settings.levels, settings.level_keys, strict=True):
            if stopped and not isinstance(level, NMPattern):
                continue
            if key not in known:
                return None
            cells.append(known[key])
            stopped = stopped or _stops(settings, level, known[key], higher_is_better)
        return cells

    def replay_status(self, target: Target) -> dict | None:
        """Whether ``target``'s cells replayed recorded outputs, the replay refused for it, and the cache size."""
        if self.replay is None:
            return None
        return {"replaying": bool(self.replay.skips.get(target.name)), "refused": self.replay.refused_of.get(target.name),
                **{k: v for k, v in self.replay.summary().items() if k in ("units", "cache_bytes_in_memory", "cache_bytes_spilled")}}

    def close(self) -> None:
        if self.replay is not None:
            self.replay.close()


def _stops(settings: ScanSettings, level: float | NMPattern, cell: Cell, higher_is_better: bool) -> bool:
    """Whether ``cell`` ends its target's fractional levels: its drop exceeds ``max_drop``."""
    drop = -cell.change if higher_is_better else cell.change
    return settings.max_drop is not None and not isinstance(level, NMPattern) and drop > settings.max_drop


def _weight_removal(target: Target, weight: torch.Tensor, level: float | NMPattern, criterion: str, seed: int,
                    model: torch.nn.Module, dense_stats=None, order: torch.Tensor | None = None):
    """(sparsity, apply) for a weight target: apply() zeroes the masked elements in place (a
    calibrated criterion writes its pruned, possibly updated weight) and returns a restore that
    copies the original values back."""
    if dense_stats is not None:
        from .oneshot.dense_stats import pruned_weight

        pruned = pruned_weight(model, target.name, level, criterion, dense_stats.get(target.name))
    else:
        mask = keep_mask(weight, level, criterion, target.input_dim, seed=seed, key=target.name, order=order)

    def apply_mask() -> Callable[[], None]:
        original = weight.detach().clone()
        with torch.no_grad():
            if dense_stats is not None:
                weight.copy_(pruned)
            else:
                weight.mul_(mask)

        def restore() -> None:
            with torch.no_grad():
                weight.copy_(original)

        return restore

    return level_sparsity(level), apply_mask


def _unit_removal(model: torch.nn.Module, target: Target, level: float, criterion: str, seed: int, round_to: int | None):
    """(fraction of units removed, apply) for a structured target; apply() emulates the removal."""
    remove = units_removed(model, target, level, criterion, seed, round_to)
    return len(remove) / target.group.units, lambda: mask_target(model, target, remove)


