"""How fast ``prunescope.scan`` measures a profile (issue 5): naive loop vs exact-incremental vs adaptive.

Methods, run in the same process and alternated (the order rotates every repeat), after the
shared dense evaluation is cached:
  naive        the old tools' loop: per cell, ``copy.deepcopy`` the model, prune one target in the
               copy with the same keep-mask (``prunescope.masks.keep_mask``), evaluate every batch.
  exact        ``scan(...)`` as shipped: incremental re-evaluation (recorded dense outputs of the
               modules before the target are replayed), every batch. Its time includes recording.
  adaptive     ``scan(..., mode="adaptive", tolerance=T)``: also stops a cell once the half-width
               of its change's confidence interval is at most T (metric units).

Cases:
  resnet18  torchvision resnet18, random init (seed 0), random 64 px images (default 64 images in
            16 batches of 4), metric "kl", every conv and the fc (21 targets), levels 0.1..0.9.
  smollm2   SmolLM2-135M, every Linear of the 30 blocks (210 targets), levels 0.3/0.5/0.7,
            pydoc windows of 512 tokens (default 8), metric perplexity. ``--blocks-every K``
            takes all 7 Linears of blocks 0, K, 2K, ... (naive on all 630 cells is hours on this
            machine; whole blocks keep the scan's share of skip sets to verify per cell).

``--naive-every K`` runs the naive loop on every K-th cell only and scales its time to all cells
(a naive cell always costs one deepcopy and one full evaluation, whichever its target); its
max |difference| is then over those cells. Several ``--tolerance-*`` values and ``--min-batches``
values give one adaptive row per pair. An adaptive cell evaluates at least M = ``min_batches``
batches, so with B batches adaptive can be at most exact's ratio x B / M faster than naive:
printed as ``ceiling_ratio_to_naive``.

Printed per case and method (one JSON line each): median wall time over repeats, ratio to naive,
for exact the theoretical limit of incremental evaluation (full-forward time x cells / sum over
cells of the time still spent, from per-unit times measured with hooks on the dense model) and
the share of it reached, max relative |difference| to naive over all cells; for adaptive the
Spearman correlation of its changes with exact's, the share of cells whose exact change lies
inside the adaptive interval, and the share of samples used.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import shlex
import statistics
import sys
import time

import numpy as np
import torch
from bench_io import emit, log
from scipy import stats

import prunescope as ps
from prunescope.batches import run_model
from prunescope.cell_measure import Replay
from prunescope.levels import level_key, parse_levels
from prunescope.masks import keep_mask
from prunescope.target import weight_of


def resnet18_case(args: argparse.Namespace) -> dict:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    images = torch.randn(args.images, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batches = [images[i:i + args.batch] for i in range(0, args.images, args.batch)]
    evaluator = ps.Evaluator(model, batches, "kl")
    targets = ps.find_targets(model, exclude=[], example=batches[0])
    levels = tuple(round(0.1 * i, 1) for i in range(1, 10))
    return {"case": "resnet18", "model": model, "evaluator": evaluator, "targets": targets, "levels": levels,
            "tolerance": args.tolerance_kl, "setting": {"images": args.images, "batch": args.batch, "px": 64}}


def smollm2_case(args: argparse.Namespace) -> dict:
    from prunescope.data import pydoc_text, token_windows
    from prunescope.models import load_model

    loaded = load_model("smollm2")
    batches = token_windows(pydoc_text(), loaded.tokenizer, 512, args.windows)
    evaluator = ps.Evaluator(loaded.model, batches, "perplexity")
    blocks = range(0, loaded.model.config.num_hidden_layers, args.blocks_every)
    targets = ps.find_targets(loaded.model, include=[f"model.layers.{b}.*" for b in blocks])
    return {"case": "smollm2", "model": loaded.model, "evaluator": evaluator, "targets": targets, "levels": (0.3, 0.5, 0.7),
            "tolerance": args.tolerance_ppl, "setting": {"windows": args.windows, "seq_len": 512, "blocks_every": args.blocks_every}}


def naive(model, evaluator, targets, levels, every: int = 1) -> dict[tuple[str, str], float]:
    """Per cell (every ``every``-th in scan order): deepcopy the whole model, prune one target in the
    copy, evaluate every batch."""
    changes = {}
    cells = [(target, level) for target in targets for level in parse_levels(levels)]
    for target, level in cells[::every]:
        pruned = copy.deepcopy(model)
        weight = weight_of(pruned, target)
        with torch.no_grad():
            weight.mul_(keep_mask(weight, level, "magnitude", target.input_dim, seed=0, key=target.name))
        changes[(target.name, level_key(level))] = evaluator.evaluate(pruned).value - evaluator.dense.value
        del pruned
    return changes


def unit_seconds(model, evaluator, units: dict, repeats: int = 2) -> tuple[float, dict[str, float]]:
    """(full forward time over all batches, time inside each unit), medians of ``repeats`` passes."""
    totals, per_unit = [], {name: [] for name in units}
    for _ in range(repeats):
        spent = dict.fromkeys(units, 0.0)
        opened: dict[str, float] = {}
        handles = []
        for name, module in units.items():
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, n=name, opened=opened: opened.__setitem__(n, time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o, n=name, spent=spent, opened=opened: spent.__setitem__(
                    n, spent[n] + time.perf_counter() - opened[n])))
        started = time.perf_counter()
        with torch.no_grad():
            for batch in evaluator.batches:
                run_model(model, batch)
        totals.append(time.perf_counter() - started)
        for handle in handles:
            handle.remove()
        for name in units:
            per_unit[name].append(spent[name])
    return statistics.median(totals), {name: statistics.median(v) for name, v in per_unit.items()}


def theoretical_limit(spec: dict) -> float:
    """Full-forward cost x cells / sum over cells of the forward time a replaying cell still spends."""
    model, evaluator, targets = spec["model"], spec["evaluator"], spec["targets"]
    replay = Replay(model, evaluator, targets, "weight", 2 * 1024**3)
    full, seconds = unit_seconds(model, evaluator, replay.cache.units)
    replay.close()
    remaining = [full - sum(seconds[u] for u in replay.skips[t.name]) for t in targets]
    return full * len(targets) / sum(remaining)


def run(spec: dict, args: argparse.Namespace, command: str) -> list[dict]:
    model, evaluator, targets, levels = spec["model"], spec["evaluator"], spec["targets"], spec["levels"]
    _ = evaluator.dense
    cells = len(targets) * len(levels)
    limit = theoretical_limit(spec)
    log(f"{spec['case']}: {cells} cells; theoretical limit of incremental evaluation {limit:.2f}x")
    methods = {
        "naive": lambda: naive(model, evaluator, targets, levels, args.naive_every),
        "exact": lambda: ps.scan(model, evaluator, targets, levels=levels),
    }
    adaptive_runs = [(t, m) for m in args.min_batches for t in spec["tolerance"]]
    for tolerance, least in adaptive_runs:
        methods[f"adaptive {tolerance} {least}"] = lambda t=tolerance, m=least: ps.scan(
            model, evaluator, targets, levels=levels, mode="adaptive", tolerance=t, min_batches=m)
    times: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, object] = {}
    order = list(methods)
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        shift = repeat % len(order)
        for method in order[shift:] + order[:shift]:
            started = time.perf_counter()
            results[method] = methods[method]()
            times[method].append(time.perf_counter() - started)
            log(f"{spec['case']} repeat {repeat + 1}: {method} {times[method][-1]:.1f} s")
    naive_changes = results["naive"]
    exact = results["exact"]
    exact_changes = {(c.target, c.level): c.change for c in exact.cells}
    scale = max(abs(v) for v in naive_changes.values()) or 1.0
    max_rel = max(abs(exact_changes[k] - v) / max(abs(v), 1e-12 * scale) for k, v in naive_changes.items())
    keys = list(exact_changes)
    naive_s = statistics.median(times["naive"]) * cells / len(naive_changes)
    common = {"case": spec["case"], "cells": cells, "targets": len(targets), "levels": [level_key(v) for v in levels],
              **spec["setting"], "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "command": command}
    rows = [{**common, "method": "naive", "seconds": round(naive_s, 2), "all_seconds": [round(t, 2) for t in times["naive"]],
             "cells_run": len(naive_changes)}]
    exact_s = statistics.median(times["exact"])
    rows.append({**common, "method": "exact", "seconds": round(exact_s, 2), "all_seconds": [round(t, 2) for t in times["exact"]],
                 "ratio_to_naive": round(naive_s / exact_s, 3), "theoretical_limit": round(limit, 3),
                 "share_of_limit": round(naive_s / exact_s / limit, 3), "max_rel_diff_to_naive": max_rel,
                 "incremental": exact.provenance.get("incremental")})
    batches = len(evaluator.batches)
    for tolerance, least in adaptive_runs:
        method = f"adaptive {tolerance} {least}"
        adaptive = {(c.target, c.level): c for c in results[method].cells}
        rho = stats.spearmanr([exact_changes[k] for k in keys], [adaptive[k].change for k in keys]).statistic
        covered = np.mean([adaptive[k].ci_low <= exact_changes[k] <= adaptive[k].ci_high for k in keys])
        samples_share = sum(c.samples for c in adaptive.values()) / sum(c.samples for c in exact.cells)
        adaptive_s = statistics.median(times[method])
        rows.append({**common, "method": "adaptive", "seconds": round(adaptive_s, 2),
                     "all_seconds": [round(t, 2) for t in times[method]], "ratio_to_naive": round(naive_s / adaptive_s, 3),
                     "ceiling_ratio_to_naive": round(naive_s / exact_s * batches / min(least, batches), 3),
                     "tolerance": tolerance, "min_batches": least, "spearman_vs_exact": round(float(rho), 4),
                     "coverage": round(float(covered), 4), "samples_share": round(samples_share, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["resnet18", "smollm2"], choices=["resnet18", "smollm2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--blocks-every", type=int, default=1, help="smollm2: all 7 Linears of every K-th block")
    parser.add_argument("--tolerance-kl", type=float, nargs="+", default=[0.002], help="adaptive tolerances for resnet18 (nats of KL)")
    parser.add_argument("--tolerance-ppl", type=float, nargs="+", default=[0.5], help="adaptive tolerances for smollm2 (perplexity)")
    parser.add_argument("--min-batches", type=int, nargs="+", default=[2], help="adaptive: batches a cell sees before it may stop (one row per value and tolerance)")
    parser.add_argument("--naive-every", type=int, default=1, help="run the naive loop on every K-th cell, scale its time")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    cases = {"resnet18": resnet18_case, "smollm2": smollm2_case}
    for name in args.cases:
        for row in run(cases[name](args), args, command):
            emit(row, args.out)


if __name__ == "__main__":
    main()
