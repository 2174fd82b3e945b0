"""What ``prunescope plan`` and ``prunescope search`` do beyond parsing and printing: allocate a plan
(loading the model and calibration data only for the methods that need them), search one, and check
a plan by applying it and measuring its drop on held-apart data, the check kept in the plan's
``details["check"]``. Every argument is checked before the model loads."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .criteria import is_calibrated
from .errors import PrunescopeError
from .models import LoadedModel, load_model
from .plan import Budget, Plan
from .plan_check import PlanCheck
from .profile import Profile
from .runs import DataOptions, HeldApart, held_apart

Tell = Callable[[str], None]
"""Where a run says what it loaded, as it goes (the command line prints it)."""


def _silent(line: str) -> None:
    """A :data:`Tell` that says nothing."""


MODEL_METHODS = ("global_magnitude", "lamp", "owl")
"""Methods that read the model's weights (``erk`` checks the model's shapes when one is given)."""


@dataclass
class PlanRun:
    """A plan and its check when one was asked for."""

    plan: Plan
    check: PlanCheck | None = None


@dataclass
class SearchRun(PlanRun):
    """A searched plan; ``resumed_from``: the generation the state file held when the search started (None: a new search)."""

    resumed_from: int | None = None


def check_method_options(method: str, *, model_spec: str | None, check: bool, owl_m: float | None,
                         owl_lambda: float | None, grid_step: float | None) -> None:
    """``plan``'s --method with the options that go with it, refused before anything is read."""
    from .allocate import METHODS
    from .allocate_knapsack import check_grid_step
    from .baselines import owl_options

    if method not in METHODS:
        raise PrunescopeError(f"unknown --method {method!r}; accepted: {', '.join(METHODS)}")
    if (method in MODEL_METHODS or check) and model_spec is None:
        raise PrunescopeError(f"{'--check' if check else f'--method {method}'} needs --model (it reads the model's weights)")
    if method == "owl":
        owl_options(owl_m, owl_lambda)
    elif owl_m is not None or owl_lambda is not None:
        raise PrunescopeError(f"--owl-m and --owl-lambda go with --method owl; the method is {method!r}")
    check_grid_step(grid_step, method)


def _check_allocation(profile: Profile, budget: Budget, method: str) -> None:
    """What allocate would refuse only after the model loads: a model method's profile and budget."""
    if method in (*MODEL_METHODS, "erk"):
        if profile.granularity != "weight":
            raise PrunescopeError(f"--method {method} sets levels of weight tensors; this profile's targets are {profile.granularity} "
                                  "groups (accepted: methods threshold, uniform)")
        if budget.kind != "sparsity":
            raise PrunescopeError(f"--method {method} meets a --sparsity budget only; got --{budget.kind}")


def make_plan(profile_path: Path, budget: Budget, method: str, *, model_spec: str | None, data: DataOptions,
              check: bool = False, owl_m: float | None = None, owl_lambda: float | None = None,
              grid_step: float | None = None, tell: Tell = _silent) -> PlanRun:
    """Allocate a plan from the profile in ``profile_path`` by ``method`` (see :func:`prunescope.allocate`),
    loading the model when the method reads it or ``check`` asks, and data when ``owl`` needs calibration
    batches or ``check`` an evaluation (see :func:`checked`). ``grid_step`` is passed on only when given;
    ``tell`` gets a line on what was loaded as soon as it is."""
    from .allocate import allocate

    check_method_options(method, model_spec=model_spec, check=check, owl_m=owl_m, owl_lambda=owl_lambda, grid_step=grid_step)
    profile = Profile.load(profile_path)
    _check_allocation(profile, budget, method)
    loaded, held = None, None
    if method in MODEL_METHODS or check or (method == "erk" and model_spec is not None):
        loaded = _load(model_spec, tell)
    if method == "owl" or check:
        calibrated = method == "owl" or is_calibrated(profile.criterion)
        held = held_apart(loaded, replace(data, metric=data.metric or profile.metric), calibrated=calibrated)
        tell(f"data: {held.description}")
    extra = {"grid_step": grid_step} if grid_step is not None else {}
    if method == "owl":
        extra.update(calibration=held.calibration, owl_m=owl_m, owl_lambda=owl_lambda)
    plan = allocate(profile, budget, method=method, model=None if loaded is None else loaded.model, **extra)
    return PlanRun(plan, checked(loaded, plan, held) if check else None)


def check_plan_file(plan_path: Path, model_spec: str | None, data: DataOptions, *, tell: Tell = _silent) -> PlanRun:
    """The plan in ``plan_path`` with its check (see :func:`checked`); the caller saves it."""
    if model_spec is None:
        raise PrunescopeError("--check needs --model (the plan is applied to it)")
    plan = Plan.load(plan_path)
    loaded = _load(model_spec, tell)
    held = held_apart(loaded, replace(data, metric=data.metric or plan.metric), calibrated=is_calibrated(plan.criterion))
    tell(f"data: {held.description}")
    return PlanRun(plan, checked(loaded, plan, held))


