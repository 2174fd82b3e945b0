"""Plan quality on SmolLM2-135M (issue 13): uniform, OWL, threshold, knapsack and search plans, each checked.

Protocol (bench/plan_quality_data.py): calibration windows 0..31 of the pydoc text (Wanda /
SparseGPT statistics), the profile's KL on windows 32..33, the search's fitness on windows 32..35
(screening on one of them), held-out perplexity on windows 110..125. The profile comes from
bench/plan_quality_profile.py. Every plan is saved under bench/results/plan_quality/ and checked by
applying it as a user would (``prunescope.apply`` with the calibration windows: block by block):
measured KL on the profile windows against the additive prediction, and held-out perplexity.

    python bench/plan_quality.py check --criterion sparsegpt --sparsity 0.7 --method uniform
    python bench/plan_quality.py search --criterion sparsegpt --sparsity 0.7 --start profile --evaluations 600
    python bench/plan_quality.py bank --criterion sparsegpt     # bank build time against one uniform run
    python bench/plan_quality.py compare --criterion sparsegpt --sparsity 0.7   # warm vs cold, from the two plans

One JSON line per run, printed and appended to ``--out``; a (criterion, sparsity, method) already
there is skipped, so a driver script can be re-run after a kill.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plan_quality_data import CALIBRATION, FITNESS, HELD_OUT, PROFILE, windows  # noqa: E402

PLANS = Path(__file__).parent / "results" / "plan_quality"
RUNS = Path("/work/runs/plan_quality")
GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FITNESS_WINDOWS = (FITNESS[0], 4)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def done(out: Path, key: dict) -> bool:
    if not out.exists():
        return False
    for line in out.read_text().splitlines():
        row = json.loads(line)
        if all(row.get(k) == v for k, v in key.items()):
            return True
    return False


def emit(out: Path, row: dict) -> None:
    row["command"] = shlex.join(["python", *sys.argv])
    print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def setup(threads: int):
    import torch

    from prunescope.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    return loaded, windows(loaded, CALIBRATION)


def make_plan(args, loaded, calibration):
    import prunescope as ps

    model = loaded.model
    budget = ps.Budget(sparsity=args.sparsity)
    if args.command == "check" and args.method == "uniform":  # needs no profile: the same plan allocate(method="uniform") makes
        targets = ps.find_targets(model)
        options = {"block_size": 128, "damp": 0.01} if args.criterion == "sparsegpt" else {}
        return ps.Plan({t.name: args.sparsity for t in targets}, {t.name: t.params for t in targets}, args.criterion,
                       method="uniform", budget=budget, options=options), "uniform"
    profile = ps.Profile.load(args.profile or RUNS / f"profile_{args.criterion}.json")
    if args.command == "search":
        state = RUNS / f"search_{args.criterion}_{args.sparsity}_{args.start}.json"
        plan = ps.search(profile, budget, model, fitness=windows(loaded, FITNESS_WINDOWS), calibration=calibration, levels=GRID,
                         start=args.start, evaluations=args.evaluations, seconds=args.seconds, state=state, seed=args.seed,
                         progress=args.progress)
        return plan, f"search-{'warm' if args.start == 'profile' else 'cold'}"
    if args.method == "owl":
        return ps.allocate(profile, budget, method="owl", model=model, calibration=calibration), "owl"
    return ps.allocate(profile, budget, method=args.method, model=model), args.method


def check(args) -> None:
    import prunescope as ps
    from prunescope.plan_check import check_pruned

    method = args.method if args.command == "check" else f"search-{'warm' if args.start == 'profile' else 'cold'}"
    key = {"criterion": args.criterion, "sparsity": args.sparsity, "method": method}
    if done(args.out, key):
        log(f"skip {key}: already in {args.out}")
        return
    loaded, calibration = setup(args.threads)
    model = loaded.model
    started = time.perf_counter()
    plan, method = make_plan(args, loaded, calibration)
    plan_seconds = time.perf_counter() - started
    path = PLANS / f"{args.criterion}-{args.sparsity}-{method}.json"
    plan.save(path)
    started = time.perf_counter()
    pruned = ps.apply(model, plan, calibration=calibration)
    apply_seconds = time.perf_counter() - started
    profile_check = check_pruned(pruned, plan, ps.Evaluator(model, windows(loaded, PROFILE), "kl"))
    held_out = check_pruned(pruned, plan, ps.Evaluator(model, windows(loaded, HELD_OUT), "perplexity"))
    row = {**key, "plan": str(path.relative_to(Path(__file__).parent.parent)), "plan_sparsity": round(plan.sparsity, 6),
           "held_out_ppl": round(held_out.pruned, 3), "held_out_dense_ppl": round(held_out.dense, 3),
           "held_out_ci": [round(held_out.ci_low + held_out.dense, 3), round(held_out.ci_high + held_out.dense, 3)],
           "kl_measured": profile_check.measured, "kl_ci": [profile_check.ci_low, profile_check.ci_high],
           "kl_predicted": profile_check.predicted, "predicted_over_measured": profile_check.ratio,
           "plan_s": round(plan_seconds, 1), "apply_s": round(apply_seconds, 1), "threads": args.threads}
    for name in ("fitness_start", "fitness_end", "generations", "evaluations", "seconds", "bank_seconds", "bank_bytes"):
        if name in plan.details:
            row[f"search_{name}"] = plan.details[name]
    emit(args.out, row)


def bank(args) -> None:
    """The bank of every layer at every grid level against one uniform one-shot run, same process."""
    import prunescope as ps
    from prunescope.oneshot.bank import build_variant_bank

    loaded, calibration = setup(args.threads)
    model = loaded.model
    names = [t.name for t in ps.find_targets(model)]
    started = time.perf_counter()
    ps.prune_oneshot(model, calibration, criterion=args.criterion, level=0.5)
    uniform_seconds = time.perf_counter() - started
    started = time.perf_counter()
    built = build_variant_bank(model, calibration, names, GRID, criterion=args.criterion)
    bank_seconds = time.perf_counter() - started
    emit(args.out, {"stage": "bank", "criterion": args.criterion, "layers": len(names), "levels": list(GRID),
                    "bank_s": round(bank_seconds, 1), "uniform_oneshot_s": round(uniform_seconds, 1),
                    "bank_over_uniform": round(bank_seconds / uniform_seconds, 2), "bank_gib": round(built.nbytes / 2**30, 2),
                    "threads": args.threads})


def compare(args) -> None:
    """Warm against cold start, from the two searched plans' histories: for each fitness the warm search
    reached after N evaluations, the evaluations the cold search needed to reach it (None: never)."""
    import prunescope as ps

    warm = ps.Plan.load(PLANS / f"{args.criterion}-{args.sparsity}-search-warm.json").details["history"]
    cold = ps.Plan.load(PLANS / f"{args.criterion}-{args.sparsity}-search-cold.json").details["history"]

    def cold_needs(fitness: float) -> int | None:
        return next((row["evaluations"] for row in cold if row["fitness"] <= fitness), None)

    points = []
    for row in warm:
        if points and points[-1]["warm_fitness"] == row["fitness"]:
            continue
        needed = cold_needs(row["fitness"])
        points.append({"warm_evaluations": row["evaluations"], "warm_fitness": row["fitness"], "cold_evaluations": needed,
                       "ratio": None if needed is None else round(needed / row["evaluations"], 2)})
    emit(args.out, {"stage": "warm_vs_cold", "criterion": args.criterion, "sparsity": args.sparsity,
                    "cold_end": {"evaluations": cold[-1]["evaluations"], "fitness": cold[-1]["fitness"]},
                    "warm_end": {"evaluations": warm[-1]["evaluations"], "fitness": warm[-1]["fitness"]}, "points": points})


def allocations(args) -> None:
    """The profile's additive prediction of uniform, threshold and knapsack at each sparsity, and allocation time (no model)."""
    import prunescope as ps

    profile = ps.Profile.load(args.profile or RUNS / f"profile_{args.criterion}.json")
    for sparsity in (0.5, 0.6, 0.7, 0.8):
        row = {"stage": "allocations", "criterion": args.criterion, "sparsity": sparsity, "targets": len(profile.targets)}
        for method in ("uniform", "threshold", "knapsack"):
            started = time.perf_counter()
            plan = ps.allocate(profile, sparsity, method=method)
            row[f"{method}_predicted"] = round(plan.predicted_drop, 5)
            row[f"{method}_s"] = round(time.perf_counter() - started, 3)
        row["knapsack_gap"] = plan.details["optimality_gap"]
        row["knapsack_solution"] = plan.details["solution"]
        emit(args.out, row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("check", "search", "bank", "compare", "allocations"))
    parser.add_argument("--criterion", default="sparsegpt", choices=("sparsegpt", "wanda"))
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--method", default="threshold", choices=("uniform", "owl", "threshold", "knapsack", "erk", "lamp"))
    parser.add_argument("--start", default="profile", choices=("profile", "uniform"))
    parser.add_argument("--evaluations", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "plan_quality.jsonl")
    args = parser.parse_args()
    log("command: " + shlex.join([sys.executable, *sys.argv]))
    {"bank": bank, "compare": compare, "allocations": allocations}.get(args.command, check)(args)


if __name__ == "__main__":
    main()
