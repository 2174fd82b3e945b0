"""One pass of gradients over the calibration data: the mean gradient, the empirical Fisher diagonal,
and per-sample gradient callbacks (for head importance), without leaving anything on the model.

Conventions. The calibration loss is ``L = sum_n w_n l_n / W`` over samples ``n`` with the metric's
per-sample values ``l_n`` (a sequence's mean token NLL, an image's cross-entropy) and weights ``w_n``
(tokens per sequence, 1 per image), ``W = sum_n w_n``: the same mean the metric takes.

- ``mean``: ``dL/dtheta``, from one backward per batch (per-batch and per-sample give the same).
- ``fisher``: the **per-sample** empirical Fisher diagonal ``(1/W) sum_n (d(w_n l_n)/dtheta)^2``, from
  one backward per sample. For one label per sample this is the textbook ``mean_n g_n^2``; for a
  sequence it squares the gradient of the sequence's *summed* token NLL, which estimates the
  token-level Fisher when token gradients are uncorrelated (exactly so in expectation for labels
  sampled from the model, the KL case). Then ``0.5 * sum F w^2`` is the OBD loss change.

Gradients are taken with ``torch.autograd.grad`` in eval mode, so no ``.grad`` is ever written;
``requires_grad`` is switched on for the named tensors only while the pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..batches import run_model
from ..errors import PrunescopeError, forward_failed
from ..evaluator import Evaluator
from ..modes import eval_mode
from .calibration import GradientLoss, split_samples

OnGradient = Callable[[dict[str, torch.Tensor], float], None]
"""Called per chunk with the gradients of ``sum_{n in chunk} w_n l_n`` and the chunk's weight."""


@dataclass
class Gradients:
    """Accumulated gradient statistics of the calibration loss, per named parameter."""

    mean: dict[str, torch.Tensor]
    """dL/dtheta (empty unless asked for)."""
    fisher: dict[str, torch.Tensor]
    """Per-sample empirical Fisher diagonal (empty unless asked for)."""
    samples: int
    total_weight: float
    loss: float
    """The calibration loss L at the dense model."""


def parameters_by_name(model: torch.nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    """The model's parameters named ``names`` (state_dict keys), refusing names it does not have."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in parameters]
    if missing:
        raise PrunescopeError(f"the model has no parameter {', '.join(missing[:3])}; were the targets found on another model?")
    return [parameters[n] for n in names]


def gradient_pass(
    model: torch.nn.Module,
    evaluator: Evaluator,
    loss: GradientLoss,
    names: Sequence[str],
    on_gradient: OnGradient,
    *,
    per_sample: bool,
) -> tuple[int, float, float]:
    """Run the calibration batches forward and backward once; returns (samples, total weight, loss L).

    ``per_sample`` splits each batch into one-sample chunks (needed for Fisher and head importance).
    """
    tensors = parameters_by_name(model, names)
    samples, total_weight, total_loss, index = 0, 0.0, 0.0, 0
    with eval_mode(model, tensors), torch.enable_grad():
        for batch_index, batch in enumerate(evaluator.batches):
            for chunk in split_samples(batch) if per_sample else [batch]:
                try:
                    output = run_model(model, chunk)
                except PrunescopeError:
                    raise
                except Exception as error:
                    raise forward_failed(error, f"batch {batch_index}") from error
                values, weights = loss.per_sample(output, chunk, index)
                weights = weights.detach()
                summed = (values * weights).sum()
                grads = torch.autograd.grad(summed, tensors, allow_unused=True)
                grads = {n: torch.zeros_like(t) if g is None else g.detach() for n, t, g in zip(names, tensors, grads, strict=True)}
                on_gradient(grads, float(weights.sum()))
                samples += int(values.numel())
                total_weight += float(weights.sum())
                total_loss += float(summed.detach())
                index += 1
    if not total_weight > 0:
        raise PrunescopeError("the calibration data has no weight (no scored samples or tokens)")
    return samples, total_weight, total_loss / total_weight


def accumulate_gradients(
    model: torch.nn.Module, evaluator: Evaluator, loss: GradientLoss, names: Sequence[str], *, mean: bool = False, fisher: bool = False
) -> Gradients:
    """The mean gradient and/or the per-sample Fisher diagonal of the calibration loss for ``names``."""
    grad_sum: dict[str, torch.Tensor] = {}
    square_sum: dict[str, torch.Tensor] = {}

    def add(grads: dict[str, torch.Tensor], _weight: float) -> None:
        for name, g in grads.items():
            if mean:
                grad_sum[name] = grad_sum[name] + g if name in grad_sum else g.clone()
            if fisher:
                square_sum[name] = square_sum[name] + g.square() if name in square_sum else g.square()

    samples, weight, value = gradient_pass(model, evaluator, loss, names, add, per_sample=fisher)
    return Gradients(
        mean={n: g / weight for n, g in grad_sum.items()},
        fisher={n: s / weight for n, s in square_sum.items()},
        samples=samples,
        total_weight=weight,
        loss=value,
    )
