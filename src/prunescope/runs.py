"""What the command line does beyond parsing and printing, as plain functions: load a model and its
data from spec strings, prune by a plan or in one shot and evaluate dense against pruned, and
write the pruned model's folder. ``prunescope.cli`` calls these and prints what they return."""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import PrunescopeError
from .evaluator import Evaluator
from .models import LoadedModel, load_model
from .plan import Plan
from .profile import Profile
from .structured import nonzero_parameters

DATA_SPECS = "digits | pydoc | text:FILE | random:C,H,W"


@dataclass
class Inputs:
    """A loaded model with the evaluator of its data; ``description`` says what the data is."""

    loaded: LoadedModel
    evaluator: Evaluator | None
    description: str
    seconds: float


@dataclass
class PruneRun:
    """A pruned model with the plan it amounts to and the figures of dense against pruned
    (``results``: metric values, non-zero parameters, seconds; what ``summary.json`` records)."""

    pruned: nn.Module
    plan: Plan
    loaded: LoadedModel
    results: dict[str, Any]
    title: str
    example: Any = None
    notes: list[str] = field(default_factory=list)


def load_inputs(model_spec: str, data_spec: str | None, *, samples: int | None = None, batch_size: int | None = None,
                seq_len: int = 512, first_window: int = 0, split: str = "val", metric: str | None = None) -> Inputs:
    """The model of ``model_spec`` and an Evaluator on ``data_spec`` (digits-cnn defaults to digits; a
    python factory may bring its own evaluator)."""
    from .data import load_data

    started = time.perf_counter()
    loaded = load_model(model_spec, progress=True)
    if loaded.evaluator is not None and data_spec is None:
        return Inputs(loaded, loaded.evaluator, "evaluator from the python factory", time.perf_counter() - started)
    data_spec = data_spec or ("digits" if model_spec == "digits-cnn" else None)
    if data_spec is None:
        raise PrunescopeError(f"--data is required for model {model_spec!r}; accepted: {DATA_SPECS}")
    data = load_data(data_spec, loaded, samples=samples, batch_size=batch_size, seq_len=seq_len, first_window=first_window,
                     split=split)
    evaluator = Evaluator(loaded.model, data.batches, metric or data.metric)
    return Inputs(loaded, evaluator, data.description, time.perf_counter() - started)


def save_profile(profile: Profile, out: Path) -> None:
    """Write ``out`` (.json or .csv) and, beside a .json, its .csv twin."""
    profile.save(out)
    if out.suffix == ".json":
        profile.save(out.with_suffix(".csv"))


def prune_by_plan(inputs: Inputs, plan: Plan, *, shrink: bool = False, compare_uniform: bool = False,
                  export_format: str | None = None) -> PruneRun:
    """Apply ``plan`` to the loaded model (and, with ``compare_uniform``, a uniform plan at the same
    sparsity) and evaluate dense, pruned and uniform where ``inputs`` has an evaluator; a pruned
    model that ``export_format`` cannot hold is refused before the evaluations."""
    from .apply import apply

    loaded, evaluator = inputs.loaded, inputs.evaluator
    example = evaluator.batches[0] if evaluator is not None else None
    if plan.granularity == "channel" and example is None:
        raise PrunescopeError("a channel plan traces the model: give --data")
    example = example[0] if isinstance(example, (tuple, list)) else example
    pruned = apply(loaded.model, plan, shrink=shrink, example=example)
    _check_export(pruned, export_format, loaded, example)
    results = {"plan_sparsity": plan.sparsity, "method": plan.method, "shrink": shrink,
               "params_dense": nonzero_parameters(loaded.model)}
    notes = []
    if evaluator is not None:
        started = time.perf_counter()
        results["dense"] = evaluator.evaluate(progress=True).value
        results["pruned"] = evaluator.evaluate(pruned, progress=True).value
        if compare_uniform and plan.granularity == "block":
            notes.append("no uniform comparison for blocks: a block is kept or removed whole")
        elif compare_uniform:
            uniform = apply(loaded.model, plan.uniform(), shrink=shrink, example=example)
            results["uniform"] = evaluator.evaluate(uniform, progress=True).value
        results["metric"] = evaluator.metric.name
        results["eval_seconds"] = time.perf_counter() - started
    words = {"sparsity": "of the scanned parameters", "params": "of all parameters", "flops": "of the FLOPs"}
    budget = plan.budget
    asked = f"budget: {budget.fraction:.0%} {words[budget.kind]}" if budget else f"{plan.sparsity:.1%} of the scanned parameters"
    title = f"{loaded.spec} pruned by a {plan.method} plan ({asked}){', shrunk' if shrink else ''}"
    return PruneRun(pruned, plan, loaded, results, title, example, notes)


