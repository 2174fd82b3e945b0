"""Command line: prunescope scan | merge | estimate | plan | search | prune | report | demo. A thin shell over the Python API
(plan and search are in :mod:`prunescope.cli_plan`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from . import cli_options as options
from . import cli_plan
from .checks import whole_number
from .cli_console import DATA_HELP, LEVELS_HELP, MODEL_HELP, console
from .cli_console import echo as _echo
from .cli_console import fail as _fail
from .errors import PrunescopeError
from .outputs import check_output_file, check_output_folder

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pruning sensitivity analysis for PyTorch models.")


def _load(model_spec: str, data_spec: str | None, samples: int | None, batch_size: int | None, seq_len: int,
          first_window: int, split: str, metric: str | None):
    from .runs import load_inputs

    inputs = load_inputs(model_spec, data_spec, samples=samples, batch_size=batch_size, seq_len=seq_len,
                         first_window=first_window, split=split, metric=metric)
    _echo(f"model {model_spec} loaded in {inputs.seconds:.1f}s; data: {inputs.description}; metric: {inputs.evaluator.metric.name}")
    return inputs.loaded, inputs.evaluator


def _patterns(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [] if values == ["none"] else values


@app.command()
def scan(
    model: str = typer.Option("digits-cnn", help=MODEL_HELP),
    data: str | None = typer.Option(None, help=DATA_HELP + " (default: digits for digits-cnn)"),
    metric: str | None = typer.Option(None, help="accuracy | loss | perplexity | kl (default: suits the data)"),
    levels: str | None = typer.Option(None, help=LEVELS_HELP),
    criterion: str = typer.Option("magnitude", help="magnitude | random | wanda | sparsegpt (calibrated on the scan's own batches); structured: magnitude (= l2) | l1 | l2 | bn_scale | random"),
    granularity: str = typer.Option("weight", help="weight | channel | head | neuron | block"),
    head_mode: str = typer.Option("kv_group", help="heads: kv_group (a KV group with its query heads) | query"),
    round_to: int | None = typer.Option(None, help="structured: keep unit counts a multiple of this"),
    include: list[str] | None = typer.Option(None, help="glob on layer names; repeatable"),
    exclude: list[str] | None = typer.Option(None, help="glob on layer names; repeatable; 'none' keeps the default-excluded output layer"),
    store: Path | None = typer.Option(None, help="JSONL file of finished cells; re-run to resume"),
    out: Path = typer.Option(Path("profile.json"), help="profile file (.json or .csv); a .csv twin is written beside a .json"),
    max_drop: float | None = typer.Option(None, help="stop a layer's levels once its drop exceeds this (metric units)"),
    samples: int | None = typer.Option(None, help="images, or token windows for text data"),
    batch_size: int | None = typer.Option(None),
    seq_len: int = typer.Option(512, help="tokens per window for text data"),
    first_window: int = typer.Option(0, help="index of the first token window used"),
    split: str = typer.Option("val", help="digits split: val | test"),
    seed: int = typer.Option(0),
    mode: str = typer.Option("exact", help="exact (every batch) | adaptive (stop a cell once its interval is within --tolerance)"),
    tolerance: float | None = typer.Option(None, help="adaptive: half-width of the change's interval to stop at (metric units)"),
    min_batches: int = typer.Option(2, help="adaptive: batches a cell sees before its interval may stop it"),
    incremental: bool = typer.Option(True, help="replay recorded dense activations before each cell's target"),
    cache_mb: int = typer.Option(2048, help="incremental: MiB of recorded activations kept in memory (the rest spills to disk)"),
    workers: int | None = typer.Option(None, help="local: workers sharing this process's threads, this process and N-1 worker processes (default 1: in this process); ray: tasks at once (default: the cluster's CPUs)"),
    executor: str = typer.Option("local", help="local | ray (one Ray task per layer on the cluster ray.init() finds; pip install 'prunescope[ray]')"),
    shard: str | None = typer.Option(None, help="I/N: scan only targets I, I+N, I+2N, ... (0 <= I < N), e.g. one machine each; join with 'prunescope merge'"),
) -> None:
    """Measure each layer's sensitivity: prune one layer at one level, evaluate, restore."""
    from .execution import check_execution
    from .levels import parse_levels_text
    from .report import profile_table
    from .runs import save_profile
    from .scan import scan as run_scan
    from .store import check_store_free
    from .targets import default_excludes, find_targets

    try:  # every check that needs no model first, so a bad option costs no loading and writes nothing
        check_execution(workers, executor)
        parsed_shard = options.parse_shard(shard)
        parsed_levels = parse_levels_text(levels) if levels is not None else None
        options.check_unit_options(granularity, criterion, head_mode, round_to)
        options.check_scan_options(mode, tolerance, min_batches, seed, cache_mb, max_drop)
        options.check_data_options(samples, batch_size, seq_len, first_window, split, metric)
        options.check_profile_out(out)
        if store is not None:
            check_store_free(store)
        loaded, evaluator = _load(model, data, samples, batch_size, seq_len, first_window, split, metric)
        targets = find_targets(loaded.model, granularity, include=include, exclude=_patterns(exclude),
                               example=evaluator.batches[0], head_mode=head_mode)
        if exclude is None and granularity == "weight":
            skipped = default_excludes(loaded.model)
            if skipped:
                _echo("excluded by default (pass --exclude none to keep): " + ", ".join(f"{n} ({r})" for n, r in skipped.items()))
        parsed_levels, note = options.levels_for(granularity, targets, parsed_levels, round_to)
        if note:
            _echo(note)
        console.print(f"{len(targets)} targets x {1 if granularity == 'block' else len(parsed_levels)} levels")
        started = time.perf_counter()
        profile = run_scan(loaded.model, evaluator, targets, levels=parsed_levels, criterion=criterion, store=store, max_drop=max_drop, seed=seed,
                           round_to=round_to, mode=mode, tolerance=tolerance, min_batches=min_batches, incremental=incremental,
                           cache_bytes=cache_mb * 1024**2, progress=True, workers=workers, executor=executor,
                           shard=parsed_shard)
        profile.provenance.update({"model_spec": model, "data_spec": data})
        save_profile(profile, out)
    except PrunescopeError as error:
        _fail(error)
    console.print(profile_table(profile))
    _echo(f"scan took {time.perf_counter() - started:.1f}s; wrote {out}")


