"""The variant bank and the measured-fitness search: exact budgets, exact resume, the model untouched."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_unchanged, snapshot, tiny_llama, token_batches

import prunescope as ps
from prunescope.oneshot.bank import build_variant_bank
from prunescope.oneshot.hessian import collect_input_stats
from prunescope.oneshot.sparsegpt import sparsegpt_prune, sparsegpt_prune_levels
from prunescope.search.space import LevelSpace

LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)


@pytest.fixture(scope="module")
def setting():
    model = tiny_llama()
    calibration = token_batches(4, 4, 16)
    fitness = token_batches(3, 2, 16, seed=1)
    targets = ps.find_targets(model)
    profile = ps.scan(model, ps.Evaluator(model, fitness, "kl"), targets, levels=LEVELS, criterion="sparsegpt",
                      calibration=calibration)
    return model, calibration, fitness, profile


def test_levels_share_one_factorization_and_equal_single_level_runs():
    torch.manual_seed(0)
    weight, x = torch.randn(12, 16), torch.randn(64, 16)
    hessian = (x.t() @ x).double()
    together = sparsegpt_prune_levels(weight, hessian, [0.25, 0.5, "2:4"], block_size=8)
    for level, result in zip([0.25, 0.5, "2:4"], together, strict=True):
        alone = sparsegpt_prune(weight, hessian, level, block_size=8)
        assert torch.equal(result.weight, alone.weight) and torch.equal(result.keep, alone.keep)


def test_bank_holds_each_layer_pruned_from_the_dense_inputs(setting):
    model, calibration, _, profile = setting
    before = snapshot(model)
    names = [t.name for t in profile.targets]
    bank = build_variant_bank(model, calibration, names, [0.5, 0.7], criterion="sparsegpt")
    assert_unchanged(model, before)
    for name in (names[0], names[-1]):
        module = model.get_submodule(name)
        stats = collect_input_stats(model, {name: module}, calibration, True)[name]
        for level in (0.5, 0.7):
            expected = sparsegpt_prune(module.weight.detach().clone(), stats.hessian, level).weight
            assert torch.allclose(bank.weight(name, level), expected, atol=1e-6, rtol=0)
            assert (bank.weight(name, level) == 0).float().mean().item() == pytest.approx(level, abs=1 / module.weight.numel())
    assert bank.nbytes == 2 * sum(model.get_submodule(n).weight.numel() * 4 for n in names)


def test_bank_larger_than_its_cap_is_refused_before_any_work(setting):
    model, calibration, _, profile = setting
    names = [t.name for t in profile.targets]
    with pytest.raises(ps.PrunescopeError, match=r"needs .* GiB .* above max_bytes"):
        build_variant_bank(model, calibration, names, LEVELS, criterion="sparsegpt", max_bytes=1000)


def test_mutations_keep_the_removed_weights_exact():
    space = LevelSpace(("a", "b", "c", "d", "e"), (110592, 331776, 884736, 110592, 884736), (0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    rng = random.Random(3)
    state = space.uniform(0.7)
    invariant = sum(k * p for k, p in zip(state, space.params, strict=True))
    seen = set()
    for _ in range(300):
        state = space.mutate(state, rng)
        seen.add(state)
        assert sum(k * p for k, p in zip(state, space.params, strict=True)) == invariant
        assert all(0 <= k < len(space.levels) for k in state)
    assert len(seen) > 20


def test_exact_start_is_the_best_plan_on_the_grid_by_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(5):
        params = tuple(int(v) for v in rng.choice([2, 4, 6], size=4))
        space = LevelSpace(tuple("abcd"), params, (0.2, 0.4, 0.6, 0.8))
        drops = np.sort(rng.random((4, 4)), axis=1) * rng.random((4, 1)) * 10
        best = space.best_start(drops, 0.6)
        goal = sum(space.uniform(0.6)[i] * p for i, p in enumerate(params))
        feasible = [s for s in itertools.product(range(4), repeat=4) if sum(k * p for k, p in zip(s, params, strict=True)) == goal]
        optimum = min(sum(drops[i, k] for i, k in enumerate(s)) for s in feasible)
        assert sum(drops[i, k] for i, k in enumerate(best)) == pytest.approx(optimum, abs=1e-12), trial
        assert space.removed(best) == pytest.approx(0.6)


def test_search_meets_the_budget_improves_the_start_and_leaves_the_model(setting, tmp_path):
    model, calibration, fitness, profile = setting
    before = snapshot(model)
    plan = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=40, state=tmp_path / "s.json")
    assert_unchanged(model, before)
    assert plan.method == "search" and plan.criterion == "sparsegpt"
    assert plan.sparsity == pytest.approx(0.5, abs=1e-12)
    assert plan.details["fitness_end"] <= plan.details["fitness_start"]
    assert plan.details["evaluations"] <= 40
    history = [row["fitness"] for row in plan.details["history"]]
    assert history == sorted(history, reverse=True)
    # the plan's fitness is what applying its levels from the bank measures
    pruned = ps.apply(model, plan, calibration=calibration)
    assert ps.Evaluator(model, fitness, "kl").evaluate(pruned).value >= 0


def test_resume_after_a_partial_run_ends_where_an_uninterrupted_run_ends(setting, tmp_path):
    model, calibration, fitness, profile = setting
    whole = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=50, start="uniform")
    ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=20, start="uniform", state=tmp_path / "s.json")
    resumed = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=50, start="uniform",
                        state=tmp_path / "s.json")
    assert resumed.levels == whole.levels
    assert resumed.details["fitness_end"] == whole.details["fitness_end"]
    assert resumed.details["history"] == [dict(row, seconds=r2["seconds"]) for row, r2 in
                                          zip(whole.details["history"], resumed.details["history"], strict=True)]


def test_a_state_file_of_another_search_is_refused_by_name(setting, tmp_path):
    model, calibration, fitness, profile = setting
    path = tmp_path / "s.json"
    ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=10, state=path)
    with pytest.raises(ps.PrunescopeError, match="its seed is 0, this search's is 1"):
        ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=10, state=path, seed=1)
    path.write_text(path.read_text()[:100])
    with pytest.raises(ps.PrunescopeError, match="not valid JSON.*truncated"):
        ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=10, state=path)


@pytest.mark.parametrize("kwargs, message", [
    ({"evaluations": 0}, "evaluations must be a whole number >= 1"),
    ({}, "a search needs a limit"),
    ({"seconds": -1.0}, "seconds must be a number > 0"),
    ({"evaluations": 5, "start": "random"}, "unknown search start 'random'; accepted: profile, uniform"),
    ({"evaluations": 5, "offspring": 0}, "offspring must be a whole number >= 1"),
])
def test_bad_search_settings_get_one_line(setting, kwargs, message):
    model, calibration, fitness, profile = setting
    with pytest.raises(ps.PrunescopeError, match=message):
        ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, **kwargs)


def test_a_budget_off_the_grid_and_another_model_are_refused(setting):
    model, calibration, fitness, profile = setting
    with pytest.raises(ps.PrunescopeError, match="no plan on the grid .* removes exactly 50.1000%"):
        ps.search(profile, 0.501, model, fitness=fitness, calibration=calibration, evaluations=5)
    with pytest.raises(ps.PrunescopeError, match="level 0.55 is not on the search grid"):
        ps.search(profile, 0.55, model, fitness=fitness, calibration=calibration, evaluations=5, start="uniform")
    from helpers import tiny_gpt2

    with pytest.raises(ps.PrunescopeError, match="not a layer of this model: the profile is of another model"):
        ps.search(profile, 0.5, tiny_gpt2(), fitness=fitness, calibration=calibration, evaluations=5)


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from helpers import tiny_llama, token_batches
import prunescope as ps
model = tiny_llama()
calibration, fitness = token_batches(4, 4, 16), token_batches(3, 2, 16, seed=1)
profile = ps.scan(model, ps.Evaluator(model, fitness, "kl"), ps.find_targets(model), levels={levels!r}, criterion="sparsegpt",
                  calibration=calibration)
plan = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=200, start="uniform",
                 state=sys.argv[1])
print(plan.details["fitness_end"], sorted(plan.levels.items()))
"""


