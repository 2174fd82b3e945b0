"""How far adaptive sampling can go on an LLM's perplexity scan: speed vs rank agreement (issue 5).

Measures, once, the per-token NLL change of every cell of a SmolLM2-135M scan (magnitude, levels
0.3/0.5/0.7, the 7 Linears of the chosen blocks, ``--windows`` pydoc windows of 512 tokens) with
the exact incremental scan's replay, timing each cell, and the naive loop (deepcopy, prune, full
evaluation) on every ``--naive-every``-th cell in the same run. Then it replays stopping rules on
those per-token changes, so every rule is judged on the same cells:

  chunk    tokens per sample: 512 = one window (what ``scan(mode="adaptive")`` does), shorter
           chunks model an evaluation that could stop inside a window (windows in one random
           order, chunks in order within a window, as a KV-cached evaluation would go), costed
           optimistically at their share of the window's time.
  min      samples a cell sees before it may stop; it stops once the interval's half-width is at
           most max(``tolerance`` (perplexity), ``relative`` x |change|). The interval is the
           scan's: t interval of the weighted mean change, finite-population corrected.
  budget   a rule-free reference: every cell sees the same first ``budget`` share of the tokens.

Per rule (one JSON line each, means and minimums over ``--orders`` random window orders): the
modelled wall time (each cell's measured exact time x the share of its tokens used), its ratio to
the naive loop, Spearman with the exact changes, and coverage (share of cells whose exact change
lies inside the interval). The modelled times leave out the cost of stopping inside a window
(KV-cache bookkeeping), so they favour short chunks.

    OMP_NUM_THREADS=2 python bench/adaptive_frontier.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shlex
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from bench_io import emit, log
from scipy.special import stdtrit
from scipy.stats import spearmanr

import prunescope as ps
from prunescope.cell_measure import Replay
from prunescope.masks import keep_mask
from prunescope.target import weight_of

LEVELS = (0.3, 0.5, 0.7)


def token_nll(model: torch.nn.Module, batch: dict) -> np.ndarray:
    """Per-token NLL (nats) of one window, [windows in batch, tokens - 1]."""
    ids = batch["input_ids"]
    logits = model(**batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1).double().numpy()


def measure(args: argparse.Namespace) -> dict:
    """Dense and per-cell per-token NLL, each cell's exact (incremental) time, naive times."""
    from prunescope.data import pydoc_text, token_windows
    from prunescope.models import load_model

    loaded = load_model("smollm2")
    model = loaded.model
    batches = token_windows(pydoc_text(), loaded.tokenizer, 512, args.windows)
    evaluator = ps.Evaluator(model, batches, "perplexity")
    targets = ps.find_targets(model, include=[f"model.layers.{b}.*" for b in args.blocks])
    with torch.no_grad():
        dense = np.concatenate([token_nll(model, b) for b in batches])
    replay = Replay(model, evaluator, targets, "weight", 2 * 1024**3)
    deltas, seconds, naive_seconds = [], [], []
    for index, (target, level) in enumerate(itertools.product(targets, LEVELS)):
        weight = weight_of(model, target)
        mask = keep_mask(weight, level, "magnitude", target.input_dim, seed=0, key=target.name)
        on_batch = replay.on_batch(target.name)
        original = weight.detach().clone()
        started = time.perf_counter()
        with torch.no_grad():
            weight.mul_(mask)
            rows = []
            for i, batch in enumerate(batches):
                with on_batch(i) if on_batch else nullcontext():
                    rows.append(token_nll(model, batch))
            weight.copy_(original)
        seconds.append(time.perf_counter() - started)
        deltas.append(np.concatenate(rows) - dense)
        if index % args.naive_every == 0:
            started = time.perf_counter()
            pruned = copy.deepcopy(model)
            with torch.no_grad():
                weight_of(pruned, target).mul_(mask)
                naive_delta = np.concatenate([token_nll(pruned, b) for b in batches]) - dense
            naive_seconds.append(time.perf_counter() - started)
            del pruned
            assert np.allclose(naive_delta.mean(), deltas[-1].mean(), rtol=1e-5, atol=1e-9), target.name
        log(f"{target.name} @ {level}: {deltas[-1].mean():+.5f} nats, {seconds[-1]:.1f} s")
    replay.close()
    return {"dense": dense, "deltas": np.stack(deltas), "seconds": np.array(seconds),
            "naive_cell_seconds": statistics.median(naive_seconds), "naive_cells": len(naive_seconds)}


