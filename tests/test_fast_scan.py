"""Fast scans: incremental re-evaluation equals the full evaluation cell for cell; adaptive
sampling stops early with an honest interval; a killed scan resumes to the same profile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from helpers import assert_unchanged, snapshot, tiny_llama, token_batches
from torch import nn

import prunescope as ps

torchvision = pytest.importorskip("torchvision")
torch.set_num_threads(1)


def _resnet() -> tuple[nn.Module, ps.Evaluator]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, ps.Evaluator(model, [images[i:i + 4] for i in range(0, 12, 4)], "kl")


def _same_cells(fast: ps.Profile, full: ps.Profile) -> None:
    assert [(c.target, c.level) for c in fast.cells] == [(c.target, c.level) for c in full.cells]
    for a, b in zip(fast.cells, full.cells, strict=True):
        assert a.value == pytest.approx(b.value, rel=1e-5, abs=1e-9), (a.target, a.level)
        assert a.change == pytest.approx(b.change, rel=1e-5, abs=1e-9), (a.target, a.level)
        assert a.samples == b.samples


def _no_patched_forward(model: nn.Module) -> None:
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)], "a replayed forward was left behind"


@pytest.mark.parametrize("granularity", ["weight", "channel", "block"])
def test_incremental_equals_full_evaluation_on_resnet(granularity):
    model, evaluator = _resnet()
    before = snapshot(model)
    targets = ps.find_targets(model, granularity, example=evaluator.batches[0])
    levels = (0.3, 0.7) if granularity != "block" else (0.5,)
    fast = ps.scan(model, evaluator, targets, levels=levels)
    full = ps.scan(model, evaluator, targets, levels=levels, incremental=False)
    _same_cells(fast, full)
    summary = fast.provenance["incremental"]
    assert summary["targets_replaying"] >= len(targets) - 2 and summary["refused_replays"] == 0
    assert "incremental" not in full.provenance
    assert_unchanged(model, before)
    _no_patched_forward(model)


@pytest.mark.parametrize("granularity", ["weight", "head", "block"])
def test_incremental_equals_full_evaluation_on_a_decoder(granularity):
    model = tiny_llama()
    evaluator = ps.Evaluator(model, token_batches(count=3), "perplexity")
    before = snapshot(model)
    targets = ps.find_targets(model, granularity)
    levels = (0.5,) if granularity != "weight" else (0.5, "2:4")
    fast = ps.scan(model, evaluator, targets, levels=levels)
    _same_cells(fast, ps.scan(model, evaluator, targets, levels=levels, incremental=False))
    assert fast.provenance["incremental"]["targets_replaying"] > 0
    assert_unchanged(model, before)
    _no_patched_forward(model)


def test_the_cache_records_only_what_cells_replay():
    """A decoder's cache holds the hidden states of the blocks before the last target, never the logits."""
    model = tiny_llama()
    evaluator = ps.Evaluator(model, token_batches(count=2), "perplexity")
    targets = ps.find_targets(model, include=["model.layers.1.*"])
    summary = ps.scan(model, evaluator, targets, levels=(0.5,)).provenance["incremental"]
    hidden = sum(b["input_ids"].numel() for b in evaluator.batches) * model.config.hidden_size * 4  # float32 bytes of one layer's output
    assert summary["units"] == 1 and summary["cache_bytes_in_memory"] == hidden  # model.layers.0 only


def test_cache_spills_to_disk_past_its_memory_cap():
    model, evaluator = _resnet()
    targets = ps.find_targets(model, example=evaluator.batches[0])[-6:]
    capped = ps.scan(model, evaluator, targets, levels=(0.5,), cache_bytes=100_000)
    summary = capped.provenance["incremental"]
    assert summary["cache_bytes_spilled"] > 0 and summary["cache_bytes_in_memory"] <= 100_000
    _same_cells(capped, ps.scan(model, evaluator, targets, levels=(0.5,), incremental=False))


class _Remembering(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage = _StageWithState()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(x)) + self.stage.state


class _StageWithState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.state = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.state = out.sum()
        return out


