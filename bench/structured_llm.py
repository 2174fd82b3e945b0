"""Structured pruning of real transformers (issue 3): heads, FFN neurons and blocks, shrunk.

For each model (SmolLM2-135M: causal LM, metric perplexity; all-MiniLM-L6-v2: sentence encoder,
metric 1 - cosine of its mean-pooled embedding to the dense model's; torchvision ViT-B/16:
random init, nn.MultiheadAttention, metric KL to the dense outputs on random 224 px images, a
window being a batch of 8 images) and each granularity (head: a KV group with its query
heads; neuron; block): scan the unit groups on ``--scan-windows`` pydoc windows, plan a
``--flops`` budget (fraction of Conv/Linear FLOPs removed, from the pruned shapes) by the
threshold rule and, except for blocks, uniformly; shrink; then on ``--eval-windows`` held-out
windows (starting at window 100) report the metric of dense, threshold and uniform, the
masked-vs-shrunk difference, parameters and FLOPs after, and dense vs shrunk latency on one
window (median of ``--repeats`` alternating runs). One JSON line per (model, granularity, plan).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

import prunescope as ps
from prunescope.cost import CostModel
from prunescope.data import pydoc_text, random_inputs, token_windows
from prunescope.latency import compare_latency
from prunescope.models import load_model
from prunescope.structured import parameter_count

LEVELS = {"head": (0.34, 0.67), "neuron": (0.25, 0.5, 0.75), "block": (1.0,)}
FLOPS = {"head": 0.1, "neuron": 0.2, "block": 0.2}
"""Default FLOPs budget per granularity: attention projections are a small share of the FLOPs
(SmolLM2: removing 2 of 3 KV groups everywhere saves 16.7%), so heads get a smaller budget."""
METRIC = {"smollm2": "perplexity", "minilm": "cosine", "torchvision:vit_b_16": "kl"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def outputs(model: torch.nn.Module, batch: dict | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "logits", None) if getattr(out, "logits", None) is not None else out.last_hidden_state


def run(spec: str, granularity: str, args: argparse.Namespace) -> list[dict]:
    loaded = load_model(spec)
    model = loaded.model
    if loaded.kind == "vision":
        scan_batches = random_inputs(loaded.input_shape, 8 * args.scan_windows, 8, seed=0)
        eval_batches = random_inputs(loaded.input_shape, 8 * args.eval_windows, 8, seed=100)
    else:
        text = pydoc_text()
        scan_batches = token_windows(text, loaded.tokenizer, args.seq_len, args.scan_windows)
        eval_batches = token_windows(text, loaded.tokenizer, args.seq_len, args.eval_windows, first_window=100)
    scan_eval = ps.Evaluator(model, scan_batches, METRIC[spec])
    held_out = ps.Evaluator(model, eval_batches, METRIC[spec])
    targets = ps.find_targets(model, granularity)
    started = time.perf_counter()
    levels = LEVELS[granularity] if granularity != "block" else (0.5,)
    profile = ps.scan(model, scan_eval, targets, levels=levels)
    scan_seconds = time.perf_counter() - started
    budget = ps.Budget(flops=args.flops or FLOPS[granularity])
    methods = ("threshold",) if granularity == "block" else ("threshold", "uniform")
    dense_cost = CostModel.of(model, eval_batches[0])
    dense_value = held_out.dense.value
    rows = []
    for method in methods:
        plan = ps.allocate(profile, budget, method=method)
        shrunk = ps.apply(model, plan, shrink=True)
        masked = ps.apply(model, plan, shrink=False)
        reference = outputs(masked, eval_batches[0])
        difference = float((reference - outputs(shrunk, eval_batches[0])).abs().max() / reference.abs().max())
        cost = CostModel.of(shrunk, eval_batches[0])
        seconds = compare_latency({"dense": model, "shrunk": shrunk}, eval_batches[0], repeats=args.repeats, warmup=1)
        rows.append({
            "model": spec, "granularity": granularity, "method": method, "budget_flops": budget.flops,
            "metric": METRIC[spec], "dense": dense_value, "pruned": held_out.evaluate(shrunk).value,
            "masked_vs_shrunk": difference,
            "params_ratio": parameter_count(shrunk) / parameter_count(model),
            "flops_ratio": cost.total_flops / dense_cost.total_flops,
            "latency_speedup": seconds["dense"] / seconds["shrunk"],
            "cells": len(profile.cells), "scan_s": round(scan_seconds, 1),
            "scan_windows": args.scan_windows, "eval_windows": args.eval_windows, "seq_len": args.seq_len,
            "removed_blocks": plan.details.get("removed_blocks"),
        })
        log(f"{spec} {granularity} {method}: {rows[-1]['pruned']:.4g} (dense {dense_value:.4g})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=sorted(METRIC))
    parser.add_argument("--granularities", nargs="+", default=["head", "neuron", "block"], choices=sorted(LEVELS))
    parser.add_argument("--flops", type=float, default=None, help="fraction of Conv/Linear FLOPs to remove (default per granularity)")
    parser.add_argument("--scan-windows", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    for spec in args.models:
        for granularity in args.granularities:
            try:
                rows = run(spec, granularity, args)
            except ps.PrunescopeError as error:
                rows = [{"model": spec, "granularity": granularity, "error": str(error)}]
            for row in rows:
                print(json.dumps({**row, "torch_threads": torch.get_num_threads(), "command": command}), flush=True)


if __name__ == "__main__":
    main()
