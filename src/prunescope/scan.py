"""Empirical sensitivity scan: prune one target at one level, evaluate, restore, for every cell."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .cost import CostModel
from .errors import PrunescopeError
from .evaluator import Evaluator
from .fingerprint import model_fingerprint
from .levels import DEFAULT_LEVELS, Level, NMPattern, level_key, level_sparsity, parse_levels
from .masks import CALIBRATED_CRITERIA, check_criterion, check_nm_compatible, keep_mask
from .profile import Cell, Profile
from .progress import progress_bar
from .stats import paired_change
from .store import CellStore
from .structured import BLOCK_LEVEL, head_mode_of, mask_target, structured_criterion, units_removed
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
    round_to: int | None = None,
    calibration: Iterable[Any] | None = None,
    progress: bool = False,
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
    """
    if not isinstance(evaluator, Evaluator):
        raise PrunescopeError("evaluator must be a prunescope.Evaluator built on the model and its batches")
    parsed_levels = parse_levels(levels)
    if max_drop is not None and not max_drop > 0:
        raise PrunescopeError(f"max_drop must be positive (metric units); got {max_drop}")
    if not 0 < confidence < 1:
        raise PrunescopeError(f"confidence must be in (0, 1); got {confidence}")
    fingerprint_before = model_fingerprint(model)
    if targets is None:
        targets = find_targets(model, example=evaluator.batches[0])
    if not targets:
        raise PrunescopeError("targets is empty: give at least one Target (see find_targets)")
    granularity = _single_granularity(targets)
    dense_stats, calibration_identity = None, {}
    if granularity == "weight":
        check_criterion(criterion)
        weights = {t.name: weight_of(model, t) for t in targets}
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
        "prunescope": __version__,
        "torch": torch.__version__,
    }
    cell_store = None
    if store is not None:
        identity = {"model": fingerprint_before, "data": evaluator.fingerprint, "metric": evaluator.metric.name,
                    "criterion": criterion, "seed": seed, "levels": level_keys, "granularity": granularity,
                    "confidence": confidence, **({"round_to": round_to} if round_to else {}),
                    **calibration_identity,
                    **({"head_mode": head_mode_of(targets)} if granularity == "head" else {})}
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
                    if granularity == "weight":
                        removal = _weight_removal(target, weights[target.name], level, criterion, seed, model, dense_stats)
                    else:
                        removal = _unit_removal(model, target, level, criterion, seed, round_to)
                    cell = _measure_cell(model, evaluator, target.name, key, removal, confidence)
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


def _weight_removal(target: Target, weight: torch.Tensor, level: float | NMPattern, criterion: str, seed: int,
                    model: torch.nn.Module, dense_stats=None):
    """(sparsity, apply) for a weight target: apply() zeroes the masked elements in place (a
    calibrated criterion writes its pruned, possibly updated weight) and returns a restore that
    copies the original values back."""
    if dense_stats is not None:
        from .oneshot.dense_stats import pruned_weight

        pruned = pruned_weight(model, target.name, level, criterion, dense_stats.get(target.name))
    else:
        mask = keep_mask(weight, level, criterion, target.input_dim, seed=seed, key=target.name)

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


def _measure_cell(
    model: torch.nn.Module,
    evaluator: Evaluator,
    name: str,
    key: str,
    removal: tuple[float, Callable[[], Callable[[], None]]],
    confidence: float,
) -> Cell:
    """Apply one removal in place, evaluate, and restore the model exactly."""
    started = time.perf_counter()
    sparsity, apply_removal = removal
    restore = apply_removal()
    try:
        pruned = evaluator.evaluate(model)
    finally:
        restore()
    dense = evaluator.dense
    change = paired_change(dense.values, pruned.values, dense.weights, evaluator.metric.log_scale, confidence)
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
