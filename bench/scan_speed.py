"""Baseline speed of ``prunescope.scan`` against the naive per-cell deepcopy loop (issue 2).

The naive loop is what the older tools do: for every (target, level) cell, ``copy.deepcopy`` the
whole model, prune that one target in the copy with the same keep-mask scan uses
(``prunescope.masks.keep_mask``, same criterion, seed and key), and evaluate the copy with the same
``Evaluator``. Both run in the same process, alternating (the one that goes first swaps every
repeat), after the shared dense evaluation is cached and one untimed warm-up cell of each, so
neither pays for first-call costs.

Cases:
  resnet18  torchvision resnet18, random init (seeded), random 64 px images in 2 batches, metric
            "kl", every conv target (the final fc is excluded by default). Levels (0.3, 0.5, 0.7)
            rather than 0.1..0.9 keep one repeat (naive + scan) well under a minute on 2 cores.
  digits    the pretrained digits CNN, validation split, metric "accuracy", levels 0.1..0.9.

One JSON line per case on stdout: median wall times, the median of per-repeat naive/scan
ratios (> 1 means scan is faster), the same for process CPU time, and the largest
|naive - scan| cell value, which must be ~0 (asserted). ``loadavg_1m`` (before, after) shows
whether other processes shared the cores: with 2 torch threads on a busy 2-core machine both
wall and CPU time swing by several x (OpenMP threads spin while waiting for each other), so use
``--threads 1`` there. Progress goes to stderr. ``--quick`` runs a much smaller setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time

import torch

import prunescope
from prunescope.digits import batches_of, digits_splits, pretrained_digits_cnn
from prunescope.fingerprint import model_fingerprint
from prunescope.levels import level_key, parse_levels
from prunescope.masks import keep_mask
from prunescope.targets import weight_of

FULL_DIGITS_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FULL_RESNET_LEVELS = (0.3, 0.5, 0.7)
TOLERANCE = 1e-9  # cell values come from the same masks and forwards; only float summation order may differ


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resnet18_case(quick: bool, seed: int) -> dict:
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(weights=None).eval()
    images, size, levels = (8, 32, (0.5,)) if quick else (16, 64, FULL_RESNET_LEVELS)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, size, size, generator=generator)
    half = images // 2
    batches = [x[:half], x[half:]]
    setting = {"images": images, "px": size, "batches": len(batches)}
    return {"case": "resnet18", "model": model, "batches": batches, "metric": "kl", "levels": levels, "setting": setting}


def digits_case(quick: bool, seed: int) -> dict:
    del seed  # the pretrained digits CNN and its split are fixed by prunescope.digits
    model = pretrained_digits_cnn().eval()
    batches = batches_of(digits_splits().val)
    levels = (0.3, 0.6, 0.9) if quick else FULL_DIGITS_LEVELS
    setting = {"images": sum(len(y) for _, y in batches), "px": 8, "batches": len(batches)}
    return {"case": "digits", "model": model, "batches": batches, "metric": "accuracy", "levels": levels, "setting": setting}


def naive_scan(model, evaluator, targets, levels, criterion: str, seed: int) -> dict[tuple[str, str], float]:
    """The old-tool loop: deepcopy the whole model per cell, prune one target in the copy, evaluate."""
    values = {}
    for target in targets:
        for level in parse_levels(levels):
            pruned = copy.deepcopy(model)
            weight = weight_of(pruned, target)
            mask = keep_mask(weight, level, criterion, target.input_dim, seed=seed, key=target.name)
            with torch.no_grad():
                weight.mul_(mask)
            values[(target.name, level_key(level))] = evaluator.evaluate(pruned).value
            del pruned
    return values


def run_case(spec: dict, repeats: int, criterion: str, seed: int, command: str) -> dict:
    model, levels = spec["model"], spec["levels"]
    evaluator = prunescope.Evaluator(model, spec["batches"], metric=spec["metric"])
    targets = prunescope.find_targets(model, example=evaluator.batches[0])
    cells = len(targets) * len(levels)
    _ = evaluator.dense  # reference outputs and dense values, cached once for both methods
    fingerprint = model_fingerprint(model)
    log(f"{spec['case']}: warm-up (one untimed cell of each method)")
    naive_scan(model, evaluator, targets[:1], levels[:1], criterion, seed)
    prunescope.scan(model, evaluator, targets[:1], levels[:1], criterion, seed=seed)

    load_before = os.getloadavg()[0]
    naive_times, scan_times, ratios, max_diff = [], [], [], 0.0
    cpu: dict[str, list[float]] = {"naive": [], "scan": []}
    for repeat in range(repeats):
        order = ("naive", "scan") if repeat % 2 == 0 else ("scan", "naive")
        times: dict[str, float] = {}
        for method in order:
            log(f"{spec['case']}: repeat {repeat + 1}/{repeats} {method} ({cells} cells)")
            started, cpu_started = time.perf_counter(), time.process_time()
            if method == "naive":
                naive_values = naive_scan(model, evaluator, targets, levels, criterion, seed)
            else:
                profile = prunescope.scan(model, evaluator, targets, levels, criterion, seed=seed)
            times[method] = time.perf_counter() - started
            cpu[method].append(time.process_time() - cpu_started)
            log(f"  {method}: {times[method]:.2f} s wall, {cpu[method][-1]:.2f} s cpu")
        scan_values = {(c.target, c.level): c.value for c in profile.cells}
        assert scan_values.keys() == naive_values.keys(), "naive and scan measured different cells"
        diff = max(abs(scan_values[k] - naive_values[k]) for k in scan_values)
        assert diff <= TOLERANCE, f"{spec['case']}: naive and scan disagree by {diff}"
        assert model_fingerprint(model) == fingerprint, f"{spec['case']}: the model changed during the benchmark"
        max_diff = max(max_diff, diff)
        naive_times.append(times["naive"])
        scan_times.append(times["scan"])
        ratios.append(times["naive"] / times["scan"])

    return {
        "case": spec["case"],
        "cells": cells,
        "targets": len(targets),
        "levels": [level_key(level) for level in parse_levels(levels)],
        "metric": spec["metric"],
        "criterion": criterion,
        **spec["setting"],
        "repeats": repeats,
        "naive_s": round(statistics.median(naive_times), 3),
        "scan_s": round(statistics.median(scan_times), 3),
        "ratio": round(statistics.median(ratios), 3),
        "naive_s_all": [round(t, 3) for t in naive_times],
        "scan_s_all": [round(t, 3) for t in scan_times],
        "naive_cpu_s": round(statistics.median(cpu["naive"]), 3),
        "scan_cpu_s": round(statistics.median(cpu["scan"]), 3),
        "cpu_ratio": round(statistics.median([n / s for n, s in zip(cpu["naive"], cpu["scan"], strict=True)]), 3),
        "max_abs_diff": max_diff,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "command": command,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3, or 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller setting: fewer images and levels")
    parser.add_argument("--cases", nargs="+", choices=("resnet18", "digits"), default=["resnet18", "digits"])
    parser.add_argument("--criterion", choices=("magnitude", "random"), default="magnitude")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))

    builders = {"resnet18": resnet18_case, "digits": digits_case}
    for case in args.cases:
        spec = builders[case](args.quick, args.seed)
        print(json.dumps(run_case(spec, repeats, args.criterion, args.seed, command)), flush=True)


if __name__ == "__main__":
    main()
