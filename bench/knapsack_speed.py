"""How long ``allocate(..., method="knapsack")`` takes on an LLM-sized profile, against ``threshold``
in the same process, and how tight its stated optimality gap is.

Case: a synthetic weight profile of 210 targets (30 blocks x 7 projections, the shape of a 30-layer
LLM), sizes drawn from 1,000 to 100,000 parameters, levels 0.1..0.9, each target's loss drop
``scale x (exp(4 x level) - 1) / 50`` plus noise (sd 0.002), ``scale`` exponential (mean 1), seed 0.
The knapsack's default grid (0.01) gives about 92 levels per target; its dynamic programme has
4096 cost steps. Sparsity budgets 0.5 and 0.8; the two methods alternate, ``--repeats`` times each.

One JSON line per budget: median seconds of each, ``ratio`` = knapsack / threshold, both predicted
drops, the knapsack's lower bound and gap (metric units, loss) and which plan it returned.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import prunescope as ps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import emit, log  # noqa: E402

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def synthetic_profile(seed: int = 0) -> ps.Profile:
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i // 7}.proj{i % 7}" for i in range(210)]
    targets = [ps.Target(name, "Linear", (64, 64), int(rng.integers(1000, 100000))) for name in names]
    cells = []
    for target in targets:
        scale = rng.exponential(1.0)
        for level in LEVELS:
            drop = float(scale * (np.exp(4 * level) - 1) / 50 + rng.normal(0, 0.002))
            cells.append(ps.Cell(target.name, repr(level), level, 1 + drop, drop, None, None, 64, 0.1))
    return ps.Profile("loss", False, 1.0, "magnitude", "weight", [repr(lv) for lv in LEVELS], targets, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    profile = synthetic_profile()
    for budget in (0.5, 0.8):
        seconds: dict[str, list[float]] = {"threshold": [], "knapsack": []}
        plans = {}
        for repeat in range(args.repeats):
            for method in ("threshold", "knapsack") if repeat % 2 == 0 else ("knapsack", "threshold"):
                start = time.perf_counter()
                plans[method] = ps.allocate(profile, budget, method=method)
                seconds[method].append(time.perf_counter() - start)
            log(f"budget {budget}: repeat {repeat + 1}/{args.repeats}")
        knapsack, threshold = plans["knapsack"], plans["threshold"]
        median = {m: statistics.median(s) for m, s in seconds.items()}
        emit({
            "case": "synthetic-210", "budget": budget, "targets": len(profile.targets),
            "threshold_s": round(median["threshold"], 4), "knapsack_s": round(median["knapsack"], 4),
            "ratio": round(median["knapsack"] / median["threshold"], 2),
            "threshold_drop": threshold.predicted_drop, "knapsack_drop": knapsack.predicted_drop,
            "lower_bound": knapsack.details["lower_bound"], "optimality_gap": knapsack.details["optimality_gap"],
            "solution": knapsack.details["solution"], "cost_unit": knapsack.details["cost_unit"],
            "knapsack_sparsity": knapsack.sparsity,
        }, args.out)


if __name__ == "__main__":
    main()
