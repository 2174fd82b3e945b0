"""``search``: per-layer levels chosen by measuring whole plans, warm-started from a profile."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import whole_number, whole_numbers
from ..curves import interp_drop, monotone_curve, predicted_drop
from ..errors import PrunescopeError
from ..evaluator import Evaluator
from ..execution import check_execution
from ..fingerprint import model_fingerprint
from ..identity import ScanIdentity
from ..jsonfile import strict_json
from ..oneshot.bank import DEFAULT_MAX_BYTES, VariantBank, build_variant_bank
from ..oneshot.dense_stats import batches_fingerprint
from ..plan import Budget, Plan
from ..profile import Profile
from .evolution import Selection, another_generation, evolve
from .measure import Measure, Working
from .space import LevelSpace
from .state import SearchState

STARTS = ("profile", "uniform")


def search(
    profile: Profile,
    budget: Budget | float,
    model: torch.nn.Module,
    *,
    fitness: Iterable[Any],
    calibration: Iterable[Any] | None = None,
    levels: Sequence[float] | None = None,
    start: str = "profile",
    offspring: int = 8,
    survivors: int = 2,
    screen: int = 1,
    evaluations: int | None = None,
    seconds: float | None = None,
    state: str | Path | None = None,
    seed: int = 0,
    bank: VariantBank | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    workers: int | None = None,
    executor: str = "local",
    progress: bool = False,
) -> Plan:
    """Search per-layer levels meeting ``budget`` exactly by the KL of whole pruned models to the dense one.

    Args:
        profile: a weight-granularity profile of a one-shot criterion (sparsegpt, wanda, magnitude):
            its targets are the layers searched, its criterion prunes them, its curves give the start.
        budget: a sparsity budget (fraction of the profile's weights removed) on the level grid.
        model: the dense model (left bit-identical: candidates run on a copy).
        fitness: batches the fitness is measured on (KL(dense || candidate), nats, token mean);
            calibration data, never the held-out set.
        calibration: batches for the criterion's input statistics (sparsegpt, wanda).
        levels: the grid of levels a layer may take (ascending, equally spaced; default: the
            profile's scanned levels). Every layer at every level is pruned once into a bank.
        start: ``"profile"`` (the exact knapsack optimum of the profile's additive prediction on the
            grid) or ``"uniform"`` (every layer at the budget: the cold start).
        offspring, survivors, screen: candidates per generation, how many of them are re-measured on
            all fitness batches after screening on ``screen`` random ones.
        evaluations, seconds: stop before the generation that would pass either (one is required).
        state: a JSON file saved after every generation; a re-run with it resumes.
        bank: a variant bank built before (its levels must include the grid), to share between searches.
        max_bytes: refuse a variant bank larger than this many bytes.
        workers, executor: measure each generation's candidates on ``workers`` processes (``"local"``:
            this one and ``workers - 1`` fresh ones, the torch threads split between them) or on this
            process and ``workers - 1`` Ray actors (``"ray"``); each holds a copy of the model and the bank.

    Returns a Plan (method ``"search"``) whose ``details`` hold the fitness of the start and the end,
    the evaluations and seconds spent, the history per generation and the bank's size and build time.
    """
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    criterion, space = check_search(profile, budget, levels=levels, start=start, offspring=offspring, survivors=survivors,
                                    screen=screen, evaluations=evaluations, seconds=seconds)
    check_execution(workers, executor)
    if executor == "ray" and (workers or 1) < 2:
        raise PrunescopeError("executor 'ray' measures candidates on workers - 1 Ray actors beside this process: give workers >= 2")
    targets = profile.targets
    for target in targets:
        try:
            weight = model.get_submodule(target.name).weight
        except AttributeError:
            raise PrunescopeError(f"the profile's target {target.name!r} is not a layer of this model: the profile is of another model") from None
        if weight.numel() != target.params:
            raise PrunescopeError(f"{target.name} has {weight.numel()} weights but the profile says {target.params}: another model")
    grid = space.levels
    fitness_batches = list(fitness)
    evaluator = Evaluator(model, fitness_batches, "kl")
    calibration = None if calibration is None else list(calibration)
    identity = _identity(profile, budget, model, evaluator, calibration, grid, start, offspring, survivors, screen, seed)
    path = Path(state) if state is not None else None
    current = SearchState.load(path, identity) if path is not None and path.exists() else None
    if current is None:
        first = space.best_start(_grid_drops(profile, space), budget.fraction) if start == "profile" else space.uniform(budget.fraction)
    else:
        first = tuple(current.parent)
    space.mutate(first, random.Random(seed))  # refuses, before any work, layers with no budget-preserving move
    selection = Selection(offspring, survivors, screen, len(fitness_batches))
    if current is not None and not another_generation(current, selection, evaluations, seconds, current.seconds):  # finished: no bank needed
        return _plan(profile, budget, criterion, space, current, selection, start, None, None)
    if bank is not None:
        _check_bank(bank, criterion, space)
    else:
        bank = build_variant_bank(model, calibration, space.names, grid, criterion=criterion, progress=progress,
                                  max_bytes=max_bytes, **ScanIdentity.of_profile(profile).options)
    working = Working(model, bank)
    measure = Measure(working, space, evaluator)
    with torch.no_grad():
        if current is None:
            current = SearchState(identity, list(first), measure([first], range(len(fitness_batches)), record=True)[0], evaluations=1)
            current.keep_random(random.Random(seed))
            current.history.append({"generation": 0, "evaluations": 1, "seconds": 0.0, "fitness": current.fitness})
            if path is not None:
                current.save(path)
        else:  # resumed: record the parent's block outputs again (the same numbers; not counted as an evaluation)
            measure([tuple(current.parent)], range(len(fitness_batches)), record=True)
        measure.adopt(tuple(current.parent))
        pool = None
        if (workers or 1) > 1:
            from .pool import CandidatePool

            pool = CandidatePool(measure, model, bank, space, fitness_batches, workers, executor)
        try:
            current = evolve(space, current, pool or measure, selection, evaluations=evaluations, seconds=seconds, path=path,
                             progress=progress)
        finally:
            if pool is not None:
                pool.close()
    return _plan(profile, budget, criterion, space, current, selection, start, measure, bank)


def _plan(profile: Profile, budget: Budget, criterion: str, space: LevelSpace, current: SearchState, selection: Selection,
          start: str, measure: Measure | None, bank: VariantBank | None) -> Plan:
    """The searched plan with what the search spent (``measure``/``bank`` None: a finished search read back)."""
    plan_levels = space.level_of(current.parent)
    skipped = None if measure is None else measure.blocks_skipped / max(1, measure.blocks_skipped + measure.blocks_run)
    return Plan(
        levels=plan_levels, params={t.name: t.params for t in profile.targets}, criterion=criterion, granularity="weight",
        method="search", budget=budget, predicted_drop=predicted_drop(profile, plan_levels), metric=profile.metric,
        details={"fitness": "KL(dense || pruned), nats per token, on the fitness batches",
                 "fitness_start": current.history[0]["fitness"], "fitness_end": current.fitness, "start": start,
                 "generations": current.generation, "evaluations": current.evaluations, "seconds": round(current.seconds, 1),
                 "grid": list(space.levels),
                 "selection": {"offspring": selection.offspring, "survivors": selection.survivors, "screen": selection.screen,
                               "fitness_batches": selection.batches},
                 "blocks_skipped": skipped, "bank_bytes": None if bank is None else bank.nbytes,
                 "bank_seconds": None if bank is None else round(bank.seconds, 1), "history": current.history,
                 "predicted_drop_is": "sum of per-target drops of the profile (additive assumption)"},
        **ScanIdentity.of_profile(profile).removal(),
    )


def check_search(profile: Profile, budget: Budget | float, *, levels: Sequence[float] | None = None, start: str = "profile",
                 offspring: int = 8, survivors: int = 2, screen: int = 1, evaluations: int | None = None,
                 seconds: float | None = None) -> tuple[str, LevelSpace]:
    """``(criterion, space)`` of a search, every argument :func:`search` takes besides the model and data
    checked (a command line calls it before loading the model): the profile, the budget on the level
    grid, the start, the selection sizes and the limit."""
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    criterion = _check(profile, budget, start, offspring, survivors, screen, evaluations, seconds)
    if levels is not None and any(isinstance(v, str) or isinstance(v, bool) or not isinstance(v, (int, float)) for v in levels):
        raise PrunescopeError(f"search levels are fractions on an equally spaced grid (e.g. 0.4,0.5,0.6); got {list(levels)}")
    grid = tuple(float(v) for v in (levels if levels is not None else [lv for lv in profile.levels if _fraction(lv)]))
    space = LevelSpace(tuple(t.name for t in profile.targets), tuple(t.params for t in profile.targets), grid)
    if start == "uniform":
        space.uniform(budget.fraction)
    else:
        space.best_start(np.zeros((len(space.names), len(grid))), budget.fraction)  # the budget is reachable on the grid
    return criterion, space


def _fraction(level) -> bool:
    return not isinstance(level, str) or ":" not in level


def _check_bank(bank: VariantBank, criterion: str, space: LevelSpace) -> None:
    if not isinstance(bank, VariantBank) or bank.criterion != criterion:
        raise PrunescopeError(f"bank must be a VariantBank of criterion {criterion!r} (build_variant_bank); got "
                              f"{getattr(bank, 'criterion', type(bank).__name__)!r}")
    missing = [n for n in space.names if n not in bank.variants]
    levels = {float(lv) for lv in bank.levels if not isinstance(lv, str)}
    off = [v for v in space.levels if v and not any(abs(v - lv) < 1e-9 for lv in levels)]
    if missing or off:
        raise PrunescopeError(f"the bank lacks {('layer ' + missing[0]) if missing else ('level ' + format(off[0], 'g'))} "
                              "of the search; build it with the search's layers and levels")


def _grid_drops(profile: Profile, space: LevelSpace) -> np.ndarray:
    curves = {name: monotone_curve(profile, name) for name in space.names}
    return np.array([[interp_drop(*curves[n], level) for level in space.levels] for n in space.names])


def _check(profile, budget, start, offspring, survivors, screen, evaluations, seconds) -> str:
    from ..criteria import check_criterion

    if not isinstance(profile, Profile):
        raise PrunescopeError(f"profile must be a prunescope.Profile (Profile.load(path) reads a file); got {type(profile).__name__}")
    if profile.granularity != "weight":
        raise PrunescopeError(f"search covers weight-granularity profiles (unstructured levels); this one is {profile.granularity}")
    criterion = check_criterion(profile.criterion, "weight", oneshot=True)
    if budget.kind != "sparsity":
        raise PrunescopeError(f"search meets a sparsity budget (fraction of the profile's weights); got a {budget.kind} budget")
    if start not in STARTS:
        raise PrunescopeError(f"unknown search start {start!r}; accepted: {', '.join(STARTS)}")
    whole_numbers(1, offspring=offspring, survivors=survivors, screen=screen)
    if evaluations is None and seconds is None:
        raise PrunescopeError("a search needs a limit: evaluations= (candidate evaluations) or seconds= (wall time)")
    whole_number(evaluations, "evaluations", optional=True)
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0):
        raise PrunescopeError(f"seconds must be a number > 0; got {seconds!r}")
    return criterion


def _identity(profile, budget, model, evaluator, calibration, grid, start, offspring, survivors, screen, seed) -> dict:
    identity = {
        "model_sha256": model_fingerprint(model), "fitness_sha256": evaluator.fingerprint,
        "calibration_sha256": batches_fingerprint(calibration) if calibration else None,
        "criterion": profile.criterion, "options": ScanIdentity.of_profile(profile).options,
        "targets": [t.name for t in profile.targets], "grid": list(grid), "budget": budget.fraction, "start": start,
        "offspring": offspring, "survivors": survivors, "screen": screen, "seed": seed,
    }
    return json.loads(strict_json(identity))
