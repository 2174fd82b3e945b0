"""Empirical sensitivity scan: prune one target at one level, evaluate, restore, for every cell."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .cell_runner import ScanSettings, TargetRunner
from .cost import CostModel
from .criteria import check_criterion, is_calibrated
from .errors import PrunescopeError
from .evaluator import Evaluator
from .execution import check_execution, run_parallel
from .execution.events import Task
from .execution.payload import WorkerContext, pack
from .fingerprint import model_fingerprint
from .identity import SPARSEGPT_OPTIONS, ScanIdentity
from .incremental import DEFAULT_MEMORY_BYTES
from .levels import DEFAULT_LEVELS, Level, NMPattern, level_key, parse_levels
from .masks import check_nm_compatible
from .profile import Cell, Profile
from .progress import progress_bar
from .scan_checks import check_scan_arguments, check_unit_levels
from .shards import shard_targets
from .store import CellStore
from .structured import BLOCK_LEVEL, head_mode_of, units_removed
from .target import Target
from .targets import find_targets
from .version import __version__

MODES = ("exact", "adaptive")


def scan(
    model: torch.nn.Module,
    evaluator: Evaluator,
    targets: list[Target] | None = None,
    *,
    levels: tuple[Level, ...] | list[Level] = DEFAULT_LEVELS,
    criterion: str = "magnitude",
    store: str | Path | None = None,
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
    dense_stats, calibration_identity = None, None
    check_criterion(criterion, granularity)
    if granularity == "weight":
        if is_calibrated(criterion):
            from .oneshot.dense_stats import DenseStats, batches_fingerprint

            if calibration is None:
                calibration, calibration_identity = evaluator.batches, "evaluator batches"
            else:
                calibration = list(calibration)
                if not calibration:
                    raise PrunescopeError("calibration batches are empty: give at least one batch, or None for the evaluator's")
                calibration_identity = batches_fingerprint(calibration)
            dense_stats = DenseStats(model, calibration, [t.name for t in targets], criterion)
        for level in parsed_levels:
            if isinstance(level, NMPattern):
                for t in targets:
                    check_nm_compatible(t.shape, t.input_dim, level, t.name)
    else:
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
    identity = ScanIdentity(
        model=fingerprint_before, data=evaluator.fingerprint, metric=evaluator.metric.name, criterion=criterion,
        granularity=granularity, levels=tuple(level_keys), seed=seed, confidence=confidence, round_to=round_to,
        head_mode=head_mode_of(targets) if granularity == "head" else None, calibration=calibration_identity,
        mode=mode, tolerance=tolerance if mode == "adaptive" else None, min_batches=min_batches,
        shard=tuple(shard) if shard is not None else None,
        options=dict(SPARSEGPT_OPTIONS) if criterion == "sparsegpt" else {})
    provenance = {**identity.provenance(), "samples": dense.samples, "batches": len(evaluator.batches),
                  "prunescope": __version__, "torch": torch.__version__}
    settings = ScanSettings(granularity, criterion, tuple(parsed_levels), tuple(level_keys), seed, round_to, max_drop,
                            mode, tolerance, confidence, incremental, cache_bytes, min_batches)
    parallel = executor == "ray" or (workers or 1) > 1
    payload = None
    if parallel:  # pickled before the store is opened: an unpicklable model writes nothing
        payload = pack(WorkerContext(model, evaluator, list(targets), settings, calibration if dense_stats is not None else None))
    cell_store = None
    if store is not None:
        cell_store = CellStore(store, identity.store_header())

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