def test_a_replay_that_changes_the_result_is_refused_and_said():
    torch.manual_seed(0)
    model = _Remembering().eval()
    batches = [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    evaluator = ps.Evaluator(model, batches, "kl")
    targets = ps.find_targets(model, exclude=[])
    with pytest.warns(UserWarning, match="did not reproduce the full forward pass"):
        fast = ps.scan(model, evaluator, targets, levels=(0.5,))
    assert fast.provenance["incremental"]["refused_replays"] == 1
    _same_cells(fast, ps.scan(model, evaluator, targets, levels=(0.5,), incremental=False))


def test_adaptive_stops_early_and_its_interval_is_honest():
    model, _ = _resnet()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    evaluator = ps.Evaluator(model, [images[i:i + 4] for i in range(0, 64, 4)], "kl")
    targets = ps.find_targets(model, example=evaluator.batches[0])[4:12]
    exact = ps.scan(model, evaluator, targets, levels=(0.3, 0.8))
    loose = ps.scan(model, evaluator, targets, levels=(0.3, 0.8), mode="adaptive", tolerance=0.05)
    assert sum(c.samples for c in loose.cells) < 0.6 * sum(c.samples for c in exact.cells)
    for cell in loose.cells:
        assert 8 <= cell.samples <= 64 and cell.ci_high - cell.ci_low <= 2 * 0.05 + 1e-12 or cell.samples == 64
    inside = [loose.cell(c.target, c.level).ci_low <= c.change <= loose.cell(c.target, c.level).ci_high for c in exact.cells]
    assert sum(inside) >= 0.75 * len(inside)
    tight = ps.scan(model, evaluator, targets, levels=(0.3,), mode="adaptive", tolerance=1e-9)
    for cell in tight.cells:  # an unreachable tolerance uses every batch and gives the exact answer
        assert cell.samples == 64 and cell.change == pytest.approx(exact.cell(cell.target, "0.3").change, rel=1e-9)


def test_adaptive_stops_once_past_max_drop():
    model, _ = _resnet()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    evaluator = ps.Evaluator(model, [images[i:i + 4] for i in range(0, 64, 4)], "kl")
    targets = ps.find_targets(model, example=evaluator.batches[0])[:2]
    profile = ps.scan(model, evaluator, targets, levels=(0.9,), mode="adaptive", tolerance=1e-9, max_drop=1e-4)
    assert all(c.samples < 64 and c.ci_low > 1e-4 for c in profile.cells)


def test_adaptive_cells_see_at_least_min_batches():
    model, _ = _resnet()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    evaluator = ps.Evaluator(model, [images[i:i + 4] for i in range(0, 64, 4)], "kl")
    targets = ps.find_targets(model, example=evaluator.batches[0])[4:8]
    default = ps.scan(model, evaluator, targets, levels=(0.3,), mode="adaptive", tolerance=10.0)
    assert all(c.samples == 8 for c in default.cells)  # a loose tolerance stops every cell at the two-batch minimum
    five = ps.scan(model, evaluator, targets, levels=(0.3,), mode="adaptive", tolerance=10.0, min_batches=5)
    assert all(c.samples == 20 for c in five.cells) and five.provenance["min_batches"] == 5
    everything = ps.scan(model, evaluator, targets, levels=(0.3,), mode="adaptive", tolerance=10.0, min_batches=99)
    exact = ps.scan(model, evaluator, targets, levels=(0.3,))
    for cell in everything.cells:  # more than the list holds means all of it: the exact answer
        assert cell.samples == 64 and cell.change == pytest.approx(exact.cell(cell.target, "0.3").change, rel=1e-9)


def test_bad_fast_scan_arguments():
    model, evaluator = _resnet()
    with pytest.raises(ps.PrunescopeError, match="unknown scan mode 'quick'; accepted: exact, adaptive"):
        ps.scan(model, evaluator, mode="quick")
    with pytest.raises(ps.PrunescopeError, match="needs a positive tolerance"):
        ps.scan(model, evaluator, mode="adaptive")
    for bad in (0, 1.5, True):
        with pytest.raises(ps.PrunescopeError, match=f"min_batches must be a whole number >= 1.*got {bad!r}"):
            ps.scan(model, evaluator, mode="adaptive", tolerance=0.1, min_batches=bad)


_KILL_SCRIPT = """
import sys, torch, torchvision
import prunescope as ps
torch.set_num_threads(1)
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
evaluator = ps.Evaluator(model, [images[:4], images[4:]], "kl")
targets = ps.find_targets(model, example=images[:4])[:8]
profile = ps.scan(model, evaluator, targets, levels=(0.2, 0.5, 0.8), store=sys.argv[1])
print(profile.to_json())
"""


def test_sigkill_loses_at_most_the_cell_in_flight(tmp_path):
    store = tmp_path / "cells.jsonl"
    command = [sys.executable, "-c", _KILL_SCRIPT, str(store)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not store.exists() or len(store.read_text().splitlines()) < 8):
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    finished = [json.loads(line) for line in store.read_text().splitlines()[1:] if line.endswith("}")]
    assert len(finished) >= 7, "the store must hold every cell finished before the kill"
    resumed = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    uninterrupted = subprocess.run([*command[:-1], str(tmp_path / "fresh.jsonl")], env=environment, capture_output=True,
                                   text=True, check=True)
    a, b = ps.Profile.from_json(resumed.stdout), ps.Profile.from_json(uninterrupted.stdout)
    assert [(c.target, c.level, c.value, c.change) for c in a.cells] == [(c.target, c.level, c.value, c.change) for c in b.cells]
    kept = {(c["target"], c["level"]): c["seconds"] for c in finished}
    assert all(kept[(c.target, c.level)] == c.seconds for c in a.cells if (c.target, c.level) in kept), \
        "finished cells were measured again"
    assert len(a.cells) == 8 * 3


def test_an_ordinary_model_scans_without_warnings():
    model, evaluator = _resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.scan(model, evaluator, ps.find_targets(model, example=evaluator.batches[0])[:2], levels=(0.5,))


def test_adaptive_samples_batches_in_random_order_so_a_sorted_list_does_not_bias_it():
    """Batches sorted from faint to strong images: the first few in list order show a tiny, steady
    change. Adaptive cells still bound the exact change, because they visit batches at random."""
    model, _ = _resnet()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    images *= torch.linspace(0.05, 3.0, 64).view(64, 1, 1, 1)  # sorted by scale
    evaluator = ps.Evaluator(model, [images[i:i + 4] for i in range(0, 64, 4)], "kl")
    targets = ps.find_targets(model, example=evaluator.batches[0])[4:10]
    exact = ps.scan(model, evaluator, targets, levels=(0.5,))
    adaptive = ps.scan(model, evaluator, targets, levels=(0.5,), mode="adaptive", tolerance=0.02)
    inside = [adaptive.cell(c.target, c.level).ci_low <= c.change <= adaptive.cell(c.target, c.level).ci_high
              for c in exact.cells]
    assert sum(inside) >= 5 and any(adaptive.cell(c.target, c.level).samples < 64 for c in exact.cells)
