"""Calibration data for estimates: the evaluator, the differentiable loss whose gradients are taken,
how a predicted loss change maps onto the metric, and a guard that leaves the model as it was.

The gradient loss follows the metric where the metric is a differentiable log-likelihood:

- ``"loss"``: the cross-entropy itself (nats); predictions are loss changes.
- ``"perplexity"``: the token NLL (nats/token); a predicted NLL change ``d`` maps to the
  perplexity change ``exp(L0 + d) - exp(L0)``, ``L0`` the dense mean NLL (as ``scan`` maps its
  paired differences).
- ``"accuracy"``: not differentiable, so the cross-entropy to the labels is used instead; a predicted
  loss change is then a score with the sign of an accuracy drop, not an accuracy change.
- ``"kl"``: KL(dense || model) has zero gradient at the dense model, but its Hessian there is the
  model's Fisher information. The loss is the NLL of labels *sampled* from the dense model's own
  output distribution (seeded), whose per-sample gradients estimate that Fisher: second-order
  methods (fisher) then predict the KL change in nats. First-order methods are refused.
- ``"cosine"`` and user callables have no log-likelihood: gradient methods are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..batches import logits_of, split_batch
from ..errors import PrunescopeError
from ..evaluator import Evaluator
from ..metrics import BUILTIN_METRICS

LossFn = Callable[[Any, Any, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``loss(output, batch, index) -> (per-sample values, per-sample weights)``, differentiable;
``index`` numbers the gradient chunk (it seeds sampled labels)."""

GRADIENT_METRICS = ("loss", "perplexity", "accuracy", "kl")


@dataclass(frozen=True)
class GradientLoss:
    """The loss gradients are taken of, and whether a change of it is a change of the metric."""

    name: str
    """What the loss is, for the Profile's provenance."""
    per_sample: LossFn
    predicts_metric: bool
    """True when a predicted change of this loss is a predicted change of the metric (loss, perplexity, kl)."""
    first_order: bool
    """False when the loss has zero expected gradient at the dense model (sampled labels for kl)."""


def infer_metric(batches: Sequence[Any]) -> str:
    """The metric of a plain list of batches: ``"loss"`` with labels, ``"perplexity"`` for a dict
    batch with ``input_ids`` and no labels (a causal LM), else ``"kl"`` (no labels needed)."""
    _, kwargs, labels = split_batch(batches[0])
    if labels is not None:
        return "loss"
    if "input_ids" in kwargs:
        return "perplexity"
    return "kl"


def as_evaluator(model: torch.nn.Module, data: Any, metric: str | None = None) -> Evaluator:
    """``data`` as an Evaluator: an Evaluator as is, or a list of batches with ``metric`` (inferred
    by :func:`infer_metric` when None)."""
    if isinstance(data, Evaluator):
        if metric is not None and metric != data.metric.name:
            raise PrunescopeError(f"metric={metric!r} conflicts with the evaluator's metric {data.metric.name!r}; give one")
        return data
    if data is None:
        raise PrunescopeError("data is None: give an Evaluator or a non-empty list of batches")
    batches = list(data)
    if not batches:
        raise PrunescopeError("the data iterable is empty (or already exhausted): give at least one batch")
    return Evaluator(model, batches, metric or infer_metric(batches))


def gradient_loss(evaluator: Evaluator, seed: int = 0) -> GradientLoss | None:
    """The differentiable loss for ``evaluator``'s metric (see the module docstring), or None."""
    name = evaluator.metric.name
    if evaluator.metric is not BUILTIN_METRICS.get(name):
        return None
    if name == "loss":
        return GradientLoss("cross-entropy to the labels (the metric, nats)", _drop_index(BUILTIN_METRICS["loss"].per_sample), True, True)
    if name == "perplexity":
        return GradientLoss("token NLL (log of the perplexity metric, nats/token)", _drop_index(BUILTIN_METRICS["perplexity"].per_sample), True, True)
    if name == "accuracy":
        return GradientLoss(
            "cross-entropy to the labels (accuracy is not differentiable; predictions are loss scores)",
            _drop_index(BUILTIN_METRICS["loss"].per_sample), False, True,
        )
    if name == "kl":
        return GradientLoss(
            f"NLL of labels sampled from the dense model's outputs (seed {seed}): its Fisher is the Hessian of the KL metric",
            _sampled_nll(seed), True, False,
        )
    return None


def _drop_index(per_sample: Callable) -> LossFn:
    return lambda output, batch, _index: per_sample(output, batch, None)


def _sampled_nll(seed: int) -> LossFn:
    """NLL of one label per position drawn from the model's own (detached) distribution, per sample:
    the mean over the positions the attention mask keeps, weighted by their count (as metric 'kl')."""

    def loss(output: Any, batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = F.log_softmax(logits_of(output).float(), dim=-1)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        flat = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()
        labels = torch.multinomial(flat, 1, generator=generator).to(logp.device).view(*logp.shape[:-1], 1)
        nll = -logp.gather(-1, labels).squeeze(-1).to(torch.float64)
        if nll.dim() == 1:
            return nll, torch.ones_like(nll)
        nll = nll.flatten(1)
        _, kwargs, _ = split_batch(batch)
        mask = kwargs.get("attention_mask")
        keep = torch.ones_like(nll) if mask is None else mask.reshape(nll.shape).to(torch.float64)
        positions = keep.sum(dim=1)
        return (nll * keep).sum(dim=1) / positions.clamp(min=1), positions

    return loss


def metric_change(evaluator: Evaluator, loss_change: float) -> float:
    """A predicted change of the gradient loss as a change of the metric (loss, kl: as is;
    perplexity: through exp around the dense mean NLL)."""
    if not evaluator.metric.log_scale:
        return loss_change
    dense = evaluator.dense
    mean = float((dense.values * dense.weights).sum() / dense.weights.sum())
    return math.exp(min(mean + loss_change, 700.0)) - math.exp(mean)


# ---- batches -------------------------------------------------------------------------------


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading size of its first input tensor."""
    args, kwargs, _ = split_batch(batch)
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise PrunescopeError("cannot tell the number of samples in a batch: it holds no tensor input")


def split_samples(batch: Any) -> list[Any]:
    """One batch of one sample per sample, in the batch's own structure (tensor, tuple, dict).
    Tensors whose leading size is not the batch size (shared inputs) are passed whole."""
    size = batch_size(batch)
    if size == 1:
        return [batch]

    def take(value: Any, i: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[i : i + 1]
        if isinstance(value, Mapping):
            return {k: take(v, i) for k, v in value.items()}
        return value

    if isinstance(batch, (tuple, list)):
        return [type(batch)(take(part, i) for part in batch) for i in range(size)]
    return [take(batch, i) for i in range(size)]
