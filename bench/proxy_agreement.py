"""Proxy agreement (issue 4): how far each cheap estimate ranks cells as the exact scan measures them.

For each case, the exact ``prunescope.scan`` (magnitude criterion) and every applicable
``prunescope.estimate`` run on the same targets, levels and data; one JSON line per (case, method)
gives the Spearman rank correlation of predicted vs measured drop over all cells (``spearman``),
the mean of the per-level correlations across targets (``mean_per_level``: which layers to prune
harder, what an allocation needs) and the cost ratio ``scan_s / estimate_s``.

Cases (``--cases``):
    digits-loss, digits-accuracy: the trained digits CNN, all 5 Conv/Linear layers (the classifier
        included), levels 0.1..0.9, validation split (360 images), metric loss or accuracy.
    digits-channel: its 4 coupled channel groups, levels 0.25/0.5/0.75, metric loss.
    smollm2: SmolLM2-135M, 60 Linear layers (``smollm2_layers``: two projections in every one of the
        30 blocks, rotating through q/k/v/o/gate/up/down), levels 0.5 and 0.7, metric perplexity.
    smollm2-sparsegpt: the same cells scanned with ``criterion="sparsegpt"`` (calibrated on the scan's
        windows), against ``obs``, which estimates exactly that pruning.
    smollm2-head, smollm2-neuron, smollm2-block: its 30 attention modules (KV groups, levels 0.34
        and 0.67 = 1 and 2 of 3), 30 FFNs (levels 0.5, 0.7) and 30 blocks (removed whole).
SmolLM2 data: ``--windows`` pydoc windows of ``--seq-len`` tokens from window 0, the same for the
scan and the estimates' calibration. ``scan_s`` is the dense evaluation plus the sum of the cells'
own seconds (so a resumed ``--store`` run reports the same cost); ``estimate_s`` is the wall time of
``estimate`` with a fresh Evaluator (its dense pass, FLOPs pass, fingerprint and method passes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import prunescope as ps
from prunescope.atomic import write_text_atomic

WEIGHT_METHODS = ("magnitude", "snip", "taylor", "fisher", "wanda", "obs")
METHODS = {
    "weight": WEIGHT_METHODS,
    "channel": ("magnitude", "snip", "taylor", "fisher", "activation", "apoz"),
    "neuron": ("magnitude", "snip", "taylor", "fisher", "activation", "apoz"),
    "head": ("magnitude", "snip", "taylor", "fisher", "head_importance"),
    "block": ("block_influence",),
}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CASES = ("digits-loss", "digits-accuracy", "digits-channel", "smollm2", "smollm2-sparsegpt", "smollm2-head", "smollm2-neuron", "smollm2-block")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def smollm2_layers(blocks: int = 30) -> list[str]:
    """Two projections per block, rotating so that every kind appears at every depth range."""
    return [f"model.layers.{i}.{PROJECTIONS[(i + k) % len(PROJECTIONS)]}" for i in range(blocks) for k in (0, 3)]


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    batches: list
    metric: str
    targets: list
    levels: tuple
    granularity: str
    criterion: str = "magnitude"
    methods: tuple[str, ...] = ()


def digits_case(name: str) -> Case:
    from prunescope.digits import batches_of, digits_splits, pretrained_digits_cnn

    model = pretrained_digits_cnn()
    batches = batches_of(digits_splits().val)
    if name == "digits-channel":
        return Case(name, model, batches, "loss", ps.find_targets(model, "channel", example=batches[0]), (0.25, 0.5, 0.75), "channel")
    metric = name.split("-")[1]
    levels = tuple(round(0.1 * i, 1) for i in range(1, 10))
    return Case(name, model, batches, metric, ps.find_targets(model, exclude=[], example=batches[0]), levels, "weight")


def smollm2_case(name: str, loaded, args: argparse.Namespace) -> Case:
    from prunescope.data import pydoc_text, token_windows

    model = loaded.model
    batches = token_windows(pydoc_text(), loaded.tokenizer, args.seq_len, args.windows)
    if name == "smollm2-sparsegpt":
        targets = ps.find_targets(model, include=smollm2_layers(), example=batches[0])
        return Case(name, model, batches, "perplexity", targets, (0.5, 0.7), "weight", "sparsegpt", ("obs",))
    granularity = name.split("-")[1] if "-" in name else "weight"
    if granularity == "weight":
        targets = ps.find_targets(model, include=smollm2_layers(), example=batches[0])
        levels = (0.5, 0.7)
    else:
        targets = ps.find_targets(model, granularity)
        levels = {"head": (0.34, 0.67), "neuron": (0.5, 0.7), "block": (0.5,)}[granularity]
    return Case(name, model, batches, "perplexity", targets, levels, granularity)


def finite(value: float) -> float | None:
    """Rounded, or None where a correlation is undefined (a constant prediction): JSON has no NaN."""
    return None if math.isnan(value) else round(value, 3)


def run_case(case: Case, args: argparse.Namespace, command: str) -> list[dict]:
    evaluator = ps.Evaluator(case.model, case.batches, case.metric)
    started = time.perf_counter()
    dense = evaluator.dense.value
    dense_s = time.perf_counter() - started
    store = Path(args.store_dir) / f"{case.name}.jsonl" if args.store_dir else None
    measured = ps.scan(case.model, evaluator, case.targets, levels=case.levels, criterion=case.criterion, store=store, progress=args.progress)
    scan_s = dense_s + sum(c.seconds for c in measured.cells)
    log(f"{case.name}: {case.criterion} scan of {len(measured.cells)} cells, {scan_s:.1f}s (dense {case.metric} {dense:.5g})")
    rows = []
    for method in case.methods or METHODS[case.granularity]:
        started = time.perf_counter()
        profile = ps.estimate(case.model, ps.Evaluator(case.model, case.batches, case.metric), case.targets, score=method, levels=case.levels)
        estimate_s = time.perf_counter() - started
        result = ps.agreement(profile, measured)
        row = {
            "case": case.name, "granularity": case.granularity, "criterion": case.criterion, "method": method, "metric": case.metric,
            "spearman": finite(result.spearman), "mean_per_level": finite(result.mean_per_level),
            "per_level": {k: finite(v) for k, v in result.per_level.items()}, "cells": result.cells,
            "targets": len(case.targets), "levels": list(measured.levels), "samples": profile.provenance["samples"],
            "scan_s": round(scan_s, 2), "estimate_s": round(estimate_s, 3), "cost_ratio": round(scan_s / estimate_s, 1),
            "units": profile.provenance["units"], "loss": profile.provenance["loss"],
            "scan_incremental": "incremental" in measured.provenance,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "command": command,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | method | Spearman, all cells | Spearman within a level (mean) | cells | cost ratio (scan / estimate) |",
             "|---|---|---:|---:|---:|---:|"]
    def text(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.2f}"

    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | {text(r['spearman'])} | {text(r['mean_per_level'])} | {r['cells']} | {r['cost_ratio']:g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--windows", type=int, default=4, help="SmolLM2: pydoc windows for the scan and the estimates' calibration")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store-dir", default=None, help="scan cell stores (resume an interrupted run)")
    parser.add_argument("--out", default="bench/results/proxy_agreement.jsonl")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    if args.store_dir:
        Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    loaded = None
    for name in args.cases:
        if name.startswith("smollm2"):
            if loaded is None:
                from prunescope.models import load_model

                loaded = load_model("smollm2")
            case = smollm2_case(name, loaded, args)
        else:
            case = digits_case(name)
        rows += run_case(case, args, command)
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    log(markdown(rows))


if __name__ == "__main__":
    main()
