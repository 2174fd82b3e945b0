"""Measuring one cell: replaying recorded dense outputs before its target (see
:mod:`prunescope.incremental`) and evaluating all batches (exact) or until the paired interval is
tight (adaptive)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch

from .evaluator import Evaluator
from .incremental import PrefixCache
from .profile import Cell
from .stats import PairedChange, paired_change
from .target import Target, weight_of


class Replay:
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


class Measure:
    """Evaluate one cell: all batches (exact) or batch by batch until the interval is tight (adaptive).

    Adaptive cells visit the batches in one seeded random order, the same for every cell: the
    batches seen first are then a random sample of the list (a list in the order of a text, or of
    a dataset sorted by class, would otherwise bias the early estimate), and cells stopped at the
    same count are compared on the same batches. The interval bounds the exact scan's change on
    all the batches, so its variance carries the finite-population correction (1 - n / N): it
    shrinks to the exact value once every sample is seen.
    """

    def __init__(self, evaluator: Evaluator, replay: Replay | None, mode: str, tolerance: float | None,
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