def test_a_search_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parent), levels=LEVELS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([sys.executable, str(script), str(tmp_path / "whole.json")], capture_output=True, text=True, env=env, check=True)
    state = tmp_path / "killed.json"
    child = subprocess.Popen([sys.executable, str(script), str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if state.exists() and json.loads(state.read_text())["generation"] >= 3:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the search finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    generation = json.loads(state.read_text())["generation"]
    assert 3 <= generation < 20
    resumed = subprocess.run([sys.executable, str(script), str(state)], capture_output=True, text=True, env=env, check=True)
    assert resumed.stdout == whole.stdout


def test_a_magnitude_search_reports_the_fitness_its_applied_plan_has(setting):
    model, _, fitness, _ = setting
    profile = ps.scan(model, ps.Evaluator(model, fitness, "kl"), ps.find_targets(model), levels=LEVELS)
    before = snapshot(model)
    plan = ps.search(profile, 0.5, model, fitness=fitness, evaluations=30)
    assert_unchanged(model, before)
    assert plan.criterion == "magnitude" and plan.sparsity == pytest.approx(0.5, abs=1e-12)
    measured = ps.Evaluator(model, fitness, "kl").evaluate(ps.apply(model, plan)).value
    assert measured == pytest.approx(plan.details["fitness_end"], rel=1e-9)


def test_layers_with_no_budget_preserving_move_are_refused_by_name(digits_model, digits_val):
    profile = ps.scan(digits_model, ps.Evaluator(digits_model, digits_val, "loss"), levels=(0.6, 0.7, 0.8, 0.9))
    with pytest.raises(ps.PrunescopeError, match="no move keeps the budget exact"):
        ps.search(profile, 0.8, digits_model, fitness=digits_val[:1], evaluations=30)


def test_replaying_the_parents_unchanged_blocks_gives_the_same_fitness_bit_for_bit(setting):
    from prunescope.search.measure import Measure, Working

    model, calibration, fitness, profile = setting
    space = LevelSpace(tuple(t.name for t in profile.targets), tuple(t.params for t in profile.targets), LEVELS)
    bank = build_variant_bank(model, calibration, space.names, LEVELS, criterion="sparsegpt")
    evaluator = ps.Evaluator(model, fitness, "kl")
    replaying = Measure(Working(model, bank), space, evaluator)
    parent = space.uniform(0.5)
    replaying([parent], range(3), record=True)
    replaying.adopt(parent)
    rng = random.Random(0)
    children = [space.mutate(parent, rng) for _ in range(40)]
    children = [c for c in children if replaying.replay.first_block(space.names, c) > 0][:3] + children[:2]
    assert len(children) == 5
    fresh = Measure(Working(model, bank), space, evaluator)
    assert replaying(children, range(3)) == fresh(children, range(3))
    assert replaying.blocks_skipped > 0 and fresh.blocks_skipped == 0


def test_two_local_workers_give_the_plan_one_process_gives(setting):
    model, calibration, fitness, profile = setting
    before = snapshot(model)
    alone = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=40, start="uniform")
    shared = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=40, start="uniform", workers=2)
    assert_unchanged(model, before)
    assert shared.levels == alone.levels
    assert shared.details["history"][-1]["fitness"] == alone.details["history"][-1]["fitness"]


