"""Plan quality on the digits CNN and all-MiniLM-L6-v2 (issue 13): every allocation method, each plan checked.

Digits CNN (``prunescope.digits``): a magnitude weight profile and a channel profile, both of the
validation split's loss (nats) at levels 0.1,0.3,0.5,0.7,0.8,0.9,0.95 (as tests/conftest.py).
Weight plans at 80 / 90 / 95% sparsity (uniform, global_magnitude, threshold, knapsack, erk, lamp;
owl and the measured-fitness search are tried and their refusals recorded), channel plans at
50 / 70% of the FLOPs (uniform, threshold, knapsack), applied by shrinking. Each plan is checked on
the profile's data (measured val-loss drop with its paired 95% interval against the additive
prediction) and on the held-out test split (accuracy), channel plans also by params and FLOPs after.

all-MiniLM-L6-v2: metric 1 - cosine of the mean-pooled embedding to the dense one; scan on pydoc
windows 0..1 (256 tokens), held-out windows 100..107. Neurons (levels 0.1..0.9) at 20 / 40% of the
FLOPs and heads (every head count 1..11 of 12, so the most FLOPs heads can remove is scanned) at
20 / 30 / 40%: uniform, threshold, knapsack, shrunk; checked on the scan windows (predicted vs
measured cosine drop) and on the held-out windows. After each budget's plans, one row gives the
paired difference threshold minus knapsack on both data sets.

    OMP_NUM_THREADS=1 python bench/plan_quality_small.py [--parts digits-weight digits-channel minilm-neuron minilm-head]

One JSON line per plan (or refusal, with the error message), printed and appended to ``--out``; a (model, unit, budget, method)
already there is skipped. Plans are saved under bench/results/plan_quality/.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_io import emit, log  # noqa: E402

import prunescope as ps  # noqa: E402
from prunescope.cost import CostModel  # noqa: E402
from prunescope.plan_check import check_pruned  # noqa: E402
from prunescope.stats import paired_change  # noqa: E402
from prunescope.structured import parameter_count  # noqa: E402

ROOT = Path(__file__).parent.parent
PLANS = Path(__file__).parent / "results" / "plan_quality"
DIGITS_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
SEARCH_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # contains every sparsity budget asked
MINILM_LEVELS = {"neuron": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "head": tuple(k / 12 for k in range(1, 12))}
WEIGHT_METHODS = ("uniform", "global_magnitude", "threshold", "knapsack", "erk", "lamp", "owl", "search")
UNIT_METHODS = ("uniform", "threshold", "knapsack")
MINILM_FLOPS = {"neuron": (0.2, 0.4), "head": (0.2, 0.3, 0.4)}
"""FLOPs budgets; heads can remove at most 11/12 of the attention projections (about 31% of the
FLOPs), so 40% is recorded as refused and 30% added as the highest round budget heads reach."""
PARTS = ("digits-weight", "digits-channel", "minilm-neuron", "minilm-head")


@dataclass
class Case:
    """One model and unit: its profile, the checks' evaluators and how its plans are applied."""

    model_name: str
    unit: str
    model: torch.nn.Module
    profile: ps.Profile
    check: ps.Evaluator
    held_out: ps.Evaluator
    example: Any
    shrink: bool
    calibration: list
    fields: dict


def done(out: Path, key: dict) -> bool:
    if not out.exists():
        return False
    return any(all(json.loads(line).get(k) == v for k, v in key.items()) for line in out.read_text().splitlines())


def finite(value: float | None) -> float | None:
    """``value``, or None when missing or not finite (a prediction past the scanned levels is inf)."""
    return value if value is not None and math.isfinite(value) else None


def interval(low: float | None, high: float | None) -> list[float] | None:
    return None if low is None else [low, high]


def make_plan(method: str, case: Case, budget: ps.Budget) -> ps.Plan:
    if method == "search":
        return ps.search(case.profile, budget, case.model, fitness=case.calibration, levels=SEARCH_GRID, evaluations=200)
    needs_model = method in ("global_magnitude", "lamp", "owl")
    return ps.allocate(case.profile, budget, method=method, model=case.model if needs_model else None,
                       calibration=case.calibration if method == "owl" else None)


def measure(case: Case, plan: ps.Plan) -> tuple[dict, dict]:
    """The row's check fields, and the pruned model's per-sample evaluations (check and held-out data)."""
    pruned = ps.apply(case.model, plan, shrink=case.shrink, example=case.example if case.shrink else None)
    check = check_pruned(pruned, plan, case.check)
    held = case.held_out.evaluate(pruned)
    held_change = paired_change(case.held_out.dense.values, held.values, held.weights)
    prefix, held_name = ("val_loss", "test_accuracy") if case.model_name == "digits-cnn" else ("scan_cosine", "held_out_cosine")
    row = {f"{prefix}_dense": check.dense, f"{prefix}_pruned": check.pruned, f"{prefix}_measured": check.measured,
           f"{prefix}_ci": interval(check.ci_low, check.ci_high), f"{prefix}_samples": check.samples,
           f"{prefix}_predicted": finite(check.predicted), f"{prefix}_ratio": finite(check.ratio),
           f"{held_name}_dense": case.held_out.dense.value, held_name: held.value,
           f"{held_name}_change_ci": interval(held_change.ci_low, held_change.ci_high), f"{held_name}_samples": held.samples}
    if check.predicted is not None and not math.isfinite(check.predicted):
        row["prediction_note"] = "the plan's predicted_drop is inf: a level lies past the scanned levels"
    if case.shrink:
        row.update(costs(case, pruned, plan))
    return row, {"check": case.check.evaluate(pruned), "held_out": held}


