"""Cost of checking channel groups (issue 12): discovery with and without the mask-vs-shrink check.

For each torchvision model (random init, seeded, eval mode), ``discover_channel_groups`` on one
random image (batch 1, ``--px``) with ``check=False`` and ``check=True``, alternating, ``--repeats``
times in this process. One JSON line per model: groups offered and refused (with the check), the
median seconds of each, and ``ratio`` = checked / unchecked. Use ``--threads 1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from prunescope.structure.channel_discovery import discover_channel_groups


def measure(name: str, px: int, repeats: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0))
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats):
        for check in (False, True) if repeat % 2 == 0 else (True, False):
            started = time.perf_counter()
            groups, refused = discover_channel_groups(model, x, check=check)
            seconds[check].append(time.perf_counter() - started)
            if check:
                offered, left = len(groups), len(refused)
    unchecked, checked = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {"model": name, "px": px, "batch": 1, "groups": offered, "refused": left, "unchecked_s": round(unchecked, 3),
            "checked_s": round(checked, 3), "ratio": round(checked / unchecked, 3), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        row = measure(name, args.px, args.repeats)
        print(json.dumps({**row, "torch_threads": torch.get_num_threads(), "command": "python bench/channel_checks.py " + " ".join(
            ["--models", *args.models, "--px", str(args.px), "--repeats", str(args.repeats)])}), flush=True)


if __name__ == "__main__":
    main()