def checked(loaded: LoadedModel, plan: Plan, held: HeldApart) -> PlanCheck:
    """Apply ``plan`` to ``loaded.model`` as it will be applied (a Wanda or SparseGPT plan block by block
    on ``held.calibration``), measure it on ``held.evaluator`` (see :func:`prunescope.plan_check.check_pruned`)
    and record the check, with the data it was measured on, in ``plan.details["check"]``."""
    from .apply import apply
    from .plan_check import check_pruned

    started = time.perf_counter()
    batch = held.evaluator.batches[0]
    example = batch[0] if isinstance(batch, (tuple, list)) else batch
    calibration = held.calibration if is_calibrated(plan.criterion) else None
    pruned = apply(loaded.model, plan, example=example, calibration=calibration, progress=True)
    result = check_pruned(pruned, plan, held.evaluator, started=started)
    plan.details["check"] = {**result.to_dict(), "data": held.description}
    return result


def run_search(profile_path: Path, sparsity: float, model_spec: str, data: DataOptions, *, fitness_samples: int,
               levels: list | None, start: str, offspring: int, survivors: int, screen: int, evaluations: int | None,
               seconds: float | None, state: Path | None, seed: int, check: bool = False, tell: Tell = _silent) -> SearchRun:
    """:func:`prunescope.search` from the profile in ``profile_path`` on text data (see
    :func:`prunescope.data.search_data`: calibration, then fitness windows in the text's first half,
    the check's evaluation in its second), resuming from ``state`` when it exists."""
    from .checks import whole_number
    from .data import is_text_spec, search_data
    from .evaluator import Evaluator
    from .search import check_search, search

    spec = data.spec or "pydoc"
    if not is_text_spec(spec):
        raise PrunescopeError(f"search measures a language model on text: --data pydoc or text:FILE; got {spec!r}")
    whole_number(fitness_samples, "--fitness-samples")
    whole_number(seed, "--seed", 0)
    profile, budget = Profile.load(profile_path), Budget(sparsity)
    check_search(profile, budget, levels=levels, start=start, offspring=offspring, survivors=survivors, screen=screen,
                 evaluations=evaluations, seconds=seconds)
    resumed_from = _saved_generation(state)
    loaded = _load(model_spec, tell)
    calibration, fitness, held_out = search_data(spec, loaded, calibration_samples=data.calibration_samples,
                                                 fitness_samples=fitness_samples, samples=data.samples,
                                                 batch_size=data.batch_size, seq_len=data.seq_len, first_window=data.first_window)
    tell(f"calibration on {calibration.description}; fitness on {fitness.description}")
    if resumed_from is not None:
        tell(f"resuming the search in {state} (generation {resumed_from})")
    plan = search(profile, budget, loaded.model, fitness=fitness.batches,
                  calibration=calibration.batches if is_calibrated(profile.criterion) else None, levels=levels, start=start,
                  offspring=offspring, survivors=survivors, screen=screen, evaluations=evaluations, seconds=seconds,
                  state=state, seed=seed, progress=True)
    result = None
    if check:
        metric = data.metric or plan.metric or held_out.metric
        held = HeldApart(Evaluator(loaded.model, held_out.batches, metric), calibration.batches,
                         f"evaluation on {held_out.description}; calibration on {calibration.description}")
        result = checked(loaded, plan, held)
    return SearchRun(plan, result, resumed_from)


def _load(model_spec: str, tell: Tell) -> LoadedModel:
    started = time.perf_counter()
    loaded = load_model(model_spec, progress=True)
    tell(f"model {model_spec} loaded in {time.perf_counter() - started:.1f}s")
    return loaded


def _saved_generation(state: Path | None) -> int | None:
    """The generation a search state file holds (None: no file; the search itself checks the file)."""
    if state is None or not state.is_file():
        return None
    try:
        saved = json.loads(state.read_text()).get("generation")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if isinstance(saved, int) else None


def search_summary(run: SearchRun) -> str:
    """One line: the fitness from start to end, generations, evaluations, seconds and the variant bank."""
    d = run.plan.details
    return (f"search from the {d['start']} start: fitness (KL to dense, nats/token) {d['fitness_start']:.4g} -> {d['fitness_end']:.4g} "
            f"in {d['generations']} generations, {d['evaluations']} evaluations, {d['seconds']:.1f}s; "
            + (f"variant bank {d['bank_bytes'] / 2**20:.1f} MiB built in {d['bank_seconds']:.1f}s" if d["bank_bytes"] is not None
               else "finished before: read back from the state file, no variant bank built"))