def costs(case: Case, shrunk: torch.nn.Module, plan: ps.Plan) -> dict:
    """Parameters and FLOPs of the shrunk model against the dense one (and the FLOPs the plan predicted)."""
    dense_params, params = parameter_count(case.model), parameter_count(shrunk)
    dense_flops, flops = CostModel.of(case.model, case.example).total_flops, CostModel.of(shrunk, case.example).total_flops
    return {"params_dense": dense_params, "params_after": params, "params_ratio": params / dense_params,
            "flops_dense": dense_flops, "flops_after": flops, "flops_ratio": flops / dense_flops,
            "plan_flops_ratio": plan.details["flops_after"] / plan.details["flops_dense"]}


def compare(case: Case, key: dict, better: dict, worse: dict) -> dict:
    """Paired difference threshold minus knapsack (metric units, per-sample t interval) on the check
    data and on the held-out data: positive means knapsack is lower (better for loss and cosine distance,
    worse for accuracy)."""
    row = dict(key)
    for name, evaluator in (("check", case.check), ("held_out", case.held_out)):
        change = paired_change(better[name].values, worse[name].values, better[name].weights)
        row[f"{name}_threshold_minus_knapsack"] = change.change
        row[f"{name}_ci"] = interval(change.ci_low, change.ci_high)
        row[f"{name}_metric"] = evaluator.metric.name
    return row


def run_case(case: Case, budgets: list[ps.Budget], methods: tuple[str, ...], args) -> None:
    for budget in budgets:
        evaluations = {}
        base = {"model": case.model_name, "unit": case.unit, "budget_kind": budget.kind, "budget": budget.fraction}
        for method in methods:
            key = {**base, "method": method}
            if done(args.out, key):
                log(f"skip {key}")
                continue
            row = {**key, **case.fields, "criterion": case.profile.criterion}
            started = time.perf_counter()
            try:
                plan = make_plan(method, case, budget)
            except ps.PrunescopeError as error:
                emit({**row, "error": str(error), "command": args.command}, str(args.out))
                continue
            path = PLANS / f"{case.model_name.split('-')[0]}-{case.unit}-{budget.fraction}-{method}.json"
            plan.save(path)
            row.update({"plan": str(path.relative_to(ROOT)), "plan_sparsity": round(plan.sparsity, 6),
                        "plan_s": round(time.perf_counter() - started, 2),
                        "levels": {name: round(level, 4) for name, level in plan.levels.items()}})
            if "optimality_gap" in plan.details:
                row["optimality_gap"] = plan.details["optimality_gap"]
            fields, evaluations[method] = measure(case, plan)
            emit({**row, **fields, "command": args.command}, str(args.out))
        if {"knapsack", "threshold"} <= evaluations.keys():
            key = {**base, "method": "threshold-minus-knapsack"}
            emit({**compare(case, key, evaluations["knapsack"], evaluations["threshold"]), "command": args.command}, str(args.out))


def digits_case(unit: str) -> Case:
    from prunescope.digits import batches_of, digits_splits, pretrained_digits_cnn

    model = pretrained_digits_cnn()
    splits = digits_splits()
    val, test = batches_of(splits.val), batches_of(splits.test)
    check = ps.Evaluator(model, val, "loss")
    targets = ps.find_targets(model, "channel", example=val[0]) if unit == "channel" else ps.find_targets(model)
    started = time.perf_counter()
    profile = ps.scan(model, check, targets, levels=DIGITS_LEVELS)
    fields = {"profile_metric": "loss (val split, nats)", "held_out": "test split accuracy",
              "profile_levels": list(DIGITS_LEVELS), "scan_s": round(time.perf_counter() - started, 1)}
    return Case("digits-cnn", unit, model, profile, check, ps.Evaluator(model, test, "accuracy"), val[0][0],
                unit == "channel", val, fields)


def minilm_case(unit: str, eval_windows: int) -> Case:
    from prunescope.data import pydoc_text, token_windows
    from prunescope.models import load_model

    loaded = load_model("minilm")
    model = loaded.model
    text = pydoc_text()
    scan_batches = token_windows(text, loaded.tokenizer, 256, 2)
    held_batches = token_windows(text, loaded.tokenizer, 256, eval_windows, first_window=100)
    check = ps.Evaluator(model, scan_batches, "cosine")
    started = time.perf_counter()
    profile = ps.scan(model, check, ps.find_targets(model, unit), levels=MINILM_LEVELS[unit])
    fields = {"profile_metric": "cosine (pydoc windows 0..1, 256 tokens)", "held_out": f"cosine, windows 100..{99 + eval_windows}",
              "profile_levels": [round(level, 4) for level in MINILM_LEVELS[unit]], "scan_s": round(time.perf_counter() - started, 1)}
    return Case("minilm", unit, model, profile, check, ps.Evaluator(model, held_batches, "cosine"), held_batches[0], True,
                scan_batches, fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "plan_quality_small.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.command = shlex.join(["python", *sys.argv])
    log("command: " + args.command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        model_name, unit = part.split("-")
        if model_name == "digits":
            weight = unit == "weight"
            budgets = [ps.Budget(sparsity=s) for s in (0.8, 0.9, 0.95)] if weight else [ps.Budget(flops=f) for f in (0.5, 0.7)]
            run_case(digits_case(unit), budgets, WEIGHT_METHODS if weight else UNIT_METHODS, args)
        else:
            run_case(minilm_case(unit, args.eval_windows), [ps.Budget(flops=f) for f in MINILM_FLOPS[unit]], UNIT_METHODS, args)


if __name__ == "__main__":
    main()