@app.command()
def merge(
    shards: list[Path] = typer.Argument(..., help="the profile files of 'scan --shard I/N' for I = 0..N-1, in any order"),
    out: Path = typer.Option(Path("profile.json"), help="merged profile file (.json or .csv); a .csv twin is written beside a .json"),
) -> None:
    """Join the shard profiles of one scan into the profile a single scan would have written."""
    from .runs import save_profile
    from .shards import merge_profiles

    try:
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise PrunescopeError(f"no such profile file: {', '.join(missing)}")
        options.check_profile_out(out)
        profile = merge_profiles(shards)
        save_profile(profile, out)
    except PrunescopeError as error:
        _fail(error)
    _echo(f"merged {len(shards)} shards: {len(profile.targets)} targets, {len(profile.cells)} cells; wrote {out}")


@app.command()
def estimate(
    score: str = typer.Option("fisher", help="magnitude | snip | taylor | fisher | obs | wanda | activation | apoz | block_influence | head_importance"),
    model: str = typer.Option("digits-cnn", help=MODEL_HELP),
    data: str | None = typer.Option(None, help=DATA_HELP + " (default: digits for digits-cnn)"),
    metric: str | None = typer.Option(None, help="accuracy | loss | perplexity | kl (default: suits the data)"),
    levels: str | None = typer.Option(None, help=LEVELS_HELP),
    criterion: str | None = typer.Option(None, help="the removal estimated, as scan's (default magnitude; obs: sparsegpt): magnitude | random; structured: magnitude (= l2) | l1 | l2 | bn_scale | random"),
    granularity: str = typer.Option("weight", help="weight | channel | head | neuron | block"),
    head_mode: str = typer.Option("kv_group", help="heads: kv_group (a KV group with its query heads) | query"),
    round_to: int | None = typer.Option(None, help="structured: keep unit counts a multiple of this"),
    include: list[str] | None = typer.Option(None, help="glob on layer names; repeatable"),
    exclude: list[str] | None = typer.Option(None, help="glob on layer names; repeatable; 'none' keeps the default-excluded output layer"),
    out: Path = typer.Option(Path("estimate.json"), help="profile file (.json or .csv), marked estimated"),
    compare: Path | None = typer.Option(None, help="a measured profile (prunescope scan) of the same cells: store and print the Spearman rank correlation"),
    samples: int | None = typer.Option(None, help="images, or token windows for text data"),
    batch_size: int | None = typer.Option(None),
    seq_len: int = typer.Option(512, help="tokens per window for text data"),
    first_window: int = typer.Option(0, help="index of the first token window used"),
    split: str = typer.Option("val", help="digits split: val | test"),
    seed: int = typer.Option(0),
) -> None:
    """Predict each layer's sensitivity from one or two passes over the data, without evaluating every cell."""
    from .estimate import agreement
    from .estimate import estimate as run_estimate
    from .levels import parse_levels_text
    from .profile import Profile
    from .report import estimate_note, profile_table
    from .targets import find_targets

    try:  # every check that needs no model first
        parsed_levels = parse_levels_text(levels) if levels is not None else None
        options.check_estimate_score(score, granularity)
        options.check_unit_options(granularity, None if score == "obs" else criterion, head_mode, round_to)
        whole_number(seed, "--seed", 0)
        options.check_data_options(samples, batch_size, seq_len, first_window, split, metric)
        check_output_file(out, "--out")
        measured = Profile.load(compare) if compare is not None else None
        loaded, evaluator = _load(model, data, samples, batch_size, seq_len, first_window, split, metric)
        targets = find_targets(loaded.model, granularity, include=include, exclude=_patterns(exclude),
                               example=evaluator.batches[0], head_mode=head_mode)
        parsed_levels, note = options.levels_for(granularity, targets, parsed_levels, round_to)
        if note:
            _echo(note)
        console.print(f"{len(targets)} targets x {1 if granularity == 'block' else len(parsed_levels)} levels; score {score}")
        profile = run_estimate(loaded.model, evaluator, targets, score=score, levels=parsed_levels, criterion=criterion, seed=seed,
                               round_to=round_to, progress=True)
        profile.provenance.update({"model_spec": model, "data_spec": data})
        if measured is not None:
            profile.provenance["agreement"] = agreement(profile, measured).to_dict()
        profile.save(out)
    except PrunescopeError as error:
        _fail(error)
    console.print(profile_table(profile))
    _echo(f"{estimate_note(profile)}; {profile.provenance['units']}; took {profile.provenance['seconds']:.1f}s; wrote {out}")


