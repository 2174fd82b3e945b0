"""The main job on the built-in default: digits CNN -> scan -> plan -> apply -> evaluate -> report."""

from __future__ import annotations

from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from .allocate import allocate
from .apply import apply
from .atomic import write_text_atomic
from .checks import whole_number
from .cost import CostModel
from .digits import batches_of, digits_splits, pretrained_digits_cnn
from .evaluator import Evaluator
from .jsonfile import strict_json
from .latency import compare_latency
from .levels import DEFAULT_LEVELS, parse_levels
from .outputs import check_output_folder
from .plan import Budget
from .report import plan_table, profile_table, write_report
from .scan import scan
from .structure import save_shrunk_channels
from .targets import find_targets


def run_demo(
    out: str | Path,
    *,
    epochs: int = 30,
    sparsity: float = 0.8,
    levels: tuple = DEFAULT_LEVELS,
    flops: float = 0.5,
    channel_levels: tuple = (0.25, 0.5, 0.75),
    console: Console | None = None,
    progress: bool = True,
) -> dict:
    """Train (or reuse the cached) digits CNN, scan it on the validation split, plan ``sparsity`` by
    the threshold method, apply it, and compare against the uniform and global-magnitude plans on the
    validation and test splits. Then the structured run: scan the coupled channel groups, plan
    ``flops`` of the FLOPs away by threshold (and uniformly), shrink, and measure accuracy and
    latency against dense. Writes profile.json, profile.csv, plan.json, sensitivity.png,
    heatmap.png, channel_profile.json, channel_plan.json, shrunk/ and summary.json into ``out``;
    returns the summary."""
    console = console or Console()
    whole_number(epochs, "epochs")  # 0 would cache and report an untrained model
    out = check_output_folder(out, "demo output folder")
    budget, structured_budget = Budget(sparsity), Budget(flops=flops)
    levels, channel_levels = tuple(parse_levels(levels)), tuple(parse_levels(channel_levels))
    model = pretrained_digits_cnn(epochs=epochs, progress=progress)
    splits = digits_splits()
    val = Evaluator(model, batches_of(splits.val), "accuracy")
    test = Evaluator(model, batches_of(splits.test), "accuracy")
    targets = find_targets(model, example=val.batches[0])
    console.print(f"targets: {', '.join(t.name for t in targets)} (final classifier excluded by default)")
    profile = scan(model, val, targets, levels=levels, progress=progress)
    plans = {method: allocate(profile, budget, method=method, model=model) for method in ("threshold", "uniform", "global_magnitude")}
    rows = {"dense": (model, 0.0, None)}
    for method, plan in plans.items():
        rows[method] = (apply(model, plan), plan.sparsity, plan.predicted_drop)
    results = {}
    for name, (pruned, achieved, predicted) in rows.items():
        results[name] = {
            "sparsity": achieved,
            "val_accuracy": val.evaluate(pruned).value,
            "test_accuracy": test.evaluate(pruned).value,
            "predicted_val_drop": predicted,
        }
    profile.save(out / "profile.json")
    profile.save(out / "profile.csv")
    plans["threshold"].save(out / "plan.json")
    write_report(profile, out, plans["threshold"])
    structured = _structured_run(model, val, test, structured_budget, channel_levels, out, progress)
    summary = {"budget_sparsity": sparsity, "epochs": epochs, "levels": profile.levels, "results": results,
               "structured": structured}
    write_text_atomic(out / "summary.json", strict_json(summary, indent=1))

    console.print(profile_table(profile))
    console.print(plan_table(plans["threshold"]))
    table = Table(title=f"digits CNN at {sparsity:.0%} sparsity of prunable weights", box=box.SIMPLE_HEAD)
    for column in ("model", "sparsity", "val accuracy", "test accuracy", "predicted val drop"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, r in results.items():
        predicted = "" if r["predicted_val_drop"] is None else f"{r['predicted_val_drop']:.2%}"
        table.add_row(name, f"{r['sparsity']:.1%}", f"{r['val_accuracy']:.2%}", f"{r['test_accuracy']:.2%}", predicted)
    console.print(table)
    console.print(_structured_table(structured))
    console.print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return summary


def _structured_run(model, val: Evaluator, test: Evaluator, budget: Budget, levels: tuple, out: Path, progress: bool) -> dict:
    """Channel groups -> threshold plan at a FLOPs budget -> a physically smaller CNN, measured."""
    example = val.batches[0][0]
    targets = find_targets(model, "channel", example=val.batches[0])
    profile = scan(model, val, targets, levels=levels, progress=progress)
    profile.save(out / "channel_profile.json")
    plans = {method: allocate(profile, budget, method=method) for method in ("threshold", "uniform")}
    plans["threshold"].save(out / "channel_plan.json")
    models = {"dense": model, **{m: apply(model, plan, shrink=True, example=example) for m, plan in plans.items()}}
    save_shrunk_channels(models["threshold"], out / "shrunk", "prunescope:digits_cnn")
    inputs = torch.cat([x for x, _ in test.batches])
    seconds = compare_latency(models, inputs, repeats=30, threads=1)  # a tiny CNN: one thread, no OpenMP stalls
    cost = {name: CostModel.of(m, example) for name, m in models.items()}
    return {
        name: {
            "params": cost[name].params,
            "flops_per_image": cost[name].total_flops,
            "val_accuracy": val.evaluate(m).value,
            "test_accuracy": test.evaluate(m).value,
            "latency_ms": 1000 * seconds[name],
            "speedup": seconds["dense"] / seconds[name],
            "latency_batch": int(inputs.shape[0]),
        }
        for name, m in models.items()
    }


def _structured_table(results: dict) -> Table:
    table = Table(title="digits CNN, channel groups shrunk to a FLOPs budget (latency: whole test split, 1 thread, median of 30)",
                  box=box.SIMPLE_HEAD)
    for column in ("model", "params", "FLOPs", "val acc", "test acc", "ms", "speedup"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['params']:,}", f"{r['flops_per_image'] / 1e6:.2f}M", f"{r['val_accuracy']:.2%}",
                      f"{r['test_accuracy']:.2%}", f"{r['latency_ms']:.2f}", f"{r['speedup']:.2f}x")
    return table
