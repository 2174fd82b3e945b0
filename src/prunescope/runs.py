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


@dataclass(frozen=True)
class DataOptions:
    """The command line's data options: the spec (None: the model's default) and how it is cut into
    batches (``samples`` evaluation images or windows, ``calibration_samples`` calibration ones)."""

    spec: str | None = None
    metric: str | None = None
    samples: int | None = None
    calibration_samples: int = 32
    batch_size: int | None = None
    seq_len: int = 512
    first_window: int | None = None
    split: str = "val"


@dataclass
class HeldApart:
    """An evaluator on data held apart from the ``calibration`` batches, and what both are."""

    evaluator: Evaluator
    calibration: list[Any]
    description: str


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


def held_apart(loaded: LoadedModel, data: DataOptions, *, calibrated: bool = True) -> HeldApart:
    """Calibration batches and, apart from them, an evaluator (see :func:`prunescope.data.oneshot_data`:
    text: calibration from the start of the first half, evaluation from the second; digits: training
    images and ``data.split``). Without a data spec: a python factory's evaluator (calibration on the
    same batches), else pydoc for a model with a tokenizer and digits for digits-cnn.
    ``calibrated`` says whether the calibration is used (it is then named in the description)."""
    from .data import oneshot_data

    if data.spec is None and loaded.evaluator is not None:
        evaluator = loaded.evaluator
        if data.metric is not None and data.metric != evaluator.metric.name:
            evaluator = Evaluator(loaded.model, evaluator.batches, data.metric)
        return HeldApart(evaluator, evaluator.batches, "the python factory's evaluator" + (
            "; calibration on the same batches" if calibrated else ""))
    spec = data.spec or ("pydoc" if loaded.tokenizer is not None else "digits" if loaded.spec == "digits-cnn" else None)
    if spec is None:
        raise PrunescopeError(f"--data is required for model {loaded.spec!r}; accepted: {DATA_SPECS}")
    calibration, held_out = oneshot_data(spec, loaded, calibration_samples=data.calibration_samples, samples=data.samples,
                                         batch_size=data.batch_size, seq_len=data.seq_len, first_window=data.first_window,
                                         split=data.split)
    evaluator = Evaluator(loaded.model, held_out.batches, data.metric or held_out.metric)
    described = f"evaluation on {held_out.description}" + (f"; calibration on {calibration.description}" if calibrated else "")
    return HeldApart(evaluator, calibration.batches, described)


def plan_inputs(model_spec: str, plan: Plan, data: DataOptions) -> tuple[Inputs, list[Any] | None]:
    """The model, the evaluator (where there is data) and the calibration batches (None unless the plan's
    criterion calibrates) that ``plan`` is pruned and evaluated with. A Wanda or SparseGPT plan is
    calibrated and evaluated on data held apart, as ``prune --level`` is (data defaults as there)."""
    from .criteria import is_calibrated

    if not is_calibrated(plan.criterion):
        if data.spec is None:
            return Inputs(load_model(model_spec, progress=True), None, "", 0.0), None
        return load_inputs(model_spec, data.spec, samples=data.samples, batch_size=data.batch_size, seq_len=data.seq_len,
                           first_window=data.first_window or 0, split=data.split, metric=data.metric), None
    started = time.perf_counter()
    loaded = load_model(model_spec, progress=True)
    held = held_apart(loaded, data)
    return Inputs(loaded, held.evaluator, held.description, time.perf_counter() - started), held.calibration


def prune_by_plan(inputs: Inputs, plan: Plan, *, shrink: bool = False, compare_uniform: bool = False,
                  export_format: str | None = None, calibration: list[Any] | None = None) -> PruneRun:
    """Apply ``plan`` to the loaded model (and, with ``compare_uniform``, a uniform plan at the same
    sparsity) and evaluate dense, pruned and uniform where ``inputs`` has an evaluator; a pruned
    model that ``export_format`` cannot hold is refused before the evaluations. ``calibration``:
    the batches a Wanda or SparseGPT plan is applied with (see :func:`plan_inputs`)."""
    from .apply import apply

    loaded, evaluator = inputs.loaded, inputs.evaluator
    example = evaluator.batches[0] if evaluator is not None else None
    if plan.granularity == "channel" and example is None:
        raise PrunescopeError("a channel plan traces the model: give --data")
    example = example[0] if isinstance(example, (tuple, list)) else example
    pruned = apply(loaded.model, plan, shrink=shrink, example=example, calibration=calibration, progress=True)
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
            uniform = apply(loaded.model, plan.uniform(), shrink=shrink, example=example, calibration=calibration, progress=True)
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
    from .levels import parse_level
    from .oneshot import prune_oneshot

    parsed = parse_level(level)
    check_criterion(criterion, "weight", oneshot=True)
    started = time.perf_counter()
    loaded = load_model(model_spec, progress=True)
    _check_export(loaded.model, export_format, loaded, None)
    data = DataOptions(data_spec, metric, samples, calibration_samples, batch_size, seq_len, first_window, split)
    held = held_apart(loaded, data, calibrated=is_calibrated(criterion))
    evaluator, calibration, described = held.evaluator, held.calibration, held.description
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
