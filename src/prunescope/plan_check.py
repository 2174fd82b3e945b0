"""Check a plan by applying it: the measured joint drop against the profile's additive prediction.

A plan allocated from a profile predicts its drop as the sum of the single-target drops the scan
measured. The damages of many pruned layers compound (or cancel), so the prediction is a ranking
device, not a forecast: :func:`check_plan` applies the plan the way it will be applied (Wanda and
SparseGPT plans calibrated block by block on ``calibration``), evaluates the pruned model, and
reports the measured drop with its paired interval, the prediction, and their ratio.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .apply import apply
from .errors import PrunescopeError
from .evaluator import Evaluator
from .plan import Plan
from .stats import paired_change


@dataclass(frozen=True)
class PlanCheck:
    """Dense and pruned metric on the evaluator's data, the measured drop (positive = worse, in metric
    units) with its paired ``confidence`` interval, the plan's ``predicted`` drop and
    ``ratio`` = predicted / measured (None when either is missing or the measured drop is 0)."""

    metric: str
    dense: float
    pruned: float
    measured: float
    ci_low: float | None
    ci_high: float | None
    predicted: float | None
    ratio: float | None
    samples: int
    confidence: float
    seconds: float
    sparsity: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_details(cls, plan: Plan) -> PlanCheck | None:
        """The check recorded in ``plan.details["check"]`` (by ``prunescope plan --check``), or None."""
        recorded = plan.details.get("check")
        if not isinstance(recorded, dict):
            return None
        try:
            return cls(**{name: recorded[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            raise PrunescopeError("the plan's details.check is damaged; run `prunescope plan --plan FILE --check` again") from None

    def line(self) -> str:
        """One line a person reads: dense -> pruned, measured drop [interval], predicted, ratio."""
        interval = "" if self.ci_low is None else f" [{self.ci_low:.4g}, {self.ci_high:.4g}]"
        predicted = "no prediction" if self.predicted is None else f"predicted {self.predicted:.4g}"
        ratio = "" if self.ratio is None else f", predicted/measured {self.ratio:.3g}"
        return (f"{self.metric} {self.dense:.4g} -> {self.pruned:.4g}: measured drop {self.measured:.4g}{interval} "
                f"({self.confidence:.0%}, {self.samples} samples), {predicted}{ratio}")


def check_plan(
    model: torch.nn.Module,
    plan: Plan,
    evaluator: Evaluator,
    *,
    calibration: Iterable[Any] | None = None,
    shrink: bool = False,
    example: Any = None,
    confidence: float = 0.95,
) -> PlanCheck:
    """Apply ``plan`` to a copy of ``model`` and measure its drop on ``evaluator`` against the dense model.

    ``calibration`` is required for Wanda and SparseGPT plans (as for :func:`prunescope.apply`);
    ``shrink``/``example`` apply a structured plan by a physically smaller model. The measured drop
    is on the evaluator's metric; the prediction is meaningful when the plan was allocated from a
    profile of the same metric (``plan.metric``), and the ratio is given only then.
    """
    plan = Plan.check_for(plan, model)
    if not isinstance(evaluator, Evaluator):
        raise PrunescopeError(f"evaluator must be a prunescope.Evaluator; got {type(evaluator).__name__}")
    evaluator.check_model(model)
    if not (isinstance(confidence, float) and 0.5 <= confidence < 1):
        raise PrunescopeError(f"confidence must be a fraction in [0.5, 1); got {confidence!r}")
    started = time.perf_counter()
    pruned = apply(model, plan, shrink=shrink, example=example, calibration=calibration)
    return check_pruned(pruned, plan, evaluator, confidence=confidence, started=started)


def check_pruned(pruned: torch.nn.Module, plan: Plan, evaluator: Evaluator, *, confidence: float = 0.95,
                 started: float | None = None) -> PlanCheck:
    """The check of a model already pruned by ``plan``, on ``evaluator`` (built on the dense model):
    one pruning can be checked on several evaluators (the profile's data, a held-out set)."""
    if not (isinstance(confidence, float) and 0.5 <= confidence < 1):
        raise PrunescopeError(f"confidence must be a fraction in [0.5, 1); got {confidence!r}")
    started = time.perf_counter() if started is None else started
    dense = evaluator.dense
    evaluation = evaluator.evaluate(pruned)
    metric = evaluator.metric
    change = paired_change(dense.values, evaluation.values, dense.weights, log_scale=metric.log_scale, confidence=confidence)
    sign = -1.0 if metric.higher_is_better else 1.0
    measured = sign * change.change
    low, high = (None, None) if change.ci_low is None else sorted((sign * change.ci_low, sign * change.ci_high))
    comparable = plan.predicted_drop is not None and plan.metric == metric.name
    predicted = plan.predicted_drop if comparable else None
    ratio = predicted / measured if predicted is not None and measured != 0 and math.isfinite(measured) else None
    return PlanCheck(metric.name, dense.value, evaluation.value, measured, low, high, predicted, ratio, change.samples,
                     confidence, time.perf_counter() - started, plan.sparsity)
