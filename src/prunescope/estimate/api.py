"""estimate(): predicted sensitivity of every (target, level) cell from one or two passes over
calibration data, returned as the same :class:`~prunescope.Profile` as ``scan``, marked estimated."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cost import CostModel
from ..criteria import check_criterion
from ..errors import PrunescopeError
from ..evaluator import Evaluator
from ..fingerprint import model_fingerprint
from ..levels import DEFAULT_LEVELS, Level, NMPattern, level_key, level_sparsity, parse_levels
from ..masks import check_nm_compatible, keep_mask
from ..profile import Cell, Profile
from ..progress import progress_bar
from ..structured import BLOCK_LEVEL, units_removed
from ..target import Target, weight_of
from ..targets import find_targets
from ..version import __version__
from .activations import feature_activations, input_moments
from .blocks import block_influence
from .calibration import as_evaluator, gradient_loss, metric_change
from .gradients import accumulate_gradients, gradient_pass
from .unit_scores import (
    activation_units,
    consumer_features,
    gate_gradients,
    gradient_units,
    in_slice_tensors,
    magnitude_units,
)
from .weight_scores import gradient_scores, magnitude_scores, obs_error, wanda_scores

UNITS = ("channel", "head", "neuron")
OBS_BLOCK_SIZE = 128
OBS_DAMP = 0.01
"""SparseGPT's defaults (columns per lazy update; dampening as a fraction of the mean diagonal of H)."""


@dataclass(frozen=True)
class Score:
    """What a score applies to, what it needs and what its number means."""

    granularities: tuple[str, ...]
    needs_data: bool
    gradient: str | None
    """None, ``"first"`` (needs a non-zero mean gradient) or ``"sample"`` (per-sample gradients)."""
    predicts_loss: bool
    """True: the number is a predicted change of the gradient loss (mapped to the metric when it is
    one); False: a rank-only score."""
    meaning: str


SCORES: dict[str, Score] = {
    "magnitude": Score(("weight", *UNITS), False, None, False,
                        "share of the target's sum |w|^p removed (data-free score in [0, 1])"),
    "snip": Score(("weight", *UNITS), True, "first", False,
                   "sum of |g w| over the removed elements (Lee et al. 2019; score, nats of |first-order terms|)"),
    "taylor": Score(("weight", *UNITS), True, "first", True,
                     "first-order loss change -sum g w of the removal (Molchanov et al. 2019)"),
    "fisher": Score(("weight", *UNITS), True, "sample", True,
                     "second-order loss change 0.5 sum F w^2, per-sample empirical Fisher diagonal (OBD)"),
    "obs": Score(("weight",), True, None, False,
                  "SparseGPT's OBS reconstruction error of the layer output per calibration token (score)"),
    "wanda": Score(("weight",), True, None, False,
                    "sum of the removed (|w| ||x||)^2 per calibration token (Sun et al. 2023; score)"),
    "activation": Score(("channel", "neuron"), True, None, False,
                         "share of the group's mean |activation| removed (score)"),
    "apoz": Score(("channel", "neuron"), True, None, False,
                   "share of the group's non-zero activations removed, 1 - APoZ (Hu et al. 2016; score)"),
    "block_influence": Score(("block",), True, None, False,
                              "1 - mean cos(block input, block output) (ShortGPT, Men et al. 2024; score)"),
    "head_importance": Score(("head",), True, "sample", False,
                              "E_n |dl_n/dgate| of the removed heads (Michel et al. 2019; score, nats)"),
}


