"""Evaluator: a fixed list of batches and a per-sample metric, run on the dense or a pruned model."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batches import batch_fingerprint_tensors, batch_size_of, logits_of, run_model, split_batch
from .checks import real_module
from .errors import PrunescopeError, describe, forward_failed
from .metrics import Metric, resolve_metric
from .modes import eval_mode
from .progress import progress_bar


@dataclass(frozen=True)
class Evaluation:
    """Per-sample values and weights of one evaluation pass, and the aggregate metric."""

    metric: str
    values: np.ndarray
    weights: np.ndarray
    value: float
    batch_sizes: tuple[int, ...] = ()
    """Samples contributed by each evaluated batch, in order (values are their concatenation)."""

    @property
    def samples(self) -> int:
        return int(self.values.size)


class Evaluator:
    """A reproducible evaluation: the same batches, in the same order, every time.

    Args:
        model: the dense model; its outputs are the reference for ``"kl"`` and ``"cosine"``.
        batches: an iterable of batches (tensor, ``(inputs, labels)``, or a dict of model kwargs);
            it is read once and kept as a list.
        metric: ``"accuracy"``, ``"loss"`` (cross-entropy, nats), ``"perplexity"`` (causal LM,
            token level), ``"kl"`` (KL(dense || model) in nats, needs no labels), ``"cosine"``
            (1 - cosine of the mean-pooled output to the dense model's: embedding models), or a callable
            ``(output, batch) -> per-sample tensor`` with ``higher_is_better`` given.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batches: Iterable[Any],
        metric: str | Metric | Callable = "accuracy",
        *,
        higher_is_better: bool | None = None,
    ) -> None:
        real_module(model)
        if batches is None:
            raise PrunescopeError("batches is None: give a non-empty list or iterable of batches")
        if isinstance(batches, (torch.Tensor, dict)):
            raise PrunescopeError(f"batches must be a list (or iterable) of batches; got one {type(batches).__name__}: wrap it as [batch]")
        try:
            self.batches = list(batches)
        except TypeError:
            raise PrunescopeError(f"batches must be a list (or iterable) of batches; got {type(batches).__name__}") from None
        if not self.batches:
            raise PrunescopeError("the data iterable is empty (or already exhausted): give at least one batch")
        for index, batch in enumerate(self.batches):
            _check_batch(batch, index)
        self.model = model
        self.metric = resolve_metric(metric, higher_is_better)
        self._reference: list[torch.Tensor] | None = None
        self._dense: Evaluation | None = None
        self._fingerprint: str | None = None

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model other than the one this evaluator was built on: its dense values and reference
        outputs come from that model, so cells measured on another would be compared with the wrong dense."""
        if model is not self.model:
            raise PrunescopeError(
                "the model is not the evaluator's: its dense reference comes from the model it was built on. "
                "Build the Evaluator on the model you analyse: Evaluator(model, batches, metric)"
            )

    @property
    def higher_is_better(self) -> bool:
        return self.metric.higher_is_better

    @property
    def fingerprint(self) -> str:
        """SHA-256 of every tensor in every batch (shapes, dtypes and bytes) and the metric name."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.metric.name.encode())
            for batch in self.batches:
                for tensor in batch_fingerprint_tensors(batch):
                    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
                    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def dense(self) -> Evaluation:
        """The dense model's evaluation, computed once; refuses a non-finite metric."""
        if self._dense is None:
            if self.metric.needs_reference and self._reference is None:
                self._reference = self._outputs(self.model)
            evaluation = self.evaluate(self.model)
            if not math.isfinite(evaluation.value) or not np.isfinite(evaluation.values).all():
                raise PrunescopeError(
                    f"metric {self.metric.name!r} is not finite on the dense model ({evaluation.value}); "
                    "check the data, labels and metric"
                )
            self._dense = evaluation
        return self._dense

    def _outputs(self, model: torch.nn.Module) -> list[torch.Tensor]:
        with eval_mode(model), torch.no_grad():
            return [logits_of(self._forward(model, i, batch)).detach().clone() for i, batch in enumerate(self.batches)]

    def _forward(self, model: torch.nn.Module, index: int, batch: Any) -> Any:
        try:
            return run_model(model, batch)
        except PrunescopeError:
            raise
        except Exception as error:  # the user's model failed: show its error once, briefly
            raise forward_failed(error, f"batch {index}") from error

    def evaluate(
        self,
        model: torch.nn.Module | None = None,
        progress: bool = False,
        *,
        batch_indices: Sequence[int] | None = None,
        on_batch: Callable[[int], AbstractContextManager] | None = None,
    ) -> Evaluation:
        """Run ``model`` (default: the dense model) over the batches in eval mode, without gradients.

        ``progress`` shows a bar with ETA; ``batch_indices`` evaluates only those batches (in that
        order); ``on_batch(index)`` returns a context entered around each batch's forward pass
        (incremental scans replay cached dense activations through it).
        """
        model = self.model if model is None else model
        if self.metric.needs_reference and self._reference is None:
            self._reference = self._outputs(self.model)
        indices = range(len(self.batches)) if batch_indices is None else list(batch_indices)
        values, weights = [], []
        with eval_mode(model), torch.no_grad(), progress_bar(len(indices), "evaluate", progress) as bar:
            for index in indices:
                batch = self.batches[index]
                with on_batch(index) if on_batch is not None else nullcontext():
                    output = self._forward(model, index, batch)
                bar.advance(1)
                reference = self._reference[index] if self._reference is not None else None
                batch_values, batch_weights = self._per_sample(output, batch, reference, index)
                values.append(torch.as_tensor(batch_values, dtype=torch.float64).reshape(-1))
                weights.append(torch.as_tensor(batch_weights, dtype=torch.float64).reshape(-1))
        all_values = torch.cat(values).numpy()
        all_weights = torch.cat(weights).numpy()
        mean = float((all_values * all_weights).sum() / all_weights.sum())
        sizes = tuple(int(v.numel()) for v in values)
        return Evaluation(self.metric.name, all_values, all_weights, self.metric.aggregate(mean), sizes)

    def _per_sample(self, output: Any, batch: Any, reference: Any, index: int) -> tuple[Any, Any]:
        """The metric on one batch; its failure (labels, shapes, a user callable) named by batch, in one line."""
        try:
            return self.metric.per_sample(output, batch, reference)
        except PrunescopeError as error:
            raise PrunescopeError(f"metric {self.metric.name!r} on batch {index}: {error}") from None
        except Exception as error:
            raise PrunescopeError(f"metric {self.metric.name!r} failed on batch {index}: {describe(error)}") from error

    def dense_on(self, batch_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The dense model's per-sample (values, weights) on ``batch_indices``, in that order."""
        dense = self.dense
        offsets = np.concatenate([[0], np.cumsum(dense.batch_sizes)])
        pieces = [np.arange(offsets[i], offsets[i + 1]) for i in batch_indices]
        chosen = np.concatenate(pieces) if pieces else np.arange(0)
        return dense.values[chosen], dense.weights[chosen]


def _check_batch(batch: Any, index: int) -> None:
    """A batch of a supported shape whose labels (if any) count as many samples as its inputs."""
    try:
        _, _, labels = split_batch(batch)
        samples = batch_size_of(batch)
    except PrunescopeError as error:
        raise PrunescopeError(f"batch {index}: {error}") from None
    if isinstance(labels, torch.Tensor) and labels.dim() > 0 and samples is not None and labels.shape[0] != samples:
        raise PrunescopeError(f"batch {index} has {samples} inputs but {labels.shape[0]} labels; give one label per sample")


def evaluate(model: torch.nn.Module, evaluator: Evaluator) -> Evaluation:
    """Evaluate ``model`` on the evaluator's batches and metric."""
    return evaluator.evaluate(model)
