"""Empirical sensitivity scan: prune one target at one level, evaluate, restore, for every cell."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .cost import CostModel
from .errors import PrunescopeError
from .evaluator import Evaluator
from .fingerprint import model_fingerprint
from .incremental import DEFAULT_MEMORY_BYTES, PrefixCache
from .levels import DEFAULT_LEVELS, Level, NMPattern, level_key, level_sparsity, parse_levels
from .masks import CALIBRATED_CRITERIA, check_criterion, check_nm_compatible, keep_mask, magnitude_order
from .profile import Cell, Profile
from .progress import progress_bar
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
    incremental: bool = True,
    cache_bytes: int = DEFAULT_MEMORY_BYTES,
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

    Speed. With ``incremental`` (default) the dense outputs of the modules that run before a cell's
    target are recorded once (up to ``cache_bytes`` in memory, the rest spilled to disk) and
    replayed, so a cell runs only from its target onwards; every replay pattern is first checked
    to reproduce the full forward on batch 0, else its cells run in full (see
    :mod:`prunescope.incremental`). Results are identical to the full evaluation.
    ``mode="adaptive"`` evaluates each cell batch by batch (at least two) and stops once the
    half-width of the change's confidence interval is at most ``tolerance`` (metric units), or
    once the interval lies entirely past ``max_drop``; each cell reports the samples it used.
    ``mode="exact"`` (default) evaluates every batch.
    """
    if not isinstance(evaluator, Evaluator):
        raise PrunescopeError("evaluator must be a prunescope.Evaluator built on the model and its batches")
    parsed_levels = parse_levels(levels)
    if max_drop is not None and not max_drop > 0:
        raise PrunescopeError(f"max_drop must be positive (metric units); got {max_drop}")
    if not 0 < confidence < 1:
        raise PrunescopeError(f"confidence must be in (0, 1); got {confidence}")
    if mode not in MODES:
        raise PrunescopeError(f"unknown scan mode {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "adaptive" and not (tolerance is not None and tolerance > 0):
        raise PrunescopeError(f"mode 'adaptive' needs a positive tolerance (half-width of the change's interval, metric units); got {tolerance}")
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
                    **({"mode": mode, "tolerance": tolerance} if mode == "adaptive" else {}),
                    **({"head_mode": head_mode_of(targets)} if granularity == "head" else {})}
        cell_store = CellStore(store, identity)

    replay = _Replay(model, evaluator, targets, granularity, cache_bytes) if incremental else None
    if replay is not None:
        provenance["incremental"] = replay.summary()
    measure = _Measure(evaluator, replay, mode, tolerance, confidence, max_drop)
    cells: list[Cell] = []
    total = len(targets) * len(parsed_levels)
    with progress_bar(total, "scan", enabled=progress) as bar:
        for target in targets:
            stopped = False
            order = None
            if granularity == "weight" and criterion == "magnitude" and dense_stats is None:
                order = magnitude_order(weights[target.name])  # one sort serves every fractional level
            for level, key in zip(parsed_levels, level_keys, strict=True):
                fractional = not isinstance(level, NMPattern)
                if stopped and fractional:
                    bar.advance(1, f"{target.name} skipped past max_drop")
                    continue
                cell = cell_store.get(target.name, key) if cell_store else None
                if cell is None:
                    if granularity == "weight":
                        removal = _weight_removal(target, weights[target.name], level, criterion, seed, model, dense_stats, order)
                    else:
                        removal = _unit_removal(model, target, level, criterion, seed, round_to)
                    cell = measure(model, target.name, key, removal)
                    if cell_store:
                        cell_store.append(cell)
                cells.append(cell)
                drop = -cell.change if evaluator.higher_is_better else cell.change
                if max_drop is not None and fractional and drop > max_drop:
                    stopped = True
                bar.advance(1, f"{target.name} @ {key}: {cell.value:.4g}")
    if replay is not None:
        replay.close()
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
                 cache_bytes: int) -> None:
        self.cache = PrefixCache(model, evaluator, cache_bytes)
        self.skips: dict[str, tuple[str, ...]] = {}
        self.refused: list[tuple[str, ...]] = []
        for target in targets:
            skips = self.cache.skip_set(_cell_tensors(model, target, granularity))
            if skips and not self.cache.verified(skips):
                self.refused.append(skips)
                skips = ()
            self.skips[target.name] = skips
        if self.refused:
            warnings.warn(
                f"incremental scan: replaying the recorded outputs of {', '.join(sorted({s[-1] for s in self.refused})[:3])} "
                "did not reproduce the full forward pass on batch 0; those cells run the full model", stacklevel=3)

    def summary(self) -> dict:
        return {"units": len(self.cache.units), "targets_replaying": sum(1 for s in self.skips.values() if s),
                "refused_replays": len(set(self.refused)), "cache_bytes_in_memory": self.cache.held_bytes,
                "cache_bytes_spilled": self.cache.spilled_bytes}

    def on_batch(self, target: str):
        skips = self.skips.get(target, ())
        return (lambda index: self.cache.skipping(skips, index)) if skips else None

    def close(self) -> None:
        self.cache.close()


def _cell_tensors(model: torch.nn.Module, target: Target, granularity: str) -> list[torch.Tensor]:
    """The parameters and buffers a target's cells change."""
    if granularity == "weight":
        return [weight_of(model, target)]
    tensors = {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}
    return [tensors[s.tensor] for s in target.group.slices if s.tensor in tensors]


class _Measure:
    """Evaluate one cell: all batches (exact) or batch by batch until the interval is tight (adaptive)."""

    def __init__(self, evaluator: Evaluator, replay: _Replay | None, mode: str, tolerance: float | None,
                 confidence: float, max_drop: float | None) -> None:
        self.evaluator, self.replay, self.mode = evaluator, replay, mode
        self.tolerance, self.confidence, self.max_drop = tolerance, confidence, max_drop

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
        for index in range(len(evaluator.batches)):
            done.append(index)
            values.append(evaluator.evaluate(model, batch_indices=[index], on_batch=on_batch).values)
            if len(done) < 2 and len(evaluator.batches) > 1:
                continue
            dense_values, dense_weights = evaluator.dense_on(done)
            change = paired_change(dense_values, np.concatenate(values), dense_weights, log_scale, self.confidence, dense_mean=anchor)
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