def estimate(
    model: torch.nn.Module,
    data: Evaluator | Sequence[Any] | None,
    targets: list[Target] | None = None,
    *,
    score: str = "fisher",
    levels: Sequence[Level] = DEFAULT_LEVELS,
    criterion: str | None = None,
    metric: str | None = None,
    seed: int = 0,
    round_to: int | None = None,
    p: float = 2.0,
    block_size: int = OBS_BLOCK_SIZE,
    damp: float = OBS_DAMP,
    progress: bool = False,
) -> Profile:
    """Predict every (target, level) cell of a sensitivity scan without running it.

    Args:
        model: the dense model; left bit-identical (parameters, buffers, ``requires_grad``,
            train/eval flags), with no gradient and no hook left behind.
        data: an :class:`Evaluator` (its batches and metric) or a list of batches (metric
            ``metric=``, else ``"loss"`` with labels, ``"perplexity"`` for ``input_ids`` dicts,
            ``"kl"`` otherwise). ``None`` for the data-free ``"magnitude"`` only.
        targets: as for ``scan`` (default: every weight target, output layer excluded); structured
            targets come from ``find_targets(model, "channel" | "head" | "neuron" | "block")``.
        score: one of :data:`SCORES` (see :func:`describe_scores`); each applies to some
            granularities only.
        levels: fractions or N:M patterns, as for ``scan`` (blocks: one level, removed whole).
        criterion: which elements (units) a level removes, as ``scan`` would remove them (default
            ``"magnitude"``): ``"magnitude"`` or ``"random"`` for weights, ``"magnitude"`` (= l2),
            ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"random"`` for units. Every score scores that
            removed set, so its estimate is for the same cell the scan measures. ``"obs"`` estimates
            SparseGPT's own pruning (its mask and its update of the kept weights) and takes only
            ``"sparsegpt"``, its default: compare it with ``scan(..., criterion="sparsegpt")``.
        p: exponent of the magnitude score.
        block_size, damp: SparseGPT's options for ``"obs"``.

    Returns:
        A Profile with ``kind="estimated"``. Methods that predict a loss change (taylor, fisher)
        give cells in the metric's units when the metric is the differentiated loss (``"loss"``,
        ``"perplexity"`` through exp, ``"kl"`` for fisher); for accuracy they give the predicted
        cross-entropy change as a score. For a score, ``value`` is the score and ``change`` carries
        it with the sign of a drop, so ``profile.drop(cell)`` is the score and ``allocate`` and the
        report work unchanged. Intervals are None. ``provenance`` holds the score, the loss
        differentiated, the units, the calibration samples and the seconds spent.
    """
    if isinstance(data, Evaluator):
        data.check_model(model)
    started = time.perf_counter()
    spec = check_score(score)
    parsed_levels = parse_levels(levels)
    if data is None and spec.needs_data:
        raise PrunescopeError(f"score {score!r} needs calibration data: give an Evaluator or a list of batches")
    if p <= 0:
        raise PrunescopeError(f"p must be positive (exponent of |w|); got {p}")
    evaluator = as_evaluator(model, data, metric) if data is not None else None
    loss = _gradient_loss(score, spec, evaluator, seed)
    example = evaluator.batches[0] if evaluator is not None else None
    if targets is None:
        targets = find_targets(model, example=example)
    if not targets:
        raise PrunescopeError("targets is empty: give at least one Target (see find_targets)")
    granularity = _single_granularity(targets)
    check_score(score, granularity)
    criterion = _criterion(score, criterion)
    parsed_levels = _check_levels(model, targets, parsed_levels, granularity, criterion)
    removals = {} if granularity == "weight" else _unit_removals(model, targets, parsed_levels, granularity, criterion, seed, round_to)
    fingerprint = model_fingerprint(model)
    dense = evaluator.dense if evaluator is not None else None

    with progress_bar(len(targets), f"estimate {score}", enabled=progress) as bar:
        if granularity == "weight":
            predictions = _predict_weights(model, evaluator, loss, targets, parsed_levels, score, criterion, seed, p, block_size, damp, bar)
        else:
            predictions = _predict_units(model, evaluator, loss, targets, removals, score, p, bar)
    costs = CostModel.of(model, example).to_dict()
    seconds = time.perf_counter() - started
    samples = dense.samples if spec.needs_data else 0

    if evaluator is None:
        metric_name, higher_is_better, dense_value = "score", False, 0.0
    else:
        metric_name, higher_is_better, dense_value = evaluator.metric.name, evaluator.higher_is_better, dense.value
    in_metric_units = spec.predicts_loss and loss is not None and loss.predicts_metric
    cells = []
    for (name, key), (sparsity, predicted) in predictions.items():
        if in_metric_units:
            change = metric_change(evaluator, predicted)
            value = dense_value + change
        else:
            value, change = predicted, (-predicted if higher_is_better else predicted)
        cells.append(Cell(name, key, sparsity, value, change, None, None, samples, seconds / max(len(predictions), 1)))
    units = f"predicted change of {metric_name}" if in_metric_units else "score (rank only; drop = the score)"
    provenance = {
        "score": score,
        "meaning": spec.meaning,
        "units": units,
        "loss": None if loss is None else loss.name,
        "removal": f"the {criterion!r} criterion's removal, as scan(criterion={criterion!r})",
        "samples": samples,
        "batches": 0 if evaluator is None else len(evaluator.batches),
        "seconds": seconds,
        "model_sha256": fingerprint,
        "data_sha256": None if evaluator is None else evaluator.fingerprint,
        "seed": seed,
        "round_to": round_to,
        "prunescope": __version__,
        "torch": torch.__version__,
        **({"fisher": "per-sample empirical Fisher diagonal"} if spec.gradient == "sample" else {}),
        **({"p": p} if score == "magnitude" else {}),
        **({"block_size": block_size, "damp": damp} if score == "obs" else {}),
    }
    return Profile(
        metric=metric_name,
        higher_is_better=higher_is_better,
        dense_value=dense_value,
        criterion=criterion,
        granularity=granularity,
        levels=[BLOCK_LEVEL] if granularity == "block" else [level_key(lv) for lv in parsed_levels],
        targets=list(targets),
        cells=cells,
        kind="estimated",
        provenance=provenance,
        costs=costs,
    )


