"""Per-sample metrics. Each returns one value and one weight per sample so changes can be paired.

The aggregate of a metric is the weighted mean of its per-sample values, passed through
``transform`` (``exp`` for perplexity, whose per-sample values are mean token NLLs in nats).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .batches import batch_size_of, logits_of, split_batch
from .errors import PrunescopeError

PerSample = Callable[[Any, Any, Any], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Metric:
    """A named per-sample metric.

    ``per_sample(output, batch, reference)`` returns (values, weights), each of shape [samples];
    ``reference`` is the dense model's logits on the same batch when ``needs_reference``.
    """

    name: str
    per_sample: PerSample
    higher_is_better: bool
    needs_reference: bool = False
    log_scale: bool = False
    """True when per-sample values are logs and the aggregate is exp(weighted mean)."""

    def aggregate(self, mean: float) -> float:
        """The metric value from the weighted mean of per-sample values."""
        if not self.log_scale:
            return mean
        return math.exp(mean) if mean < 709.0 else math.inf  # exp overflows a double past ~709.78


def _labels(batch: Any) -> torch.Tensor:
    _, kwargs, labels = split_batch(batch)
    if labels is None:
        raise PrunescopeError("this metric needs labels: give batches as (inputs, labels); use metric='kl' without labels")
    return labels


def class_labels(logits: torch.Tensor, labels: Any, metric: str, ignore: bool = False) -> torch.Tensor:
    """``labels`` checked against ``logits`` [..., classes]: integer class indices of shape ``logits.shape[:-1]``,
    each in 0..classes-1 (or -100, ignored, when ``ignore``)."""
    labels = torch.as_tensor(labels)
    expected = tuple(logits.shape[:-1])
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise PrunescopeError(f"the {metric} metric needs integer class labels; got {labels.dtype}")
    if tuple(labels.shape) != expected:
        raise PrunescopeError(f"labels have shape {tuple(labels.shape)} but the model's logits {tuple(logits.shape)} "
                              f"need {expected}: one class index per {'sample' if len(expected) == 1 else 'position'}")
    classes = logits.shape[-1]
    scored = labels[labels != -100] if ignore else labels
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= classes):
        bad = int(scored.min()) if int(scored.min()) < 0 else int(scored.max())
        raise PrunescopeError(f"label {bad} is out of range for the {metric} metric: the model has {classes} classes "
                              f"(labels 0..{classes - 1}{', or -100 to ignore a position' if ignore else ''})")
    return labels


def _accuracy(output: Any, batch: Any, _ref: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_of(output)
    labels = class_labels(logits, _labels(batch), "accuracy", ignore=logits.dim() > 2)
    correct = (logits.argmax(dim=-1) == labels).to(torch.float64)
    if correct.dim() > 1:  # token classification: mean per sample
        correct = correct.flatten(1).mean(dim=1)
    return correct, torch.ones_like(correct)


def _loss(output: Any, batch: Any, _ref: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_of(output)
    labels = class_labels(logits, _labels(batch), "loss", ignore=logits.dim() > 2)
    if logits.dim() == 2:
        values = F.cross_entropy(logits.float(), labels, reduction="none").to(torch.float64)
        return values, torch.ones_like(values)
    return _token_nll(logits, labels, shift=False)


def _token_nll(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL per sequence (nats/token) and its token count; labels of -100 are ignored."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=-100
    ).view(labels.shape)
    counted = (labels != -100).to(torch.float64)
    tokens = counted.sum(dim=1)
    if bool((tokens == 0).any()):
        raise PrunescopeError("a sequence has no scored tokens (all labels -100 or length 1)")
    return (nll.to(torch.float64) * counted).sum(dim=1) / tokens, tokens


def _perplexity(output: Any, batch: Any, _ref: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_of(output)
    args, kwargs, labels = split_batch(batch)
    if labels is None:
        labels = kwargs.get("input_ids", args[0] if args else None)
        if labels is None:
            raise PrunescopeError("perplexity needs input_ids or labels in the batch")
        mask = kwargs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
    if logits.dim() != 3:
        raise PrunescopeError(f"perplexity needs causal-LM logits [batch, tokens, vocab]; got shape {tuple(logits.shape)}")
    return _token_nll(logits, class_labels(logits, labels, "perplexity", ignore=True), shift=True)


def _kl(output: Any, batch: Any, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(dense || model) in nats per sample; for sequences the mean over positions the
    attention mask keeps (all positions when there is none)."""
    logp = F.log_softmax(logits_of(output).float(), dim=-1)
    ref_logp = F.log_softmax(reference.float(), dim=-1)
    per_position = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).to(torch.float64)
    if per_position.dim() == 1:
        return per_position, torch.ones_like(per_position)
    per_position = per_position.flatten(1)
    _, kwargs, _ = split_batch(batch)
    mask = kwargs.get("attention_mask")
    keep = torch.ones_like(per_position) if mask is None else mask.reshape(per_position.shape).to(torch.float64)
    positions = keep.sum(dim=1)
    return (per_position * keep).sum(dim=1) / positions.clamp(min=1), positions


