"""Empirical sensitivity scan: prune one target at one level, evaluate, restore, for every cell."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .cost import CostModel
from .errors import PrunescopeError
from .evaluator import Evaluator
from .execution import check_execution, run_parallel
from .execution.events import Task
from .execution.payload import WorkerContext, pack
from .fingerprint import model_fingerprint
from .incremental import DEFAULT_MEMORY_BYTES, PrefixCache
from .levels import DEFAULT_LEVELS, Level, NMPattern, level_key, level_sparsity, parse_levels
from .masks import CALIBRATED_CRITERIA, check_criterion, check_nm_compatible, keep_mask, magnitude_order
from .profile import Cell, Profile
from .progress import progress_bar
from .scan_checks import check_scan_arguments, check_unit_levels
from .shards import shard_targets
from .stats import PairedChange, paired_change
from .store import CellStore
from .structured import BLOCK_LEVEL, head_mode_of, mask_target, structured_criterion, units_removed
from .targets import Target, find_targets, weight_of

MODES = ("exact", "adaptive")


def scan(
    model: torch.nn.Module,
    evaluator: Evaluator,
    targets: list[Target] | None = None,
    levels: tuple[Level, ...] | list[Level] = DEFAULT_LEVELS,
    criterion: str = "magnitude",
    store: str | Path | None = None,
    *,
    max_drop: float | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    round_to: int | None = None,
    calibration: Iterable[Any] | None = None,
    mode: str = "exact",
    tolerance: float | None = None,
    min_batches: int = 2,
    incremental: bool = True,
    cache_bytes: int = DEFAULT_MEMORY_BYTES,
    progress: bool = False,
    workers: int | None = None,
    executor: str = "local",
    shard: tuple[int, int] | None = None,
) -> Profile:
    """Measure the metric change of every (target, level) cell, one cell at a time.

    Each cell removes ``level`` of one target by ``criterion`` (``"magnitude"`` or seeded
    ``"random"``; levels are fractions in (0, 1) or N:M patterns such as ``"2:4"``), evaluates
    the model, and restores the weights bit for bit. ``store`` is a JSONL file that receives each
    finished cell; a re-run with the same store skips finished cells. ``max_drop`` stops a
    target's fractional levels once its drop (in metric units, positive = worse) exceeds it.
    The model is left exactly as it was: parameters, buffers, requires_grad and train/eval mode.

    Structured targets (``find_targets(model, "channel" | "head" | "neuron" | "block")``) take a
    fraction of their units per level, chosen by ``"l1"``, ``"l2"`` (= ``"magnitude"``),
    ``"bn_scale"`` (channels) or ``"random"``; ``round_to`` keeps the kept count a multiple of it.
    Removal is emulated exactly (the masked model computes what the shrunk model computes). A block
    target has one cell, level ``"1"``: the block replaced by the identity.

    Calibrated criteria ``"wanda"`` and ``"sparsegpt"`` (Linear and GPT-2 Conv1D weight targets)
    prune each layer from the statistics of its inputs in the dense model, gathered by hooks over
    ``calibration`` (batches fed like the evaluator's; default: the evaluator's own batches, which
    makes the scan calibrate on the data it measures). SparseGPT also updates the kept weights of
    the layer for the cell; the original weight is copied back afterwards.

    Speed. With ``incremental`` (default) the dense outputs of the modules that run before a cell's
    target are recorded once (up to ``cache_bytes`` in memory, the rest spilled to disk) and
    replayed, so a cell runs only from its target onwards; every replay pattern is first checked
    to reproduce the full forward on batch 0, else its cells run in full (see
    :mod:`prunescope.incremental`). Results are identical to the full evaluation.
    ``mode="adaptive"`` evaluates each cell batch by batch (at least ``min_batches``, default 2, in one
    random order seeded by ``seed``) and stops once the half-width of the change's confidence interval is at most
    ``tolerance`` (metric units), or once the interval lies entirely past ``max_drop``; each cell
    reports the samples it used, and its interval bounds the change exact mode would measure on
    all the batches (finite-population corrected).
    ``mode="exact"`` (default) evaluates every batch.

    Execution. The unit of work is one target with all its levels. ``workers=N`` (``executor="local"``)
    measures targets in this process (a thread, on ``model``) and N - 1 worker processes on this
    machine (each on a pickled copy), each of the N with ``torch.get_num_threads() // N`` threads (at
    least 1) and its own incremental cache; ``executor="ray"`` runs one Ray task per
    target on the cluster ``ray.init()`` connects to (the model and batches put in the object store
    once; ``workers`` caps the tasks in flight, default the cluster's CPUs). Either way this process
    alone writes ``store`` (cell by cell as they arrive) and builds the Profile in the serial order,
    with the same cells as ``workers=1``. A target whose worker dies or raises is retried once on a
    fresh worker; a target that fails twice is reported by a PrunescopeError naming its missing cells,
    raised after every other target has finished and been stored. ``shard=(i, n)`` measures every
    n-th target from the i-th (one machine's share); :func:`prunescope.merge_profiles` joins the n
    shard profiles into the profile of the whole scan. See :mod:`prunescope.execution`.
    """
    if not isinstance(evaluator, Evaluator):
        raise PrunescopeError("evaluator must be a prunescope.Evaluator built on the model and its batches")
    evaluator.check_model(model)
    check_scan_arguments(targets=targets, seed=seed, cache_bytes=cache_bytes, confidence=confidence, max_drop=max_drop,
                         tolerance=tolerance, round_to=round_to)
    parsed_levels = parse_levels(levels)
    if max_drop is not None and not max_drop > 0:
        raise PrunescopeError(f"max_drop must be positive (metric units); got {max_drop}")
    if not 0 < confidence < 1:
        raise PrunescopeError(f"confidence must be in (0, 1); got {confidence}")
    if mode not in MODES:
        raise PrunescopeError(f"unknown scan mode {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "adaptive" and not (tolerance is not None and tolerance > 0):
        raise PrunescopeError(f"mode 'adaptive' needs a positive tolerance (half-width of the change's interval, metric units); got {tolerance}")
    if isinstance(min_batches, bool) or not isinstance(min_batches, int) or min_batches < 1:
        raise PrunescopeError(f"min_batches must be a whole number >= 1 (batches an adaptive cell sees before it may stop); got {min_batches!r}")
    check_execution(workers, executor)
    fingerprint_before = model_fingerprint(model)
    if targets is None:
        targets = find_targets(model, example=evaluator.batches[0])
    if not targets:
        raise PrunescopeError("targets is empty: give at least one Target (see find_targets)")
    if shard is not None:
        targets = shard_targets(targets, shard)
    granularity = _single_granularity(targets)
    dense_stats, calibration_identity = None, {}
    if granularity == "weight":
        check_criterion(criterion)
        if criterion in CALIBRATED_CRITERIA:
            from .oneshot.dense_stats import DenseStats, batches_fingerprint

            if calibration is None:
                calibration, calibration_identity = evaluator.batches, {"calibration": "evaluator batches"}
            else:
                calibration = list(calibration)
                if not calibration:
                    raise PrunescopeError("calibration batches are empty: give at least one batch, or None for the evaluator's")
                calibration_identity = {"calibration": batches_fingerprint(calibration)}
            dense_stats = DenseStats(model, calibration, [t.name for t in targets], criterion)
        for level in parsed_levels:
            if isinstance(level, NMPattern):
                for t in targets:
                    check_nm_compatible(t.shape, t.input_dim, level, t.name)
    else:
        if criterion in CALIBRATED_CRITERIA:
            raise PrunescopeError(f"criterion {criterion!r} prunes elements of Linear weights; {granularity} targets take "
                                  "magnitude (= l2), l1, l2, bn_scale or random")
        structured_criterion(criterion)
        if any(isinstance(level, NMPattern) for level in parsed_levels):
            raise PrunescopeError(f"N:M levels apply to weights only; {granularity} targets take fractions of their units")
        if granularity == "block":
            parsed_levels = [1.0]
        check_unit_levels(targets, parsed_levels, round_to)
        for t in targets:  # refuse a level that empties a group before any work
            for level in parsed_levels:
                units_removed(model, t, level, criterion, seed, round_to)
    dense = evaluator.dense  # refuses a failing forward or a non-finite metric before any file is written
    level_keys = [BLOCK_LEVEL] if granularity == "block" else [level_key(level) for level in parsed_levels]
    provenance = {
        "model_sha256": fingerprint_before,
        "data_sha256": evaluator.fingerprint,
        "samples": dense.samples,
        "batches": len(evaluator.batches),
        "seed": seed,
        "round_to": round_to,
        **calibration_identity,
        **({"mode": mode, "tolerance": tolerance, "min_batches": min_batches} if mode == "adaptive" else {}),
        **({"shard": list(shard)} if shard is not None else {}),
        "prunescope": __version__,
        "torch": torch.__version__,
    }
    settings = ScanSettings(granularity, criterion, tuple(parsed_levels), tuple(level_keys), seed, round_to, max_drop,
                            mode, tolerance, confidence, incremental, cache_bytes, min_batches)
    parallel = executor == "ray" or (workers or 1) > 1
    payload = None
    if parallel:  # pickled before the store is opened: an unpicklable model writes nothing
        payload = pack(WorkerContext(model, evaluator, list(targets), settings, calibration if dense_stats is not None else None))
    cell_store = None
    if store is not None:
        identity = {"model": fingerprint_before, "data": evaluator.fingerprint, "metric": evaluator.metric.name,
                    "criterion": criterion, "seed": seed, "levels": level_keys, "granularity": granularity,
                    "confidence": confidence, **({"round_to": round_to} if round_to else {}),
                    **calibration_identity,
                    **({"mode": mode, "tolerance": tolerance} if mode == "adaptive" else {}),
                    **({"min_batches": min_batches} if mode == "adaptive" and min_batches != 2 else {}),
                    **({"head_mode": head_mode_of(targets)} if granularity == "head" else {}),
                    **({"shard": list(shard)} if shard is not None else {})}
        cell_store = CellStore(store, identity)

    try:  # the store's lock is released however the scan ends
        if parallel:
            tasks, done = _pending(targets, cell_store, settings, evaluator.higher_is_better)
            def home() -> TargetRunner:
                return TargetRunner(model, evaluator, targets, settings, dense_stats=dense_stats, eager=False)

            cells, provenance["execution"], summary = run_parallel(payload, targets, tasks, done, level_keys, cell_store,
                                                                   executor, workers, progress,
                                                                   home if executor == "local" else None)
        else:
            runner = TargetRunner(model, evaluator, targets, settings, dense_stats=dense_stats)
            cells, summary = _scan_in_process(runner, targets, level_keys, cell_store, progress)
    finally:
        if cell_store is not None:
            cell_store.close()
    if summary is not None:
        provenance["incremental"] = summary
    return Profile(
        metric=evaluator.metric.name,
        higher_is_better=evaluator.higher_is_better,
        dense_value=dense.value,
        criterion=criterion,
        granularity=granularity,
        levels=level_keys,
        targets=list(targets),
        cells=cells,
        kind="measured",
        confidence=confidence,
        provenance=provenance,
        costs=CostModel.of(model, evaluator.batches[0]).to_dict(),
    )


def _single_granularity(targets: list[Target]) -> str:
    kinds = sorted({t.granularity for t in targets})
    if len(kinds) > 1:
        raise PrunescopeError(f"targets mix granularities ({', '.join(kinds)}); scan one granularity at a time")
    return kinds[0]


def _scan_in_process(runner: TargetRunner, targets: list[Target], level_keys: list[str], cell_store: CellStore | None,
                     progress: bool) -> tuple[list[Cell], dict | None]:
    """The serial scan: every target in order in this process; returns the cells and the replay summary."""
    summary = runner.replay.summary() if runner.replay is not None else None
    cells: list[Cell] = []
    try:
        with progress_bar(len(targets) * len(level_keys), "scan", enabled=progress) as bar:
            for target in targets:
                measured = 0
                for cell, fresh in runner.cells(target, _stored(cell_store, target.name, level_keys)):
                    if fresh and cell_store:
                        cell_store.append(cell)
                    cells.append(cell)
                    measured += 1
                    bar.advance(1, f"{target.name} @ {cell.level}: {cell.value:.4g}")
                if measured < len(level_keys):
                    bar.advance(len(level_keys) - measured, f"{target.name} skipped past max_drop")
    finally:
        runner.close()
    return cells, summary


def _pending(targets: list[Target], cell_store: CellStore | None, settings: ScanSettings,
             higher_is_better: bool) -> tuple[list[Task], dict[int, list[Cell]]]:
    """The targets still to measure, as tasks carrying their stored cells, and the cells of the finished ones."""
    tasks, done = [], {}
    for index, target in enumerate(targets):
        known = _stored(cell_store, target.name, list(settings.level_keys))
        cells = TargetRunner.from_known(settings, known, higher_is_better)
        if cells is None:
            tasks.append(Task(index, known))
        else:
            done[index] = cells
    return tasks, done


def _stored(cell_store: CellStore | None, name: str, level_keys: list[str]) -> dict[str, Cell]:
    """The cells of target ``name`` already in the store, by level key."""
    if cell_store is None:
        return {}
    return {key: cell for key in level_keys if (cell := cell_store.get(name, key)) is not None}


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
            self.replay = _Replay(model, evaluator, targets, settings.granularity, settings.cache_bytes, eager=eager)
        self.measure = _Measure(evaluator, self.replay, settings.mode, settings.tolerance, settings.confidence,
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


class _Replay:
    """Which recorded dense outputs each target's cells replay (see :mod:`prunescope.incremental`)."""

    def __init__(self, model: torch.nn.Module, evaluator: Evaluator, targets: list[Target], granularity: str,
                 cache_bytes: int, eager: bool = True) -> None:
        """Records the outputs of the units any of ``targets`` would skip; ``eager`` also verifies every
        target's skip set now (and warns about refused ones) instead of on the target's first cell."""
        self.cache = PrefixCache(model, evaluator, cache_bytes)
        self.model, self.granularity = model, granularity
        self.cache.record({unit for t in targets for unit in self.cache.skip_set(_cell_tensors(model, t, granularity))})
        self.skips: dict[str, tuple[str, ...]] = {}
        self.refused_of: dict[str, tuple[str, ...]] = {}
        for target in targets if eager else []:
            self.prepare(target)
        if self.refused and eager:
            warnings.warn(refused_replay_warning(self.refused), stacklevel=4)

    @property
    def refused(self) -> list[tuple[str, ...]]:
        return list(self.refused_of.values())

    def prepare(self, target: Target) -> tuple[str, ...]:
        """The units ``target``'s cells replay, chosen and verified on first use."""
        if target.name not in self.skips:
            skips = self.cache.skip_set(_cell_tensors(self.model, target, self.granularity))
            if skips and not self.cache.verified(skips):
                self.refused_of[target.name] = skips
                skips = ()
            self.skips[target.name] = skips
        return self.skips[target.name]

    def summary(self) -> dict:
        return {"units": len(self.cache.units), "targets_replaying": sum(1 for s in self.skips.values() if s),
                "refused_replays": len(set(self.refused)), "cache_bytes_in_memory": self.cache.held_bytes,
                "cache_bytes_spilled": self.cache.spilled_bytes}

    def on_batch(self, target: str):
        skips = self.skips.get(target, ())
        return (lambda index: self.cache.skipping(skips, index)) if skips else None

    def close(self) -> None:
        self.cache.close()


def refused_replay_warning(refused: Iterable[tuple[str, ...]]) -> str:
    """The warning for replay patterns that did not reproduce the full forward pass."""
    names = ", ".join(sorted({tuple(skips)[-1] for skips in refused})[:3])
    return (f"incremental scan: replaying the recorded outputs of {names} did not reproduce the full forward pass "
            "on batch 0; those cells run the full model")


def _cell_tensors(model: torch.nn.Module, target: Target, granularity: str) -> list[torch.Tensor]:
    """The parameters and buffers a target's cells change."""
    if granularity == "weight":
        return [weight_of(model, target)]
    tensors = {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}
    return [tensors[s.tensor] for s in target.group.slices if s.tensor in tensors]


class _Measure:
    """Evaluate one cell: all batches (exact) or batch by batch until the interval is tight (adaptive).

    Adaptive cells visit the batches in one seeded random order, the same for every cell: the
    batches seen first are then a random sample of the list (a list in the order of a text, or of
    a dataset sorted by class, would otherwise bias the early estimate), and cells stopped at the
    same count are compared on the same batches. The interval bounds the exact scan's change on
    all the batches, so its variance carries the finite-population correction (1 - n / N): it
    shrinks to the exact value once every sample is seen.
    """

    def __init__(self, evaluator: Evaluator, replay: _Replay | None, mode: str, tolerance: float | None,
                 confidence: float, max_drop: float | None, seed: int = 0, min_batches: int = 2) -> None:
        self.evaluator, self.replay, self.mode = evaluator, replay, mode
        self.min_batches = min(min_batches, len(evaluator.batches))
        self.tolerance, self.confidence, self.max_drop = tolerance, confidence, max_drop
        self.order = [int(i) for i in np.random.default_rng(seed).permutation(len(evaluator.batches))]

    def __call__(self, model: torch.nn.Module, name: str, key: str,
                 removal: tuple[float, Callable[[], Callable[[], None]]]) -> Cell:
        """Apply one removal in place, evaluate, and restore the model exactly."""
        started = time.perf_counter()
        sparsity, apply_removal = removal
        on_batch = self.replay.on_batch(name) if self.replay is not None else None
        restore = apply_removal()
        try:
            change = self._change(model, on_batch)
        finally:
            restore()
        return Cell(
            target=name,
            level=key,
            sparsity=sparsity,
            value=change.value,
            change=change.change,
            ci_low=change.ci_low,
            ci_high=change.ci_high,
            samples=change.samples,
            seconds=time.perf_counter() - started,
        )

    def _change(self, model: torch.nn.Module, on_batch) -> PairedChange:
        evaluator, log_scale = self.evaluator, self.evaluator.metric.log_scale
        dense = evaluator.dense
        if self.mode == "exact":
            pruned = evaluator.evaluate(model, on_batch=on_batch)
            return paired_change(dense.values, pruned.values, dense.weights, log_scale, self.confidence)
        anchor = float((dense.values * dense.weights).sum() / dense.weights.sum())
        done: list[int] = []
        values: list[np.ndarray] = []
        for index in self.order:
            done.append(index)
            values.append(evaluator.evaluate(model, batch_indices=[index], on_batch=on_batch).values)
            if len(done) < self.min_batches:
                continue
            dense_values, dense_weights = evaluator.dense_on(done)
            change = paired_change(dense_values, np.concatenate(values), dense_weights, log_scale, self.confidence,
                                   dense_mean=anchor, population=dense.samples)
            if change.ci_low is None:
                continue
            if (change.ci_high - change.ci_low) / 2 <= self.tolerance or self._past_cap(change):
                return change
        return change

    def _past_cap(self, change: PairedChange) -> bool:
        if self.max_drop is None:
            return False
        worst_case_small = -change.ci_high if self.evaluator.higher_is_better else change.ci_low
        return worst_case_small > self.max_drop
