"""The command line's plan makers: ``prunescope plan`` (allocate, or check a plan file) and ``prunescope
search``. They parse and print; :mod:`prunescope.plan_runs` does the work."""

from __future__ import annotations

from pathlib import Path

import typer

from . import cli_options as options
from .checks import whole_number
from .cli_console import DATA_HELP, MODEL_HELP, console, echo, fail
from .errors import PrunescopeError
from .outputs import check_output_file

CHECK_HELP = ("apply the plan as it will be applied (wanda/sparsegpt: calibrated block by block) and measure its drop on "
              "held-apart data against the prediction; the check is written into the plan's details.check")
METRIC_HELP = "--check's metric (default: the profile's, so predicted/measured compares like with like)"


def plan(
    profile: Path = typer.Option(Path("profile.json"), help="profile from `prunescope scan`"),
    sparsity: float | None = typer.Option(None, help="fraction of the scanned layers' parameters to remove, in (0, 1)"),
    params: float | None = typer.Option(None, help="or: fraction of all the model's parameters to remove"),
    flops: float | None = typer.Option(None, help="or: fraction of the model's Conv/Linear FLOPs to remove"),
    method: str | None = typer.Option(None, help="threshold (default) | uniform | global_magnitude | knapsack | owl | erk | lamp"),
    model: str | None = typer.Option(None, help="needed by global_magnitude, lamp, owl and --check (erk checks its shapes): " + MODEL_HELP),
    data: str | None = typer.Option(None, help="owl's calibration and --check's evaluation: " + DATA_HELP
                                    + " (default: pydoc for models with a tokenizer, digits for digits-cnn)"),
    calibration_samples: int = typer.Option(32, help="owl and --check of wanda/sparsegpt plans: calibration windows from the start of the text's first half (digits: training images)"),
    owl_m: float | None = typer.Option(None, help="owl: an outlier is above this multiple of its block's mean (default 5)"),
    owl_lambda: float | None = typer.Option(None, help="owl: half the spread of the block densities, in [0, 0.5] (default 0.08)"),
    grid_step: float | None = typer.Option(None, help="knapsack: the step of its level grid (default: the method's)"),
    check: bool = typer.Option(False, help=CHECK_HELP),
    plan_file: Path | None = typer.Option(None, "--plan", help="with --check: check this plan file (the check is written into it) instead of allocating one"),
    metric: str | None = typer.Option(None, help=METRIC_HELP),
    samples: int | None = typer.Option(None, help="--check: evaluation images, or token windows from the text's second half (default 4)"),
    batch_size: int | None = typer.Option(None),
    seq_len: int = typer.Option(512, help="tokens per window for text data"),
    first_window: int | None = typer.Option(None, help="--check on text: the first evaluation window (default: the first of the second half)"),
    split: str = typer.Option("test", help="--check on digits: the evaluation split, val | test"),
    out: Path = typer.Option(Path("plan.json")),
) -> None:
    """Turn a profile into a plan that meets a budget, and with --check measure the plan's drop."""
    from .plan import Budget
    from .plan_runs import check_plan_file, make_plan
    from .report import plan_table
    from .runs import DataOptions

    try:  # every option before the model loads
        whole_number(calibration_samples, "--calibration-samples")
        options.check_data_options(samples, batch_size, seq_len, first_window, split, metric)
        options.check_data_spec(data)
        data_options = DataOptions(data, metric, samples, calibration_samples, batch_size, seq_len, first_window, split)
        if plan_file is not None:
            allocating = [name for name, value in (("--sparsity", sparsity), ("--params", params), ("--flops", flops),
                                                   ("--method", method), ("--owl-m", owl_m), ("--owl-lambda", owl_lambda),
                                                   ("--grid-step", grid_step)) if value is not None]
            if allocating or not check:
                raise PrunescopeError(f"--plan checks an existing plan: it goes with --check and takes no {', '.join(allocating) or 'budget'}")
            check_output_file(plan_file, "--plan")
            run = check_plan_file(plan_file, model, data_options, tell=echo)
            out = plan_file
        else:
            check_output_file(out, "--out")
            run = make_plan(profile, Budget(sparsity, params=params, flops=flops), method or "threshold", model_spec=model,
                            data=data_options, check=check, owl_m=owl_m, owl_lambda=owl_lambda, grid_step=grid_step, tell=echo)
        run.plan.save(out)
    except PrunescopeError as error:
        fail(error)
    result = run.plan
    console.print(plan_table(result))
    predicted = "" if result.predicted_drop is None else f"; predicted {result.metric} drop (additive) {result.predicted_drop:.4g}"
    costs = ""
    if "params_after" in result.details:
        d = result.details
        costs = f"; parameters {d['params_dense']:,.0f} -> {d['params_after']:,.0f}"
        if "flops_after" in d:
            costs += f", FLOPs/sample {d['flops_dense']:.3g} -> {d['flops_after']:.3g}"
    if run.check is not None:
        echo(f"check: {run.check.line()}")
    echo(f"wrote {out}: {result.sparsity:.2%} of the scanned parameters{costs}{predicted}")


