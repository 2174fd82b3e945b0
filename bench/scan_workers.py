"""How much faster ``scan(..., workers=2)`` measures a profile than ``workers=1`` (issue 5, execution).

Case resnet18 (the issue's benchmark case): torchvision resnet18, random init (seed 0), random
64 px images (default 64 in 16 batches of 4), metric "kl", every conv and the fc (21 targets,
``exclude=[]``), levels 0.1..0.9, exact incremental scan.

``workers=1`` is the serial scan in this process with all of this process's torch threads
(default: torch's, 2 on these machines); ``workers=2`` splits them between this process and one
worker process (a fresh interpreter: its time includes starting Python, importing torch and
loading the model, while this process measures from the start). With ``--threads 1`` each of the
two gets one thread, so workers=2 uses two cores against workers=1's one. The two alternate in the same process (the first swaps every repeat); the dense
evaluation is cached before timing, so both pay the same.

One JSON line on stdout: median wall seconds of each, ``ratio`` = workers=1 / workers=2 (> 1:
workers are faster), the per-repeat times, and ``max_abs_diff``, the largest |difference| of a
cell's value or change between the two profiles (0 when both use one thread per process; with
2 threads in the serial run, oneDNN's reduction order may differ in the last bits).
``loadavg_1m`` (before, after) shows whether other processes shared the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch

import prunescope as ps
from prunescope.levels import DEFAULT_LEVELS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resnet18_case(images: int, batch: int) -> tuple[torch.nn.Module, ps.Evaluator, list[ps.Target]]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    data = torch.randn(images, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    evaluator = ps.Evaluator(model, [data[i:i + batch] for i in range(0, images, batch)], "kl")
    targets = ps.find_targets(model, exclude=[], example=evaluator.batches[0])
    return model, evaluator, targets


def max_abs_diff(a: ps.Profile, b: ps.Profile) -> float:
    assert [(c.target, c.level) for c in a.cells] == [(c.target, c.level) for c in b.cells], "different cells"
    return max(max(abs(x.value - y.value), abs(x.change - y.change)) for x, y in zip(a.cells, b.cells, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, evaluator, targets = resnet18_case(args.images, args.batch)
    levels = DEFAULT_LEVELS
    evaluator.dense  # noqa: B018 - cached before timing
    load_before = os.getloadavg()[0]
    times: dict[int, list[float]] = {1: [], args.workers: []}
    profiles: dict[int, ps.Profile] = {}
    for repeat in range(args.repeats):
        order = [1, args.workers] if repeat % 2 == 0 else [args.workers, 1]
        for workers in order:
            started = time.perf_counter()
            profiles[workers] = ps.scan(model, evaluator, targets, levels=levels, workers=workers)
            times[workers].append(round(time.perf_counter() - started, 3))
            log(f"repeat {repeat} workers={workers}: {times[workers][-1]:.1f}s")
    serial, parallel = statistics.median(times[1]), statistics.median(times[args.workers])
    print(json.dumps({
        "case": "resnet18", "cells": len(profiles[1].cells), "targets": len(targets),
        "levels": [str(level) for level in levels], "metric": "kl", "images": args.images, "px": 64,
        "batches": len(evaluator.batches), "repeats": args.repeats, "workers": args.workers,
        "workers_1_s": serial, f"workers_{args.workers}_s": parallel, "ratio": round(serial / parallel, 3),
        "workers_1_s_all": times[1], f"workers_{args.workers}_s_all": times[args.workers],
        "max_abs_diff": max_abs_diff(profiles[1], profiles[args.workers]),
        "torch_threads": torch.get_num_threads(),
        "threads_per_worker": profiles[args.workers].provenance["execution"]["threads_per_worker"],
        "cpus": os.cpu_count(), "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__, "command": shlex.join([".venv/bin/python", *sys.argv]),
    }), flush=True)


if __name__ == "__main__":
    main()
