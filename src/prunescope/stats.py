"""Paired comparison of two evaluations on the same samples, with a t confidence interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtrit  # the t quantile; scipy.stats costs ~1 s more to import in every worker


@dataclass(frozen=True)
class PairedChange:
    """Change of a metric (pruned minus dense, on the metric's own scale) and its interval."""

    value: float
    change: float
    ci_low: float | None
    ci_high: float | None
    samples: int


def paired_change(
    dense_values: np.ndarray,
    pruned_values: np.ndarray,
    weights: np.ndarray,
    log_scale: bool = False,
    confidence: float = 0.95,
    dense_mean: float | None = None,
    population: int | None = None,
) -> PairedChange:
    """Weighted mean of the per-sample differences and its t interval (ratio-estimator variance).

    With ``log_scale`` the per-sample values are logs (token NLL) and the metric is exp(mean): the
    interval of the mean difference is mapped through exp, which is exact because exp is monotone.
    ``dense_mean`` (on the per-sample scale) anchors the value and the exp mapping when the samples
    are a subset of the data (adaptive scans): the change is then added to the full data's dense mean.
    ``population`` (the data's sample count, when these samples were drawn from it at random without
    replacement) makes the interval bound the change on the whole data: the variance is multiplied
    by the finite-population correction 1 - n / population.
    """
    weights = np.asarray(weights, dtype=np.float64)
    diff = np.asarray(pruned_values, np.float64) - np.asarray(dense_values, np.float64)
    total = weights.sum()
    if dense_mean is None:
        dense_mean = float((weights * dense_values).sum() / total)
    mean_diff = float((weights * diff).sum() / total)
    n = diff.size
    if n > 1:
        scaled = weights * (diff - mean_diff)
        se = math.sqrt(n / (n - 1) * float((scaled**2).sum())) / total
        if population is not None:
            se *= math.sqrt(max(0.0, 1.0 - n / population))
        half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * se
        low, high = float(mean_diff - half), float(mean_diff + half)
    else:
        low = high = None

    def to_metric(delta: float) -> float:
        return float(math.exp(dense_mean + delta) - math.exp(dense_mean) if log_scale else delta)

    value = float(math.exp(dense_mean + mean_diff) if log_scale else dense_mean + mean_diff)
    return PairedChange(
        value=value,
        change=to_metric(mean_diff),
        ci_low=None if low is None else to_metric(low),
        ci_high=None if high is None else to_metric(high),
        samples=n,
    )
