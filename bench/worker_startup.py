"""What a local scan worker spends before its first cell (issue 5, execution), on the resnet18 case
of bench/scan_workers.py (64 random 64 px images in 16 batches of 4, every conv and the fc, levels
0.1..0.9, exact incremental).

This process packs the worker payload as ``scan(..., workers=N)`` does; then, for each repeat, a
fresh interpreter (as a worker is) times its phases: importing prunescope's worker module (torch
included), unpacking the payload (which imports the model's own modules, torchvision here),
building the TargetRunner (recording its incremental cache), and its first and second cells.
One JSON line: payload size and pack seconds, then the median of each phase over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
started = time.perf_counter()
import prunescope.execution.worker
from prunescope.execution.payload import runner_of, unpack
imported = time.perf_counter()
context = unpack(open(sys.argv[1], "rb").read())
unpacked = time.perf_counter()
runner = runner_of(context, 1)
built = time.perf_counter()
cells = runner.cells(context.targets[0], {})
next(cells)
first = time.perf_counter()
next(cells)
second = time.perf_counter()
print(json.dumps({"import_s": imported - started, "unpack_s": unpacked - imported, "runner_s": built - unpacked,
                  "first_cell_s": first - built, "second_cell_s": second - first, "total_s": second - started}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from torchvision.models import resnet18

    import prunescope as ps
    from prunescope.cell_runner import ScanSettings
    from prunescope.execution.payload import WorkerContext, pack
    from prunescope.levels import DEFAULT_LEVELS, level_key, parse_levels

    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    evaluator = ps.Evaluator(model, [images[i:i + 4] for i in range(0, 64, 4)], "kl")
    targets = ps.find_targets(model, exclude=[], example=evaluator.batches[0])
    _ = evaluator.dense
    levels = parse_levels(DEFAULT_LEVELS)
    settings = ScanSettings("weight", "magnitude", tuple(levels), tuple(level_key(v) for v in levels), 0, None, None,
                            "exact", None, 0.95, True, 2 * 1024**3)
    started = time.perf_counter()
    payload = pack(WorkerContext(model, evaluator, list(targets), settings))
    pack_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "payload.pkl"
        path.write_bytes(payload)
        runs = []
        for _ in range(args.repeats):
            child = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    row = {"case": "resnet18", "payload_mb": round(len(payload) / 1e6, 1), "pack_s": round(pack_s, 3),
           **{k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}, "repeats": args.repeats,
           "command": shlex.join(["python", *sys.argv])}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
