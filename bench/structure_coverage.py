"""Coverage of channel pruning (issue 3): every torchvision classification model at a uniform 50% plan.

For each model in ``torchvision.models.list_models(module=torchvision.models)`` (random init,
seeded, then made to depend on every channel by :func:`liven`; googlenet and inception_v3 built with ``aux_logits=False``, because their auxiliary heads
do not run in eval mode and so cannot be coupled): find the channel groups on 2 random images,
remove 50% of every group's channels by group L1 norm, shrink, and compare the shrunk model with
the dense model masked the same way (``mask_channels``). One JSON line per model on stdout:

  runs            the shrunk model runs on the example batch
  matches_masks   max |masked - shrunk| / max |masked| <= 1e-4 (``rel_diff`` is the value)
  groups/refused  groups pruned / groups left dense (with the first reason)
  params_ratio    shrunk / dense parameters; ``flops_ratio`` the same for Conv/Linear FLOPs
  latency         dense and shrunk forward time at batch 8 (``--batch``), median of ``--repeats``
                  alternating repeats after one warm-up each; ``speedup`` = dense / shrunk.
                  Skipped (``latency_skipped``) above ``--max-gflops`` dense GFLOPs per image.
  error           for a model that is not supported: the PrunescopeError naming the op/module

The last line is a summary. Progress goes to stderr. On a shared 2-core machine use ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
import warnings

import torch

from prunescope.errors import PrunescopeError
from prunescope.structure.channel_graph import trace_channels
from prunescope.structure.channel_plan import plan_channel_removals
from prunescope.structure.channel_shrink import (
    TOLERANCE,
    _output,
    count_flops,
    masked_output,
    relative_difference,
    shrink_channels,
)
from prunescope.structure.channels import coupled_groups

LEVEL = 0.5
AUX_FREE = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False, "init_weights": True}}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(name: str, seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **AUX_FREE.get(name, {})).eval()
    return liven(model, seed)


def liven(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make a random-init model depend on every channel, so that "masked == shrunk" means something:
    torchvision zero-initialises some heads (ViT) and last BatchNorms of residual blocks, and
    starts ConvNeXt layer scales at 1e-6. Zero weights get N(0, 0.02), BatchNorms get random
    scales, shifts and running statistics, layer scales become 0.5."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale"):
                parameter.fill_(0.5)
            elif parameter.dim() >= 2 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats:
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def latency(dense: torch.nn.Module, shrunk: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    times: dict[str, list[float]] = {"dense": [], "shrunk": []}
    models = {"dense": dense, "shrunk": shrunk}
    with torch.inference_mode():
        for key in models:
            models[key](x)  # warm-up
        for repeat in range(repeats):
            order = ("dense", "shrunk") if repeat % 2 == 0 else ("shrunk", "dense")
            for key in order:
                start = time.perf_counter()
                models[key](x)
                times[key].append(time.perf_counter() - start)
    return statistics.median(times["dense"]), statistics.median(times["shrunk"])


def measure(name: str, args: argparse.Namespace) -> dict:
    row: dict = {"model": name}
    started = time.perf_counter()
    model = build(name, args.seed)
    px = args.px
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(2, 3, px, px, generator=generator)
    try:
        trace = trace_channels(model, example)
        coupled, refused = coupled_groups(trace)
        del trace
        groups = [c.group for c in coupled]
        row["groups"] = len(groups)
        row["refused"] = len(refused)
        if refused:
            row["refused_reason"] = next(iter(refused.items()))
        if not groups:
            raise PrunescopeError(f"{name} has no prunable channel group")
        removals = plan_channel_removals(model, groups, LEVEL, "l1")
        shrunk = shrink_channels(model, removals, example, verify=False)
        row["runs"] = True
        masked = masked_output(model, groups, removals, example)
        rel = relative_difference(masked, _output(shrunk, example))
        row["rel_diff"] = float(f"{rel:.3g}")
        row["matches_masks"] = rel <= TOLERANCE
        row["differs_from_dense"] = relative_difference(_output(model, example), masked) > 10 * TOLERANCE
        dense_params = sum(p.numel() for p in model.parameters())
        row["params_ratio"] = round(sum(p.numel() for p in shrunk.parameters()) / dense_params, 4)
        dense_flops = count_flops(model, example)
        row["flops_ratio"] = round(count_flops(shrunk, example) / dense_flops, 4)
        row["dense_gflops"] = round(dense_flops / 1e9, 3)
        if args.repeats and dense_flops / 1e9 <= args.max_gflops:
            x = torch.randn(args.batch, 3, args.latency_px, args.latency_px, generator=generator)
            dense_s, shrunk_s = latency(model, shrunk, x, args.repeats)
            row.update(dense_ms=round(dense_s * 1e3, 1), shrunk_ms=round(shrunk_s * 1e3, 1), speedup=round(dense_s / shrunk_s, 3))
        elif args.repeats:
            row["latency_skipped"] = f"dense {dense_flops / 1e9:.1f} GFLOPs per image > --max-gflops {args.max_gflops}"
    except PrunescopeError as error:
        row.setdefault("runs", False)
        row["error"] = str(error)[:400]
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model names (default: every torchvision classification model)")
    parser.add_argument("--px", type=int, default=224, help="image size for tracing and the mask/shrink comparison")
    parser.add_argument("--latency-px", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="latency batch size")
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats per model (0 skips latency)")
    parser.add_argument("--max-gflops", type=float, default=20.0, help="skip latency above this many dense GFLOPs per image")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model (each runs in its own process)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args)), flush=True)
        return
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    command = "python bench/structure_coverage.py " + shlex.join(sys.argv[1:])
    passed = [a for a in sys.argv[1:] if a != "--models" and a not in names]
    ok = 0
    for i, name in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {name}")
        started = time.perf_counter()
        try:  # one process per model: memory is returned, and a hang is cut off
            done = subprocess.run([sys.executable, __file__, *passed, "--one", name], capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "model": name, "runs": False, "error": f"crashed (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "runs": False, "error": f"timed out after {args.timeout:.0f} s (Torch-Pruning's grouping "
                   "does not finish on this graph)", "seconds": round(time.perf_counter() - started, 1)}
        ok += bool(row.get("runs") and row.get("matches_masks"))
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": True, "models": len(names), "shrink_run_match": ok, "fraction": round(ok / max(len(names), 1), 3),
                      "level": LEVEL, "px": args.px, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                      "torchvision": torchvision.__version__, "command": command}))


if __name__ == "__main__":
    main()
