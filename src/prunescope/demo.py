"""The main job on the built-in default: digits CNN -> scan -> plan -> apply -> evaluate -> report."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .allocate import allocate
from .apply import apply
from .atomic import write_text_atomic
from .digits import batches_of, digits_splits, pretrained_digits_cnn
from .evaluator import Evaluator
from .levels import DEFAULT_LEVELS
from .plan import Budget
from .report import plan_table, profile_table, write_report
from .scan import scan
from .targets import find_targets


def run_demo(
    out: str | Path,
    *,
    epochs: int = 30,
    sparsity: float = 0.8,
    levels: tuple = DEFAULT_LEVELS,
    console: Console | None = None,
    progress: bool = True,
) -> dict:
    """Train (or reuse the cached) digits CNN, scan it on the validation split, plan ``sparsity`` by
    the threshold method, apply it, and compare against the uniform and global-magnitude plans on the
    validation and test splits. Writes profile.json, profile.csv, plan.json, sensitivity.png,
    heatmap.png and summary.json into ``out``; returns the summary."""
    console = console or Console()
    out = Path(out)
    budget = Budget(sparsity)
    model = pretrained_digits_cnn(epochs=epochs, progress=progress)
    splits = digits_splits()
    val = Evaluator(model, batches_of(splits.val), "accuracy")
    test = Evaluator(model, batches_of(splits.test), "accuracy")
    targets = find_targets(model, example=val.batches[0])
    console.print(f"targets: {', '.join(t.name for t in targets)} (final classifier excluded by default)")
    profile = scan(model, val, targets, levels=levels, progress=progress)
    plans = {method: allocate(profile, budget, method, model=model) for method in ("threshold", "uniform", "global_magnitude")}
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
    summary = {"budget_sparsity": sparsity, "epochs": epochs, "levels": profile.levels, "results": results}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))

    console.print(profile_table(profile))
    console.print(plan_table(plans["threshold"]))
    table = Table(title=f"digits CNN at {sparsity:.0%} sparsity of prunable weights")
    for column in ("model", "sparsity", "val accuracy", "test accuracy", "predicted val drop"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, r in results.items():
        predicted = "" if r["predicted_val_drop"] is None else f"{r['predicted_val_drop']:.2%}"
        table.add_row(name, f"{r['sparsity']:.1%}", f"{r['val_accuracy']:.2%}", f"{r['test_accuracy']:.2%}", predicted)
    console.print(table)
    console.print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return summary