def _cosine(output: Any, batch: Any, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - cosine similarity to the dense model's output, per sample: for sequence outputs, of the
    mean over the positions the attention mask keeps (a sentence embedding, as SBERT pools it)."""
    current, dense = logits_of(output).float(), reference.float()
    if current.dim() == 3:
        _, kwargs, _ = split_batch(batch)
        mask = kwargs.get("attention_mask")
        keep = torch.ones(current.shape[:2]) if mask is None else mask.float()
        weights = (keep / keep.sum(dim=1, keepdim=True).clamp(min=1)).unsqueeze(-1)
        current, dense = (current * weights).sum(dim=1), (dense * weights).sum(dim=1)
    values = (1 - F.cosine_similarity(current.flatten(1), dense.flatten(1), dim=1)).to(torch.float64)
    return values, torch.ones_like(values)


BUILTIN_METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, higher_is_better=True),
    "loss": Metric("loss", _loss, higher_is_better=False),
    "perplexity": Metric("perplexity", _perplexity, higher_is_better=False, log_scale=True),
    "kl": Metric("kl", _kl, higher_is_better=False, needs_reference=True),
    "cosine": Metric("cosine", _cosine, higher_is_better=False, needs_reference=True),
}


def resolve_metric(metric: str | Metric | Callable, higher_is_better: bool | None = None) -> Metric:
    """Turn a name, a :class:`Metric` or a user callable into a :class:`Metric`.

    A user callable takes ``(output, batch)`` and returns one value per sample (a 1-D tensor);
    ``higher_is_better`` must then be given.
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in BUILTIN_METRICS:
            raise PrunescopeError(f"unknown metric {metric!r}; accepted: {', '.join(BUILTIN_METRICS)} or a callable")
        return BUILTIN_METRICS[metric]
    if callable(metric):
        if higher_is_better is None:
            raise PrunescopeError("a callable metric needs higher_is_better=True or False")
        name = getattr(metric, "__name__", "custom")

        def per_sample(output: Any, batch: Any, _ref: Any) -> tuple[torch.Tensor, torch.Tensor]:
            values = torch.as_tensor(metric(output, batch)).detach().to(torch.float64)
            if values.dim() != 1:
                raise PrunescopeError(
                    f"metric {name!r} must return one value per sample (a 1-D tensor); got shape {tuple(values.shape)}"
                )
            samples = batch_size_of(batch)
            if samples is not None and values.numel() != samples:
                raise PrunescopeError(f"metric {name!r} returned {values.numel()} values for a batch of {samples} samples; "
                                      "return one value per sample")
            return values, torch.ones_like(values)

        return Metric(name, per_sample, higher_is_better=bool(higher_is_better))
    raise PrunescopeError(f"metric must be one of {', '.join(BUILTIN_METRICS)} or a callable; got {metric!r}")