def test_bad_execution_settings_are_refused_before_any_work(setting):
    model, calibration, fitness, profile = setting
    with pytest.raises(ps.PrunescopeError, match="workers must be a positive integer"):
        ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=5, workers=0)
    with pytest.raises(ps.PrunescopeError, match="unknown executor 'dask'"):
        ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=5, executor="dask")
    with pytest.raises(ps.PrunescopeError, match="give workers >= 2"):
        ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=5, executor="ray")


def test_ray_actors_give_the_plan_one_process_gives(setting):
    ray = pytest.importorskip("ray")
    model, calibration, fitness, profile = setting
    alone = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=30, start="uniform")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        shared = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=30, start="uniform",
                           workers=2, executor="ray")
    finally:
        ray.shutdown()
    assert shared.levels == alone.levels


def test_a_worker_copy_restores_dense_layers_exactly(setting):
    import copy

    from prunescope.search.measure import Working

    model, calibration, _, profile = setting
    names = [t.name for t in profile.targets]
    bank = build_variant_bank(model, calibration, names, [0.5], criterion="sparsegpt")
    own = copy.deepcopy(model)
    working = Working(own, bank, copy=False)
    working.set({n: 0.5 for n in names})
    working.set({n: 0.0 for n in names})
    for name in names:
        assert torch.equal(own.get_submodule(name).weight, model.get_submodule(name).weight)


def test_a_finished_search_returns_its_plan_without_building_the_bank(setting, tmp_path, monkeypatch):
    import importlib

    search_api = importlib.import_module("prunescope.search.api")  # prunescope.search is the function

    model, calibration, fitness, profile = setting
    path = tmp_path / "s.json"
    first = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=30, state=path)

    def no_bank(*args, **kwargs):
        raise AssertionError("a finished search built its bank again")

    monkeypatch.setattr(search_api, "build_variant_bank", no_bank)
    again = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=30, state=path)
    assert again.levels == first.levels and again.details["history"] == first.details["history"]
    fewer = ps.search(profile, 0.5, model, fitness=fitness, calibration=calibration, evaluations=5, state=path)
    assert fewer.levels == first.levels  # a lower limit than spent: the plan so far