def describe_scores() -> dict[str, str]:
    """Score name -> what its number means and which granularities it takes."""
    return {name: f"{m.meaning} [{', '.join(m.granularities)}]" for name, m in SCORES.items()}


# ---- validation ----------------------------------------------------------------------------


def check_score(score: str, granularity: str | None = None) -> Score:
    """The registered score ``score``, refusing an unknown one or one that does not apply to ``granularity``."""
    if score not in SCORES:
        raise PrunescopeError(f"unknown estimate score {score!r}; accepted: {', '.join(SCORES)}")
    spec = SCORES[score]
    if granularity is not None and granularity not in spec.granularities:
        fits = [name for name, m in SCORES.items() if granularity in m.granularities]
        raise PrunescopeError(f"score {score!r} does not apply to {granularity} targets; for {granularity} targets use: {', '.join(fits)}")
    return spec


def _gradient_loss(score: str, spec: Score, evaluator: Evaluator | None, seed: int):
    if spec.gradient is None:
        return None
    loss = gradient_loss(evaluator, seed)
    if loss is None:
        free = [name for name, m in SCORES.items() if m.gradient is None]
        raise PrunescopeError(
            f"score {score!r} differentiates a log-likelihood, and metric {evaluator.metric.name!r} has none; "
            f"use an Evaluator with metric loss, perplexity, accuracy or kl, or a score without gradients: {', '.join(free)}"
        )
    if spec.gradient == "first" and not loss.first_order:
        raise PrunescopeError(
            f"score {score!r} is first-order, and metric {evaluator.metric.name!r} has zero gradient at the dense model; "
            "use fisher (its second-order term) or a metric with labels (loss, perplexity, accuracy)"
        )
    return loss


def _criterion(score: str, criterion: str | None) -> str:
    if score != "obs":
        if criterion in ("wanda", "sparsegpt"):
            raise PrunescopeError(f"score {score!r} scores a magnitude or random removal; criterion {criterion!r} is estimated by "
                                  "score 'obs' (sparsegpt) only. Accepted: magnitude, random")
        return criterion or "magnitude"
    if criterion not in (None, "sparsegpt"):
        raise PrunescopeError(f"score 'obs' estimates SparseGPT's own pruning; its criterion is 'sparsegpt' (the default), not {criterion!r}")
    return "sparsegpt"


def _single_granularity(targets: list[Target]) -> str:
    kinds = sorted({t.granularity for t in targets})
    if len(kinds) > 1:
        raise PrunescopeError(f"targets mix granularities ({', '.join(kinds)}); estimate one granularity at a time")
    return kinds[0]


def _check_levels(model, targets, parsed_levels, granularity: str, criterion: str) -> list:
    if granularity == "weight":
        check_criterion(criterion, "weight", calibration=criterion == "sparsegpt")  # obs estimates sparsegpt's removal
        for level in parsed_levels:
            if isinstance(level, NMPattern):
                for t in targets:
                    check_nm_compatible(t.shape, t.input_dim, level, t.name)
        for t in targets:
            weight_of(model, t)
        return parsed_levels
    check_criterion(criterion, granularity)
    if any(isinstance(level, NMPattern) for level in parsed_levels):
        raise PrunescopeError(f"N:M levels apply to weights only; {granularity} targets take fractions of their units")
    return [1.0] if granularity == "block" else parsed_levels