def search(
    profile: Path = typer.Option(Path("profile.json"), help="a weight profile of wanda, sparsegpt or magnitude (`prunescope scan --criterion sparsegpt`)"),
    sparsity: float | None = typer.Option(None, help="fraction of the profile's weights to remove, on the level grid (required)"),
    model: str | None = typer.Option(None, help="the profile's language model, with its tokenizer (required): hf:PATH | smollm2"),
    data: str | None = typer.Option(None, help="text: pydoc (default) | text:FILE"),
    calibration_samples: int = typer.Option(32, help="calibration windows from the start of the text's first half"),
    fitness_samples: int = typer.Option(4, help="fitness windows (KL to the dense model) after the calibration windows, in the first half"),
    levels: str | None = typer.Option(None, help="the level grid, ascending and equally spaced (0.4,0.5,0.6,0.7; default: the profile's levels)"),
    start: str = typer.Option("profile", help="profile (the profile's best additive plan on the grid) | uniform"),
    evaluations: int | None = typer.Option(None, help="stop before passing this many candidate evaluations (this or --seconds is required)"),
    seconds: float | None = typer.Option(None, help="stop before passing this wall time (all runs of a --state together)"),
    state: Path | None = typer.Option(None, help="JSON file saved after every generation; re-run with it to resume"),
    seed: int = typer.Option(0),
    offspring: int = typer.Option(8, help="candidates per generation"),
    survivors: int = typer.Option(2, help="candidates re-measured on every fitness window after screening"),
    screen: int = typer.Option(1, help="fitness windows a candidate is screened on"),
    check: bool = typer.Option(False, help=CHECK_HELP + " (text's second half)"),
    metric: str | None = typer.Option(None, help=METRIC_HELP),
    samples: int | None = typer.Option(None, help="--check: evaluation windows from the text's second half (default 4)"),
    batch_size: int | None = typer.Option(None, help="windows per batch (default 1)"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    first_window: int | None = typer.Option(None, help="--check: the first evaluation window (default: the first of the second half)"),
    out: Path = typer.Option(Path("plan.json")),
) -> None:
    """Search per-layer levels by the measured KL of whole pruned models (EvoPress-style), warm-started from a profile."""
    from .levels import parse_levels_text
    from .plan_runs import run_search, search_summary
    from .report import plan_table
    from .runs import DataOptions

    try:  # every option before the model loads
        if sparsity is None:
            raise PrunescopeError("--sparsity is required: the fraction of the profile's weights to remove, in (0, 1)")
        if model is None:
            raise PrunescopeError("--model is required: the language model the profile was scanned on (hf:PATH, smollm2, ...)")
        whole_number(calibration_samples, "--calibration-samples")
        options.check_data_options(samples, batch_size, seq_len, first_window, "val", metric)
        options.check_data_spec(data)
        check_output_file(out, "--out")
        if state is not None:
            check_output_file(state, "--state")
        grid = parse_levels_text(levels) if levels is not None else None
        run = run_search(profile, sparsity, model, DataOptions(data, metric, samples, calibration_samples, batch_size, seq_len,
                                                               first_window), fitness_samples=fitness_samples, levels=grid,
                         start=start, offspring=offspring, survivors=survivors, screen=screen, evaluations=evaluations,
                         seconds=seconds, state=state, seed=seed, check=check, tell=echo)
        run.plan.save(out)
    except PrunescopeError as error:
        fail(error)
    console.print(plan_table(run.plan))
    if run.resumed_from is not None:
        echo(f"resumed the search in {state} from generation {run.resumed_from} (of {run.plan.details['generations']})")
    echo(search_summary(run))
    if run.check is not None:
        echo(f"check: {run.check.line()}")
    echo(f"wrote {out}: {run.plan.sparsity:.2%} of the profile's weights")
