"""Bytes on disk and seconds of prunescope.save per format, for SmolLM2-135M pruned in one shot.

For each level (dense, 50%, 70%, 2:4; criterion magnitude by default: no calibration, so the
run is about saving), the model is saved as ``hf`` and ``compressed-tensors`` (``--formats``),
and each row says the folder's bytes, the ratio to the dense ``hf`` folder of the same
run, the seconds ``save`` took (it writes, reloads and compares every tensor) and what its
manifest records. One JSON line per (level, format) on stdout and appended to --out.

    OMP_NUM_THREADS=2 .venv/bin/python bench/export_sizes.py --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import emit  # noqa: E402

import prunescope as ps  # noqa: E402
from prunescope.export import read_manifest  # noqa: E402
from prunescope.models import load_model  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".onnx", ".data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", nargs="+", default=["0", "0.5", "0.7", "2:4"])
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--formats", nargs="+", default=["hf", "compressed-tensors"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/export_sizes.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(sys.argv)
    loaded = load_model("smollm2")
    dense_hf = None
    work = Path(tempfile.mkdtemp(prefix="export_sizes_"))
    try:
        for level in args.levels:
            model = loaded.model if level == "0" else ps.prune_oneshot(loaded.model, None, criterion=args.criterion,
                                                                       level=ps.parse_level(level))
            for fmt in args.formats:
                folder = work / f"{level.replace(':', '-')}-{fmt}"
                started = time.perf_counter()
                row = {"model": "smollm2", "level": level, "criterion": args.criterion if level != "0" else None, "format": fmt}
                try:
                    ps.save(model, folder, format=fmt, tokenizer=loaded.tokenizer)
                except ps.PrunescopeError as error:  # e.g. compressed-tensors of the dense model: nothing to compress
                    emit({**row, "refused": str(error), "command": command}, args.out)
                    continue
                seconds = time.perf_counter() - started
                size = folder_bytes(folder)
                if fmt == "hf" and level == "0":
                    dense_hf = size
                manifest = {k: v for k, v in read_manifest(folder).items() if k not in ("files", "notes", "model")}
                emit({**row, "bytes": size, "ratio_to_dense_hf": round(size / dense_hf, 4) if dense_hf else None,
                      "save_s": round(seconds, 2), "manifest": manifest, "torch_threads": torch.get_num_threads(),
                      "command": command}, args.out)
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