def _unit_removals(model, targets, parsed_levels, granularity, criterion, seed, round_to) -> dict[tuple[str, str], tuple[float, list[int]]]:
    """(target, level key) -> (fraction of units removed, their indices), as scan removes them."""
    if granularity == "block":
        return {(t.name, BLOCK_LEVEL): (1.0, [0]) for t in targets}
    removals = {}
    for t in targets:
        for level in parsed_levels:
            remove = units_removed(model, t, level, criterion, seed, round_to)
            removals[(t.name, level_key(level))] = (len(remove) / t.group.units, remove)
    return removals


# ---- predictions ---------------------------------------------------------------------------


def _predict_units(model, evaluator, loss, targets, removals, score, p, bar) -> dict:
    """(target, level key) -> (fraction of units removed, predicted number) for structured targets."""
    if targets[0].granularity == "block":
        influence = block_influence(model, evaluator.batches, [t.name for t in targets])
        bar.advance(len(targets))
        return {(t.name, BLOCK_LEVEL): (1.0, influence[t.name]) for t in targets}
    unit_values = _unit_values(model, evaluator, loss, targets, score, p)
    bar.advance(len(targets))
    return {key: (fraction, float(unit_values[key[0]][remove].sum()) if remove else 0.0) for key, (fraction, remove) in removals.items()}


def _predict_weights(model, evaluator, loss, targets, parsed_levels, score, criterion, seed, p, block_size, damp, bar) -> dict:
    """(target, level key) -> (fraction removed, predicted number) for weight targets; each level's
    removed set is ``~keep_mask`` of the criterion (computed per target, not all held at once)."""
    names = [f"{t.name}.{t.parameter}" for t in targets]
    grads = fisher = {}
    moments = {}
    if score in ("snip", "taylor", "fisher"):
        stats = accumulate_gradients(model, evaluator, loss, names, mean=score != "fisher", fisher=score == "fisher")
        grads, fisher = stats.mean, stats.fisher
    elif score in ("wanda", "obs"):
        moments = input_moments(model, evaluator.batches, [t.name for t in targets], gram=score == "obs")
    predictions = {}
    for t, name in zip(targets, names, strict=True):
        weight = weight_of(model, t)
        module = model.get_submodule(t.name)
        if score == "obs":
            for level in parsed_levels:
                error = obs_error(module, moments[t.name], level, t.name, block_size, damp)
                predictions[(t.name, level_key(level))] = (level_sparsity(level), error)
            bar.advance(1)
            continue
        if score == "magnitude":
            scores = magnitude_scores(weight, p)
        elif score == "wanda":
            scores = wanda_scores(module, moments[t.name])
        else:
            scores = gradient_scores(score, weight, grads.get(name), fisher.get(name))
        for level in parsed_levels:
            removed = ~keep_mask(weight, level, criterion, t.input_dim, seed=seed, key=t.name)
            predictions[(t.name, level_key(level))] = (level_sparsity(level), float(scores[removed.to(scores.device)].sum()))
        bar.advance(1)
    return predictions


def _unit_values(model, evaluator, loss, targets, score, p) -> dict[str, torch.Tensor]:
    """Per structured target, one number per unit; a level's prediction sums its removed units."""
    groups = [t.group for t in targets]
    if score == "magnitude":
        return {g.name: magnitude_units(model, g, p) for g in groups}
    names = list(dict.fromkeys(n for g in groups for n in in_slice_tensors(g)))
    if score in ("snip", "taylor", "fisher"):
        stats = accumulate_gradients(model, evaluator, loss, names, mean=score != "fisher", fisher=score == "fisher")
        return {g.name: gradient_units(model, g, score, stats.mean, stats.fisher) for g in groups}
    if score == "head_importance":
        on_gradient, result = gate_gradients(model, groups)
        gradient_pass(model, evaluator, loss, names, on_gradient, per_sample=True)
        return result()
    consumers = list(dict.fromkeys(m for g in groups for m, _, _ in consumer_features(model, g)))
    stats = feature_activations(model, evaluator.batches, consumers)
    return {g.name: activation_units(model, g, stats, score) for g in groups}
