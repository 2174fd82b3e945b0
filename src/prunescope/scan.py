"""Empirical sensitivity scan: prune one target at one level, evaluate, restore, for every cell."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import __version__
from .errors import PrunescopeError
from .evaluator import Evaluator
from .fingerprint import model_fingerprint
from .levels import DEFAULT_LEVELS, Level, NMPattern, level_key, level_sparsity, parse_levels
from .masks import check_criterion, check_nm_compatible, keep_mask
from .profile import Cell, Profile
from .progress import progress_bar
from .stats import paired_change
from .store import CellStore
from .targets import Target, find_targets, weight_of


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
    progress: bool = False,
) -> Profile:
    """Measure the metric change of every (target, level) cell, one cell at a time.

    Each cell removes ``level`` of one target by ``criterion`` (``"magnitude"`` or seeded
    ``"random"``; levels are fractions in (0, 1) or N:M patterns such as ``"2:4"``), evaluates
    the model, and restores the weights bit for bit. ``store`` is a JSONL file that receives each
    finished cell; a re-run with the same store skips finished cells. ``max_drop`` stops a
    target's fractional levels once its drop (in metric units, positive = worse) exceeds it.
    The model is left exactly as it was: parameters, buffers, requires_grad and train/eval mode.
    """
    if not isinstance(evaluator, Evaluator):
        raise PrunescopeError("evaluator must be a prunescope.Evaluator built on the model and its batches")
    parsed_levels = parse_levels(levels)
    check_criterion(criterion)
    if max_drop is not None and not max_drop > 0:
        raise PrunescopeError(f"max_drop must be positive (metric units); got {max_drop}")
    if not 0 < confidence < 1:
        raise PrunescopeError(f"confidence must be in (0, 1); got {confidence}")
    fingerprint_before = model_fingerprint(model)
    if targets is None:
        targets = find_targets(model, example=evaluator.batches[0])
    if not targets:
        raise PrunescopeError("targets is empty: give at least one Target (see find_targets)")
    weights = {t.name: weight_of(model, t) for t in targets}
    for level in parsed_levels:
        if isinstance(level, NMPattern):
            for t in targets:
                check_nm_compatible(t.shape, t.input_dim, level, t.name)
    dense = evaluator.dense  # refuses a failing forward or a non-finite metric before any file is written
    level_keys = [level_key(level) for level in parsed_levels]
    provenance = {
        "model_sha256": fingerprint_before,
        "data_sha256": evaluator.fingerprint,
        "samples": dense.samples,
        "batches": len(evaluator.batches),
        "seed": seed,
        "prunescope": __version__,
        "torch": torch.__version__,
    }
    cell_store = None
    if store is not None:
        identity = {"model": fingerprint_before, "data": evaluator.fingerprint, "metric": evaluator.metric.name,
                    "criterion": criterion, "seed": seed, "levels": level_keys, "granularity": "weight",
                    "confidence": confidence}
        cell_store = CellStore(store, identity)

    cells: list[Cell] = []
    total = len(targets) * len(parsed_levels)
    with progress_bar(total, "scan", enabled=progress) as bar:
        for target in targets:
            stopped = False
            for level, key in zip(parsed_levels, level_keys, strict=True):
                fractional = not isinstance(level, NMPattern)
                if stopped and fractional:
                    bar.advance(1, f"{target.name} skipped past max_drop")
                    continue
                cell = cell_store.get(target.name, key) if cell_store else None
                if cell is None:
                    cell = _measure_cell(model, evaluator, target, weights[target.name], level, key, criterion, seed, confidence)
                    if cell_store:
                        cell_store.append(cell)
                cells.append(cell)
                drop = -cell.change if evaluator.higher_is_better else cell.change
                if max_drop is not None and fractional and drop > max_drop:
                    stopped = True
                bar.advance(1, f"{target.name} @ {key}: {cell.value:.4g}")
    return Profile(
        metric=evaluator.metric.name,
        higher_is_better=evaluator.higher_is_better,
        dense_value=dense.value,
        criterion=criterion,
        granularity="weight",
        levels=level_keys,
        targets=list(targets),
        cells=cells,
        kind="measured",
        confidence=confidence,
        provenance=provenance,
    )


def _measure_cell(
    model: torch.nn.Module,
    evaluator: Evaluator,
    target: Target,
    weight: torch.Tensor,
    level: float | NMPattern,
    key: str,
    criterion: str,
    seed: int,
    confidence: float,
) -> Cell:
    """Prune one target in place, evaluate, and restore its exact original values."""
    started = time.perf_counter()
    mask = keep_mask(weight, level, criterion, target.input_dim, seed=seed, key=target.name)
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(mask)
        pruned = evaluator.evaluate(model)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    dense = evaluator.dense
    change = paired_change(dense.values, pruned.values, dense.weights, evaluator.metric.log_scale, confidence)
    return Cell(
        target=target.name,
        level=key,
        sparsity=level_sparsity(level),
        value=change.value,
        change=change.change,
        ci_low=change.ci_low,
        ci_high=change.ci_high,
        samples=change.samples,
        seconds=time.perf_counter() - started,
    )