app.command()(cli_plan.plan)
app.command()(cli_plan.search)


@app.command()
def prune(
    model: str = typer.Option("digits-cnn", help=MODEL_HELP),
    plan: Path = typer.Option(Path("plan.json")),
    data: str | None = typer.Option(None, help="evaluate dense vs pruned on this data: " + DATA_HELP
                                    + " (one-shot and wanda/sparsegpt plans: calibration apart from it; default pydoc for models with a tokenizer)"),
    metric: str | None = typer.Option(None),
    samples: int | None = typer.Option(None),
    batch_size: int | None = typer.Option(None),
    seq_len: int = typer.Option(512),
    first_window: int | None = typer.Option(None, help="first evaluation window (default 0; one-shot and wanda/sparsegpt plans on text: the first window of the text's second half)"),
    split: str = typer.Option("val", help="digits split: val | test (as scan's; pass test for the held-out figure)"),
    compare_uniform: bool = typer.Option(False, help="also evaluate a uniform plan at the same sparsity"),
    shrink: bool = typer.Option(False, help="structured plans: a physically smaller model (default: masks, zeros baked into the weights)"),
    level: str | None = typer.Option(None, help="one-shot, no plan: prune every Linear of the model's blocks to this level (0.5, 2:4)"),
    criterion: str | None = typer.Option(None, help="with --level: magnitude (default) | wanda | sparsegpt"),
    calibration_samples: int = typer.Option(32, help="with --level or a wanda/sparsegpt plan: calibration windows from the text's first half (digits: training images)"),
    include: list[str] | None = typer.Option(None, help="with --level: glob on layer names; repeatable"),
    exclude: list[str] | None = typer.Option(None, help="with --level: glob on layer names; repeatable"),
    out: Path = typer.Option(Path("pruned"), help="folder for the model files, plan.json, summary.json"),
    export_format: str | None = typer.Option(None, "--format", help="hf | compressed-tensors | onnx | prunescope (default: hf for Hugging Face models, prunescope otherwise)"),
) -> None:
    """Apply a plan and save the pruned model: masked weights, or a physically smaller model.

    With --level instead of a plan: one-shot pruning of every Linear in the model's blocks by
    --criterion, calibrated block by block on held-apart data, evaluated and saved the same way.
    """
    from .export import FORMATS
    from .plan import Plan
    from .runs import DataOptions, plan_inputs, prune_by_plan, prune_in_one_shot, write_pruned

    try:  # the options, the plan and the output folder before the model is loaded
        check_output_folder(out, "--out")
        whole_number(calibration_samples, "--calibration-samples")
        options.check_data_options(samples, batch_size, seq_len, first_window, split, metric)
        if export_format is not None and export_format not in FORMATS:
            raise PrunescopeError(f"unknown --format {export_format!r}; accepted: {', '.join(FORMATS)}")
        if level is not None:
            if compare_uniform or shrink:
                raise PrunescopeError("--level prunes uniformly in one shot: it takes neither --compare-uniform nor --shrink")
            run = prune_in_one_shot(model, level, criterion or "magnitude", data, metric=metric, samples=samples,
                                    calibration_samples=calibration_samples, batch_size=batch_size, seq_len=seq_len,
                                    first_window=first_window, split=split, include=include, exclude=exclude,
                                    export_format=export_format)
        else:
            if criterion is not None or include or exclude:
                raise PrunescopeError("--criterion, --include and --exclude go with --level; a plan names its layers and criterion")
            loaded_plan = Plan.load(plan)
            inputs, calibration = plan_inputs(model, loaded_plan, DataOptions(data, metric, samples, calibration_samples, batch_size,
                                                                              seq_len, first_window, split))
            if inputs.evaluator is not None:
                _echo(f"model {model} loaded in {inputs.seconds:.1f}s; data: {inputs.description}; metric: {inputs.evaluator.metric.name}")
            run = prune_by_plan(inputs, loaded_plan, shrink=shrink, compare_uniform=compare_uniform, export_format=export_format,
                                calibration=calibration)
        for note in run.notes:
            _echo(note)
        results = write_pruned(run, out, export_format)
    except PrunescopeError as error:
        _fail(error)
    console.print(_results_table(run.title, results))
    for note in results["export"].get("notes", []):
        _echo(f"note: {note}")
    if results["export"].get("check"):
        _echo("check: " + ", ".join(f"{k} {v}" for k, v in results["export"]["check"].items()))
    _echo(f"wrote {out}/ ({results['export']['format']}): {', '.join(results['export']['files'])}, plan.json, summary.json")