def simulate(data: dict, chunk: int, least: int, tolerance: float, relative: float, order: np.ndarray,
             confidence: float = 0.95):
    """One stopping rule on the recorded per-token changes: (tokens share per cell, estimates, covered)."""
    deltas, dense_mean = data["deltas"], float(data["dense"].mean())
    cells, windows, tokens = deltas.shape
    population = windows * tokens
    per_window = -(-tokens // chunk)
    quantiles = {n: float(stdtrit(n - 1, 0.5 + confidence / 2)) for n in range(2, windows * per_window + 1)}

    def ppl_change(x: float) -> float:
        return float(np.exp(dense_mean + x) - np.exp(dense_mean))

    exact = np.array([ppl_change(d.mean()) for d in deltas])
    shares, estimates, covered = [], [], []
    for cell in range(cells):
        means, sizes = [], []
        for window, j in itertools.product(order, range(per_window)):
            piece = deltas[cell, window, j * chunk:(j + 1) * chunk]
            means.append(piece.mean())
            sizes.append(piece.size)
            n = len(means)
            if n < least and n < windows * per_window:
                continue
            m, w = np.array(means), np.array(sizes, float)
            seen = w.sum()
            mean = float((m * w).sum() / seen)
            se = np.sqrt(n / (n - 1) * float(((w * (m - mean)) ** 2).sum())) / seen * np.sqrt(max(0.0, 1 - seen / population)) if n > 1 else np.inf
            half = quantiles.get(n, np.inf) * se
            low, high = ppl_change(mean - half), ppl_change(mean + half)
            if (high - low) / 2 <= max(tolerance, relative * abs(ppl_change(mean))) or seen >= population:
                break
        shares.append(seen / population)
        estimates.append(ppl_change(mean))
        covered.append(low <= exact[cell] <= high)
    return np.array(shares), np.array(estimates), np.array(covered), exact


def rows(data: dict, args: argparse.Namespace, command: str) -> list[dict]:
    seconds = data["seconds"]
    naive = data["naive_cell_seconds"] * len(seconds)
    windows = data["deltas"].shape[1]
    orders = [np.random.default_rng(seed).permutation(windows) for seed in range(args.orders)]
    common = {"windows": windows, "tokens_per_window": data["deltas"].shape[2] + 1, "cells": len(seconds),
              "blocks": args.blocks, "naive_cells_timed": data["naive_cells"], "orders": args.orders, "command": command}
    out = [{**common, "rule": "exact", "seconds": round(float(seconds.sum()), 1), "naive_seconds": round(naive, 1),
            "ratio_to_naive": round(float(naive / seconds.sum()), 3)}]
    for chunk, least, tolerance, relative in itertools.product(args.chunks, args.min_samples, args.tolerances, args.relative):
        results = [simulate(data, chunk, least, tolerance, relative, order) for order in orders]
        ratios = [naive / float((shares * seconds).sum()) for shares, *_ in results]
        rhos = [float(spearmanr(exact, est).statistic) for _, est, _, exact in results]
        coverage = [float(cov.mean()) for _, _, cov, _ in results]
        out.append({**common, "rule": "adaptive", "chunk_tokens": chunk, "min_samples": least, "tolerance": tolerance,
                    "relative": relative, "ratio_to_naive": round(statistics.mean(ratios), 2), "ratio_min": round(min(ratios), 2),
                    "spearman": round(statistics.mean(rhos), 4), "spearman_min": round(min(rhos), 4),
                    "coverage": round(statistics.mean(coverage), 4), "coverage_min": round(min(coverage), 4),
                    "tokens_share": round(float(np.mean([s.mean() for s, *_ in results])), 4)})
    deltas = data["deltas"]
    exact = deltas.mean(axis=(1, 2))
    for budget in args.budgets:
        rhos = []
        for order in orders:
            flat = deltas[:, order, :].reshape(len(seconds), -1)
            rhos.append(float(spearmanr(exact, flat[:, :max(1, round(budget * flat.shape[1]))].mean(axis=1)).statistic))
        out.append({**common, "rule": "fixed budget", "tokens_share": budget,
                    "ratio_to_naive": round(naive / float(budget * seconds.sum()), 2),
                    "spearman": round(statistics.mean(rhos), 4), "spearman_min": round(min(rhos), 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=list(range(0, 30, 2)), help="blocks whose 7 Linears are scanned")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--naive-every", type=int, default=7, help="time the naive loop on every K-th cell")
    parser.add_argument("--orders", type=int, default=5, help="random window orders each rule is replayed in")
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 128, 32])
    parser.add_argument("--min-samples", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.02])
    parser.add_argument("--relative", type=float, nargs="+", default=[0.0, 0.25],
                        help="also stop once the half-width is at most this share of |change|")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.2, 0.25, 0.375, 0.5])
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    data = measure(args)
    for row in rows(data, args, command):
        emit(row, args.out)


if __name__ == "__main__":
    main()
