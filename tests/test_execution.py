"""Execution: worker processes and Ray tasks give the serial scan's profile cell for cell, stream
cells into one store, retry a failed target once and then report it by cell, and leave the
parent's model untouched; shards of a scan merge into the single scan's profile."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn
from torch.utils.hooks import RemovableHandle
from typer.testing import CliRunner

import prunescope as ps
from prunescope.cli import app

torchvision = pytest.importorskip("torchvision")
torch.set_num_threads(1)

LEVELS = (0.2, 0.5, 0.8)


def _resnet() -> tuple[nn.Module, ps.Evaluator, list[ps.Target]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    evaluator = ps.Evaluator(model, [images[i:i + 4] for i in range(0, 12, 4)], "kl")
    return model, evaluator, ps.find_targets(model, example=evaluator.batches[0])[:8]


def _cells(profile: ps.Profile) -> list[ps.Cell]:
    return [dataclasses.replace(c, seconds=0.0) for c in profile.cells]


def _stored(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def _die_when_pruned(flag: str, how: str, home: int, module: nn.Module, _args) -> None:
    """Forward pre-hook: while ``flag`` exists and this layer's weight is pruned, end the process
    (``how``: "kill-once" SIGKILLs itself after removing the flag, "exit" leaves with code 3,
    "raise" raises). In process ``home`` (the test's own, one of the local workers) it raises
    instead of ending the process ("kill-once" still removes the flag)."""
    if not os.path.exists(flag) or not bool((module.weight == 0).any()):
        return
    if how == "kill-once":
        os.remove(flag)
        if os.getpid() != home:
            os.kill(os.getpid(), signal.SIGKILL)
    if how == "exit" and os.getpid() != home:
        os._exit(3)
    raise RuntimeError("this layer refuses to run pruned")


def _fail_in_process(flag: str, home: int, raised: list, model: nn.Module, _args) -> None:
    """Forward pre-hook on the whole model: while ``flag`` exists, a forward in process ``home`` with
    some conv or linear weight pruned raises (and is counted in ``raised``)."""
    layers = (m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    if os.path.exists(flag) and os.getpid() == home and any(bool((m.weight == 0).any()) for m in layers):
        raised.append(1)
        raise RuntimeError("not in this process")


def _doomed(model: nn.Module, tmp_path: Path, hooks: dict[str, str]) -> dict[str, Path]:
    """Add a _die_when_pruned hook on each named layer; return the flag file of each (not yet created)."""
    flags = {}
    for name, how in hooks.items():
        flags[name] = tmp_path / f"{name}.flag"
        model.get_submodule(name).register_forward_pre_hook(functools.partial(_die_when_pruned, str(flags[name]), how, os.getpid()))
    return flags


def _scaled(_module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
    return 3 * output


def _nothing(*_args) -> None:
    return None


def _hooks_from_id_zero(model: nn.Module) -> None:
    """Register a pre-hook and a forward hook on every module with hook ids counted from 0, as in a
    fresh script; fc's forward hook triples the output. A worker, whose own hooks are counted from 0
    in its process, must not replace them."""
    saved = RemovableHandle.next_id
    RemovableHandle.next_id = 0
    try:
        for module in model.modules():
            module.register_forward_pre_hook(_nothing)
            module.register_forward_hook(_scaled if module is model.fc else _nothing)
    finally:
        RemovableHandle.next_id = max(saved, RemovableHandle.next_id)


def test_workers_give_the_serial_profile_and_resume_a_torn_store(tmp_path):
    model, evaluator, targets = _resnet()
    _hooks_from_id_zero(model)
    before = snapshot(model)
    serial = ps.scan(model, evaluator, targets, levels=LEVELS, store=tmp_path / "serial.jsonl")
    lines = (tmp_path / "serial.jsonl").read_text().splitlines()
    store = tmp_path / "resumed.jsonl"
    store.write_text("\n".join(lines[:6]) + "\n" + lines[6][:40])  # five cells, then a torn sixth
    resumed = ps.scan(model, evaluator, targets, levels=LEVELS, store=store, workers=2)
    assert _cells(resumed) == _cells(serial)  # exact: same values, same order
    assert resumed.targets == serial.targets and resumed.dense_value == serial.dense_value
    kept = {(c["target"], c["level"]): c["seconds"] for c in _stored(tmp_path / "serial.jsonl")[:5]}
    assert all(c.seconds == kept[(c.target, c.level)] for c in resumed.cells if (c.target, c.level) in kept), \
        "cells already in the store were measured again"
    assert {(c["target"], c["level"]) for c in _stored(store)} == {(c.target, c.level) for c in serial.cells}
    assert len(_stored(store)) == len(serial.cells)
    assert resumed.provenance["execution"] == {"executor": "local", "workers": 2, "threads_per_worker": 1, "targets_run": 7}
    assert resumed.provenance["incremental"]["targets_replaying"] == 7  # the measured ones; conv1 (from the store) would not
    assert_unchanged(model, before)


def test_a_dead_worker_is_retried_once_then_its_target_reported(tmp_path):
    model, evaluator, targets = _resnet()
    once, always = targets[2].name, targets[5].name
    flags = _doomed(model, tmp_path, {once: "kill-once", always: "exit"})
    before = snapshot(model)
    serial = ps.scan(model, evaluator, targets, levels=LEVELS, max_drop=0.00125)  # no flags yet: nothing dies
    assert len(serial.cells) < len(targets) * len(LEVELS)  # max_drop stopped some targets early
    flags[once].touch()
    flags[always].touch()
    store = tmp_path / "cells.jsonl"
    with pytest.raises(ps.PrunescopeError) as failure:
        ps.scan(model, evaluator, targets, levels=LEVELS, store=store, max_drop=0.00125, workers=2)
    message = str(failure.value)
    assert f"{always} @ 0.2, 0.5, 0.8" in message and "exit code 3" in message and "tried 2 times" in message
    assert once not in message and not flags[once].exists()  # killed once, retried on a fresh worker
    stored = {(c["target"], c["level"]) for c in _stored(store)}
    assert stored == {(c.target, c.level) for c in serial.cells if c.target != always}
    assert_unchanged(model, before)

    flags[always].unlink()
    resumed = ps.scan(model, evaluator, targets, levels=LEVELS, store=store, max_drop=0.00125, workers=2)
    assert _cells(resumed) == _cells(serial)
    assert resumed.provenance["execution"]["targets_run"] == 1
    assert_unchanged(model, before)


def test_a_target_failing_in_this_process_is_retried_in_a_worker_process(tmp_path):
    model, evaluator, targets = _resnet()
    before = snapshot(model)
    serial = ps.scan(model, evaluator, targets, levels=LEVELS)
    flag = tmp_path / "flag"
    flag.touch()
    raised: list[int] = []
    handle = model.register_forward_pre_hook(functools.partial(_fail_in_process, str(flag), os.getpid(), raised))
    parallel = ps.scan(model, evaluator, targets, levels=LEVELS, workers=2, store=tmp_path / "cells.jsonl")
    assert raised == [1]  # this process tried its first target once, then left the rest to processes
    assert _cells(parallel) == _cells(serial)
    assert len(_stored(tmp_path / "cells.jsonl")) == len(serial.cells)
    assert torch.get_num_threads() == 1  # this process's threads are given back
    handle.remove()
    assert_unchanged(model, before)


def test_workers_report_a_refused_replay_as_the_serial_scan_does():
    from test_fast_scan import _Remembering  # its stage keeps state between calls: replaying it is refused

    torch.manual_seed(0)
    model = _Remembering().eval()
    evaluator = ps.Evaluator(model, [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)], "kl")
    targets = ps.find_targets(model, exclude=[])
    with pytest.warns(UserWarning, match="did not reproduce the full forward pass"):
        serial = ps.scan(model, evaluator, targets, levels=(0.5,))
    with pytest.warns(UserWarning, match="did not reproduce the full forward pass"):
        parallel = ps.scan(model, evaluator, targets, levels=(0.5,), workers=2)
    assert _cells(parallel) == _cells(serial)
    assert parallel.provenance["incremental"]["refused_replays"] == serial.provenance["incremental"]["refused_replays"] == 1


def test_ray_tasks_give_the_serial_profile_retry_and_report(tmp_path):
    ray = pytest.importorskip("ray")
    model, evaluator, targets = _resnet()
    crash, broken = targets[1].name, targets[4].name
    flags = _doomed(model, tmp_path, {crash: "kill-once", broken: "raise"})
    before = snapshot(model)
    serial = ps.scan(model, evaluator, targets, levels=LEVELS)
    flags[crash].touch()
    flags[broken].touch()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        store = tmp_path / "ray.jsonl"
        with pytest.raises(ps.PrunescopeError) as failure:
            ps.scan(model, evaluator, targets, levels=LEVELS, store=store, executor="ray")
        message = str(failure.value)
        assert f"{broken} @ 0.2, 0.5, 0.8" in message and "refuses to run pruned" in message and "tried 2 times" in message
        assert crash not in message
        assert not flags[crash].exists()  # Ray re-ran the task whose worker was killed
        assert {(c["target"], c["level"]) for c in _stored(store)} == \
            {(c.target, c.level) for c in serial.cells if c.target != broken}
        flags[broken].unlink()
        resumed = ps.scan(model, evaluator, targets, levels=LEVELS, store=store, executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert _cells(resumed) == _cells(serial)
    assert resumed.provenance["execution"]["executor"] == "ray" and resumed.provenance["execution"]["targets_run"] == 1
    assert_unchanged(model, before)


def test_shards_merge_into_the_single_scan(tmp_path):
    model, evaluator, targets = _resnet()
    targets = targets[:5]
    single = ps.scan(model, evaluator, targets, levels=LEVELS[:2], store=tmp_path / "single.jsonl")
    shards = [ps.scan(model, evaluator, targets, levels=LEVELS[:2], store=tmp_path / f"shard{i}.jsonl", shard=(i, 2))
              for i in range(2)]
    assert [t.name for t in shards[1].targets] == [targets[1].name, targets[3].name]
    shards[1].save(tmp_path / "shard1.json")
    merged = ps.merge_profiles([shards[0], tmp_path / "shard1.json"])
    assert merged.targets == single.targets and _cells(merged) == _cells(single)
    assert merged.provenance["merged_shards"] == 2 and "shard" not in merged.provenance
    assert ps.merge_profiles(list(reversed(shards))).cells == merged.cells
    # a shard's store records its shard: another shard, or the whole scan, cannot resume it
    with pytest.raises(ps.PrunescopeError, match="different shard"):
        ps.scan(model, evaluator, targets, levels=LEVELS[:2], store=tmp_path / "shard0.jsonl", shard=(1, 2))
    with pytest.raises(ps.PrunescopeError, match="missing \\[1\\]"):
        ps.merge_profiles([shards[0]])
    with pytest.raises(ps.PrunescopeError, match="repeated \\[0\\]"):
        ps.merge_profiles([shards[0], shards[0]])
    with pytest.raises(ps.PrunescopeError, match="profile 0 is not a shard"):
        ps.merge_profiles([single, shards[1]])
    other = ps.scan(model, evaluator, targets, levels=LEVELS[:2], seed=1, criterion="random", shard=(1, 2))
    with pytest.raises(ps.PrunescopeError, match="its criterion, seed differ"):
        ps.merge_profiles([shards[0], other])


def test_shards_of_head_scans_with_different_head_modes_do_not_merge():
    """Regression: the merge check compared every identity field but the head mode."""
    from helpers import tiny_llama, token_batches

    model = tiny_llama()
    evaluator = ps.Evaluator(model, token_batches(), "kl")
    shards = [ps.scan(model, evaluator, ps.find_targets(model, "head", head_mode=mode), levels=[0.5], shard=(i, 2))
              for i, mode in enumerate(("kv_group", "query"))]
    with pytest.raises(ps.PrunescopeError, match="head_mode differ"):
        ps.merge_profiles(shards)


class _Locked(nn.Module):
    """A model holding a lock: it cannot be pickled into a worker."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.linear(x))


def test_bad_execution_arguments_write_nothing(tmp_path):
    model = _Locked()
    evaluator = ps.Evaluator(model, [torch.randn(3, 4)], "kl")
    store = tmp_path / "cells.jsonl"
    with pytest.raises(ps.PrunescopeError, match="unknown executor 'dask'; accepted: local, ray"):
        ps.scan(model, evaluator, executor="dask", store=store)
    for workers in (0, -1, 1.5, True):
        with pytest.raises(ps.PrunescopeError, match="workers must be a positive integer"):
            ps.scan(model, evaluator, workers=workers, store=store)
    with pytest.raises(ps.PrunescopeError, match="pickling failed: TypeError: cannot pickle '_thread.lock'"):
        ps.scan(model, evaluator, workers=2, store=store)
    for shard in ((2, 2), (0, 0), (1,), "0/2"):
        with pytest.raises(ps.PrunescopeError, match="shard must be a pair"):
            ps.scan(model, evaluator, shard=shard, store=store)
    with pytest.raises(ps.PrunescopeError, match="shard 1 of 2 has no targets"):
        ps.scan(model, evaluator, shard=(1, 2), store=store)
    assert not store.exists()
    result = CliRunner().invoke(app, ["scan", "--executor", "dask", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and "unknown executor 'dask'" in result.output


def test_a_model_the_workers_cannot_import_is_refused_by_name(tmp_path):
    source = tmp_path / "elsewhere_model.py"  # importable here, but tmp_path is not on the workers' path
    source.write_text("import torch\n\n\nclass Elsewhere(torch.nn.Sequential):\n"
                      "    def __init__(self):\n        super().__init__(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))\n")
    spec = importlib.util.spec_from_file_location("elsewhere_model", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["elsewhere_model"] = module
    try:
        spec.loader.exec_module(module)
        model = module.Elsewhere()
        evaluator = ps.Evaluator(model, [torch.randn(3, 4)], "kl")
        with pytest.raises(ps.PrunescopeError, match="a worker process could not load the model and evaluator: "
                                                     "ModuleNotFoundError: No module named 'elsewhere_model'"):
            ps.scan(model, evaluator, ps.find_targets(model, exclude=[]), levels=(0.5,), workers=2)
    finally:
        del sys.modules["elsewhere_model"]


def test_cli_scan_with_workers(tmp_path):
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(app, ["scan", "--model", "torchvision:resnet18", "--data", "random:3,32,32", "--samples", "8",
                                      "--include", "layer4.*", "--levels", "0.5", "--workers", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    profile = ps.Profile.load(out)
    assert len(profile.cells) == 5 and profile.provenance["execution"]["workers"] == 2


def test_the_worker_payload_carries_each_batch_once():
    """Batches sliced from one big tensor pickle only their own elements, and arrive equal."""
    from prunescope.cell_runner import ScanSettings
    from prunescope.execution.payload import WorkerContext, pack, unpack

    model = nn.Sequential(nn.Linear(256, 4))
    data = torch.randn(64, 256)
    evaluator = ps.Evaluator(model, [data[i:i + 4] for i in range(0, 64, 4)], "kl")
    settings = ScanSettings("weight", "magnitude", (0.5,), ("0.5",), 0, None, None, "exact", None, 0.95, True, 2**20)
    packed = pack(WorkerContext(model, evaluator, ps.find_targets(model, exclude=[]), settings))
    assert len(packed) < 2 * (data.nbytes + 256 * 4 * 4)  # not 16 copies of the whole tensor
    received = unpack(packed).evaluator.batches
    assert all(torch.equal(a, b) for a, b in zip(received, evaluator.batches, strict=True))
    assert evaluator.batches[0].untyped_storage().data_ptr() == data.untyped_storage().data_ptr()  # caller's untouched