def prune_in_one_shot(model_spec: str, level: str, criterion: str, data_spec: str | None, *, metric: str | None = None,
                      samples: int | None = None, calibration_samples: int = 32, batch_size: int | None = None,
                      seq_len: int = 512, first_window: int | None = None, split: str = "val",
                      include: list[str] | None = None, exclude: list[str] | None = None,
                      export_format: str | None = None) -> PruneRun:
    """Load, calibrate apart from the evaluation data, evaluate dense, prune in place, evaluate pruned
    (a model that ``export_format`` cannot hold is refused as soon as it is loaded)."""
    from .criteria import check_criterion, is_calibrated
    from .data import oneshot_data
    from .levels import parse_level
    from .oneshot import prune_oneshot

    parsed = parse_level(level)
    check_criterion(criterion, "weight", oneshot=True)
    started = time.perf_counter()
    loaded = load_model(model_spec, progress=True)
    _check_export(loaded.model, export_format, loaded, None)
    if data_spec is None and loaded.evaluator is not None:
        evaluator, calibration = loaded.evaluator, loaded.evaluator.batches
        described = "the python factory's evaluator; calibration on the same batches"
    else:
        data_spec = data_spec or ("pydoc" if loaded.tokenizer is not None else "digits" if model_spec == "digits-cnn" else None)
        if data_spec is None:
            raise PrunescopeError(f"--data is required for model {model_spec!r}; accepted: {DATA_SPECS}")
        calibration_data, held_out = oneshot_data(data_spec, loaded, calibration_samples=calibration_samples, samples=samples,
                                                  batch_size=batch_size, seq_len=seq_len, first_window=first_window, split=split)
        evaluator, calibration = Evaluator(loaded.model, held_out.batches, metric or held_out.metric), calibration_data.batches
        described = f"evaluation on {held_out.description}" + (
            f"; calibration on {calibration_data.description}" if is_calibrated(criterion) else "")
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    dense = evaluator.dense.value  # before pruning in place (also fixes the reference outputs of kl/cosine)
    params_dense = nonzero_parameters(loaded.model)
    eval_seconds = time.perf_counter() - started
    pruned = prune_oneshot(loaded.model, calibration, criterion=criterion, level=parsed, include=include, exclude=exclude,
                           inplace=True, progress=True)
    report = pruned.prunescope_report
    started = time.perf_counter()
    value = evaluator.evaluate(pruned, progress=True).value
    eval_seconds += time.perf_counter() - started
    plan = report.to_plan(data=described)
    results = {"plan_sparsity": plan.sparsity, "method": "oneshot", "criterion": criterion, "level": level, "shrink": False,
               "params_dense": params_dense, "dense": dense, "pruned": value, "metric": evaluator.metric.name,
               "load_seconds": load_seconds, "eval_seconds": eval_seconds, "prune_seconds": report.seconds,
               "data": described, "layers": [asdict(layer) for layer in report.layers]}
    batch = evaluator.batches[0]
    example = batch[0] if isinstance(batch, (tuple, list)) else batch
    title = f"{model_spec} pruned in one shot by {criterion} at level {level}"
    return PruneRun(pruned, plan, loaded, results, title, example, [f"{model_spec}: {described}"])


def _save_arguments(model: nn.Module, export_format: str | None, loaded: LoadedModel, example: Any) -> dict[str, Any]:
    """The format (default: hf for Hugging Face models, prunescope otherwise), example batch and origin
    :func:`prunescope.save` gets for ``model``."""
    from .export import default_format
    from .export.onnx_file import default_example
    from .export.spec_folder import origin_of_spec

    chosen = export_format or default_format(model)
    if chosen == "onnx" and example is None:
        example = default_example(model, loaded.input_shape)
    return {"format": chosen, "example": example, "origin": origin_of_spec(loaded.spec)}


def _check_export(model: nn.Module, export_format: str | None, loaded: LoadedModel, example: Any) -> None:
    """Refuse now a model the chosen format cannot hold, not after the pruning and evaluations."""
    from .export import check_format

    check_format(model, **_save_arguments(model, export_format, loaded, example))


def write_pruned(run: PruneRun, out: Path, export_format: str | None = None) -> dict[str, Any]:
    """Save the pruned model with :func:`prunescope.save` in ``export_format`` (default: hf for Hugging
    Face models, prunescope otherwise), then plan.json and summary.json beside it; returns the summary."""
    from .atomic import write_text_atomic
    from .export import read_manifest, save
    from .jsonfile import strict_json

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are in the manifest, which the CLI prints
        save(run.pruned, out, tokenizer=run.loaded.tokenizer, **_save_arguments(run.pruned, export_format, run.loaded, run.example))
    results = {**run.results, "export": read_manifest(out), "params_pruned": nonzero_parameters(run.pruned)}
    run.plan.save(out / "plan.json")
    write_text_atomic(out / "summary.json", strict_json(results, indent=1))
    return results