def _results_table(title: str, results: dict) -> Table:
    table = Table(title=title)
    table.add_column("model")
    table.add_column(results.get("metric", "metric"), justify="right")
    table.add_column("non-zero parameters", justify="right")
    for key in ("dense", "pruned", "uniform"):
        if key in results:
            params = f"{results['params_' + key]:,}" if "params_" + key in results else ""
            table.add_row(key if key != "uniform" else "uniform plan, same sparsity", f"{results[key]:.5g}", params)
    return table


@app.command()
def report(
    profile: Path = typer.Option(Path("profile.json")),
    plan: Path | None = typer.Option(None, help="mark this plan's levels on the curves"),
    out: Path = typer.Option(Path("report")),
) -> None:
    """Plot sensitivity curves and a heatmap from a profile, and print its table."""
    from .plan import Plan
    from .plan_check import PlanCheck
    from .profile import Profile
    from .report import plan_table, profile_table, write_report

    try:
        check_output_folder(out, "--out")
        loaded_profile = Profile.load(profile)
        loaded_plan = Plan.load(plan) if plan else None
        if loaded_plan is not None:
            loaded_plan.check_profile(loaded_profile)
        recorded = PlanCheck.from_details(loaded_plan) if loaded_plan else None
        written = write_report(loaded_profile, out, loaded_plan)
    except PrunescopeError as error:
        _fail(error)
    console.print(profile_table(loaded_profile))
    if loaded_plan:
        console.print(plan_table(loaded_plan))
        _echo("plan check: " + (recorded.line() + f" ({loaded_plan.details['check'].get('data', '')})" if recorded
                                else "none recorded (prunescope plan --plan FILE --model M --check measures it)"))
    _echo("wrote " + ", ".join(str(p) for p in written))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out")),
    epochs: int = typer.Option(30, help="training epochs of the digits CNN"),
    sparsity: float = typer.Option(0.8, help="fraction of prunable weights to remove"),
    levels: str = typer.Option("0.1:0.9:0.1"),
) -> None:
    """Train a CNN on sklearn digits, scan it, plan 80% sparsity, apply, evaluate, and plot."""
    from .demo import run_demo
    from .levels import parse_levels_text

    try:
        run_demo(out, epochs=epochs, sparsity=sparsity, levels=tuple(parse_levels_text(levels)), console=console)
    except PrunescopeError as error:
        _fail(error)


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
