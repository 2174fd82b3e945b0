"""One-shot pruning of SmolLM2-135M (issue 4): magnitude, Wanda and SparseGPT at 50% and 2:4.

Every Linear of the 30 decoder blocks is pruned (the tied embedding / LM head is not). Calibration:
``--calibration`` windows of ``--seq-len`` tokens from the start of the first half of the pydoc
text; evaluation: ``--evaluation`` windows from the start of its second half (perplexity, token
level). Each (method, level) runs in a fresh child process so that its peak memory is its own:
the child loads the model, prunes it in place with ``prunescope.prune_oneshot``, then evaluates.

Time: ``prune_s`` is the wall time of ``prune_oneshot`` (input capture, statistics, pruning);
``prune_in_forwards`` divides it by ``calibration_forward_s``, one dense forward pass of the whole
model over the same calibration windows timed just before in the same process (the machine's
speed and load cancel out; block-by-block calibration needs about two such passes).

Memory, in MiB: ``rss_before_prune`` (resident set after loading the model and the data),
``peak_rss_prune`` (maximum resident set while pruning, read from /proc/self/statm every 5 ms by
a sampling thread), ``extra_rss_prune`` (their difference: what pruning itself needed), and
``max_rss_process`` (``resource.getrusage`` ru_maxrss of the whole child, loading and evaluation
included). One JSON line per (method, level), then one line with the ordering check
dense < SparseGPT <= Wanda << magnitude (``<<``: magnitude at least twice Wanda's perplexity);
all lines also go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

METHODS = ("magnitude", "wanda", "sparsegpt")
LEVELS = ("0.5", "2:4")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Maximum resident set size (MiB) seen by a thread reading /proc/self/statm every 5 ms."""

    def __init__(self) -> None:
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def child(method: str, level: str, args: argparse.Namespace) -> dict:
    """Load SmolLM2, prune it by ``method`` at ``level`` (or not, for "dense"), evaluate; one result row."""
    import torch

    import prunescope as ps
    from prunescope.data import pydoc_text, split_windows
    from prunescope.models import load_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model("smollm2")
    calibration, evaluation, first = split_windows(pydoc_text(), loaded.tokenizer, args.seq_len, args.calibration, args.evaluation)
    load_seconds = time.perf_counter() - started
    model = loaded.model
    row = {"model": "smollm2", "method": method, "level": level if method != "dense" else None,
           "calibration": f"pydoc windows 0..{args.calibration - 1} x {args.seq_len} tokens",
           "evaluation": f"pydoc windows {first}..{first + args.evaluation - 1} x {args.seq_len} tokens",
           "threads": args.threads, "load_s": round(load_seconds, 1)}
    if method != "dense":
        started = time.perf_counter()
        with torch.no_grad():  # speed baseline, same process: one dense forward over the calibration windows
            for batch in calibration:
                model(**batch, use_cache=False)
        forward_seconds = time.perf_counter() - started
        before = rss_mib()
        with PeakSampler() as sampler:
            started = time.perf_counter()
            model = ps.prune_oneshot(model, calibration, criterion=method, level=level, inplace=True)
            report = model.prunescope_report
            prune_seconds = time.perf_counter() - started
        weights = [model.get_submodule(layer.name).weight for layer in report.layers]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        row.update({"layers": len(report.layers), "sparsity": round(zeros, 5), "prune_s": round(prune_seconds, 1),
                    "calibration_forward_s": round(forward_seconds, 1), "prune_in_forwards": round(prune_seconds / forward_seconds, 2),
                    "rss_before_prune": round(before), "peak_rss_prune": round(sampler.peak),
                    "extra_rss_prune": round(sampler.peak - before)})
    started = time.perf_counter()
    row["perplexity"] = ps.Evaluator(model, evaluation, "perplexity").evaluate(model).value
    row["eval_s"] = round(time.perf_counter() - started, 1)
    row["max_rss_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def ordering(rows: list[dict]) -> dict:
    """The check dense < SparseGPT <= Wanda << magnitude at each level (<<: at least 2x)."""
    ppl = {(r["method"], r["level"]): r["perplexity"] for r in rows}
    dense = ppl.get(("dense", None))
    checks = {}
    for level in sorted({r["level"] for r in rows if r["level"] is not None}):
        s, w, m = (ppl.get((method, level)) for method in ("sparsegpt", "wanda", "magnitude"))
        if None in (dense, s, w, m):
            continue
        checks[level] = {"dense<sparsegpt": dense < s, "sparsegpt<=wanda": s <= w, "wanda<<magnitude": m >= 2 * w,
                         "magnitude/wanda": round(m / w, 2)}
    holds = bool(checks) and all(all(v for k, v in c.items() if k != "magnitude/wanda") for c in checks.values())
    return {"ordering": checks, "holds": holds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows (first half of the text)")
    parser.add_argument("--evaluation", type=int, default=16, help="evaluation windows (second half of the text)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--levels", default=",".join(LEVELS))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--out", type=Path, default=Path("bench/results/oneshot_llm.jsonl"))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "LEVEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)), flush=True)
        return
    log("command: " + shlex.join([sys.executable, *sys.argv]))
    runs = [("dense", "-")] + [(m, lv) for lv in args.levels.split(",") for m in args.methods.split(",")]
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for method, level in runs:
            command = [sys.executable, __file__, "--child", method, level, "--calibration", str(args.calibration),
                       "--evaluation", str(args.evaluation), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            log(f"running {method} {level} ...")
            done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()
        check = ordering(rows)
        print(json.dumps(check), flush=True)
        out.write(json.dumps(check) + "\n")


if __name__ == "__main__":
    main()
