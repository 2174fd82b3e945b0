"""Stage 1 of bench/plan_quality.py: the SmolLM2 sensitivity profile for one calibrated criterion.

Every Linear of the 30 blocks (210 targets) at levels 0.4 .. 0.9, pruned one layer at a time by
``--criterion`` (sparsegpt or wanda) from the dense model's inputs on the calibration windows, the
KL to the dense model's next-token distribution measured on the profile windows. Cells are
stored as they finish (``--store``), so a killed run resumes; the profile goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

LEVELS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criterion", required=True, choices=("sparsegpt", "wanda"))
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", default=None, help="FIRST:LAST: only the Linear layers of these blocks (a second process "
                        "on a second store shares the work; append its cell lines to the first store to merge)")
    args = parser.parse_args()
    import torch

    import prunescope as ps
    from prunescope.models import load_model

    sys.path.insert(0, str(Path(__file__).parent))
    from plan_quality_data import CALIBRATION, PROFILE, windows

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    model = loaded.model
    evaluator = ps.Evaluator(model, windows(loaded, PROFILE), "kl")
    targets = ps.find_targets(model)
    if args.blocks:
        first, last = (int(v) for v in args.blocks.split(":"))
        targets = [t for t in targets if first <= int(t.name.split(".")[2]) <= last]
    started = time.perf_counter()
    profile = ps.scan(model, evaluator, targets, levels=LEVELS, criterion=args.criterion, calibration=windows(loaded, CALIBRATION),
                      store=args.store, progress=True)
    profile.save(args.out)
    print(json.dumps({"stage": "profile", "criterion": args.criterion, "targets": len(targets), "levels": list(LEVELS),
                      "cells": len(profile.cells), "seconds": round(time.perf_counter() - started, 1), "threads": args.threads,
                      "command": shlex.join(["python", *sys.argv])}), flush=True)


if __name__ == "__main__":
    main()
