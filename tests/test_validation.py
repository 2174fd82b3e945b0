"""Every file and argument validated: one line naming the problem, before any work, and nothing written."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, token_batches
from test_errors import assert_refused
from typer.testing import CliRunner

import prunescope as ps
from prunescope.cli import app
from prunescope.digits import DigitsCNN
from prunescope.jsonfile import strict_json
from prunescope.levels import DEFAULT_LEVELS
from prunescope.store import CellStore, check_store_free

runner = CliRunner()
SRC = str(Path(ps.__file__).resolve().parents[1])


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused_by_cli(result, message: str) -> str:
    """The command exited 2 with ``message`` on one line, and no traceback."""
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert message in text, text
    assert "Traceback" not in result.output
    return text


def _no_nan(token: str):
    raise ValueError(f"non-standard JSON token {token}")


@pytest.fixture
def scanned(small_cnn):
    model, batches = small_cnn
    evaluator = ps.Evaluator(model, batches, "loss")
    return model, evaluator, ps.scan(model, evaluator, levels=[0.5, 0.9])


# ---- 1. files: damaged or hand-edited files are refused on load in one line ---------------------


@pytest.mark.parametrize("kind", ["profile", "plan"])
@pytest.mark.parametrize("damage", ["truncated", "not json", "empty", "array"])
def test_damaged_profile_or_plan_is_one_line_naming_the_file(scanned, tmp_path, kind, damage):
    _, _, profile = scanned
    path = tmp_path / f"{kind}.json"
    (profile if kind == "profile" else ps.allocate(profile, 0.5, method="uniform")).save(path)
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "not json": "hello, world", "empty": "", "array": "[1, 2]"}[damage])
    load = ps.Profile.load if kind == "profile" else ps.Plan.load
    message = assert_refused(lambda: load(path), re.escape(str(path)), tmp_path)
    assert "\n" not in message
    if damage == "truncated":
        assert "not valid JSON" in message and "truncated" in message


def _edited_profile(profile: ps.Profile, path: Path, edit) -> Path:
    data = json.loads(profile.to_json())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (lambda d: d["cells"][0].update(sparsity=5.0), "cells[0].sparsity", "[0, 1]"),
        (lambda d: d["levels"].__setitem__(0, "7.0"), "levels[0]", "'7.0' is not a level"),
        (lambda d: d["cells"][1].update(value="x"), "cells[1].value", "must be a number"),
        (lambda d: d["cells"][2].update(level="0.7"), "cells[2].level", "not one of the profile's levels"),
        (lambda d: d["cells"][0].update(target="nowhere"), "cells[0].target", "not one of the profile's targets"),
        (lambda d: d["cells"][0].pop("samples"), "cells[0].samples", "is missing"),
        (lambda d: d["cells"][0].update(samples=-3), "cells[0].samples", ">= 0"),
        (lambda d: d.pop("metric"), "metric", "is missing"),
        (lambda d: d.update(dense_value=None), "dense_value", "must be a number"),
        (lambda d: d.update(confidence=1.5), "confidence", "(0, 1)"),
        (lambda d: d.update(granularity="atoms"), "granularity", "accepted: weight"),
        (lambda d: d["targets"][0].update(params=-1), "targets[0].params", ">= 0"),
        (lambda d: d["targets"][0].update(shape=[3, "x"]), "targets[0].shape", "whole numbers"),
        (lambda d: d["targets"].append(d["targets"][0]), "targets", "repeat a name"),
        (lambda d: d["cells"].append(d["cells"][0]), "cells[", "repeats the cell"),
        (lambda d: d.update(version=99), "version", "newer prunescope"),
        (lambda d: d.update(costs={"shapes": {"a": [2, -1]}, "flops": {}}), "costs.shapes", "whole numbers"),
    ],
)
def test_hand_edited_profile_is_refused_on_load(scanned, tmp_path, edit, field, problem):
    _, _, profile = scanned
    path = _edited_profile(profile, tmp_path / "p.json", edit)
    message = assert_refused(lambda: ps.Profile.load(path), re.escape(str(path)), tmp_path)
    assert message.startswith(f"profile file {path}: {field}") and problem in message, message
    assert "\n" not in message


def test_hand_edited_profile_csv_is_refused_on_load(scanned, tmp_path):
    import csv
    import io

    _, _, profile = scanned
    path = profile.save(tmp_path / "p.csv")
    rows = list(csv.reader(io.StringIO(path.read_text())))
    rows[2][rows[0].index("sparsity")] = "5.0"  # the second cell (the first row also carries the profile's JSON)
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    path.write_text(buffer.getvalue())
    message = assert_refused(lambda: ps.Profile.load(path), "sparsity", tmp_path)
    assert str(path) in message and "[0, 1]" in message
    path.write_bytes(b"target,level\n{not json\n")
    assert str(path) in assert_refused(lambda: ps.Profile.load(path), "", tmp_path)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["levels"].update({"features.0": 7.0}), "levels.features.0"),
        (lambda d: d["levels"].update({"features.0": "x"}), "levels.features.0"),
        (lambda d: d["params"].update({"features.0": "many"}), "params.features.0"),
        (lambda d: d["params"].pop("features.0"), "levels.features.0"),
        (lambda d: d.update(budget={"sparsity": 2.0}), "budget.sparsity"),
        (lambda d: d.update(budget={"bananas": 0.5}), "budget.bananas"),
        (lambda d: d.update(granularity="atoms"), "granularity"),
        (lambda d: d.update(version=2), "version"),
    ],
)
def test_hand_edited_plan_is_refused_on_load(scanned, tmp_path, edit, field):
    _, _, profile = scanned
    path = ps.allocate(profile, 0.5, method="threshold").save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    message = assert_refused(lambda: ps.Plan.load(path), re.escape(str(path)), tmp_path)
    assert message.startswith(f"plan file {path}: {field}"), message


def test_profile_holding_nan_cells_written_by_an_older_prunescope_still_loads(scanned, tmp_path):
    _, _, profile = scanned
    data = profile.to_dict()
    data["cells"][0]["value"] = float("nan")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))  # a bare NaN token, as before strict JSON
    assert math.isnan(ps.Profile.load(path).cells[0].value)


def test_store_with_a_damaged_line_or_bytes_is_refused_in_one_line(small_cnn, tmp_path):
    model, batches = small_cnn
    store = tmp_path / "s.jsonl"
    evaluator = ps.Evaluator(model, batches, "loss")
    ps.scan(model, evaluator, levels=[0.5, 0.9], store=store)
    lines = store.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["sparsity"] = 5.0
    store.write_text("\n".join([lines[0], lines[1], json.dumps(edited), *lines[3:]]) + "\n")
    content = store.read_bytes()
    message = assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5, 0.9], store=store), "line 3", tmp_path)
    assert str(store) in message and "sparsity" in message and "[0, 1]" in message and "\n" not in message
    assert store.read_bytes() == content
    store.write_text("\n".join([lines[0], lines[1], "{not json", *lines[2:]]) + "\n")
    assert "line 3 is not valid JSON" in assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5, 0.9], store=store),
                                                        re.escape(str(store)), tmp_path)
    store.write_bytes(lines[0].encode() + b"\n\xff\xfe garbage\n")
    message = assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5, 0.9], store=store), "not UTF-8", tmp_path)
    assert str(store) in message and "0xff" in message


def test_merge_of_damaged_or_mismatched_shards_is_one_line(small_cnn, tmp_path):
    model, batches = small_cnn
    evaluator = ps.Evaluator(model, batches, "loss")
    targets = ps.find_targets(model)
    shards = [ps.scan(model, evaluator, targets, levels=[0.5], shard=(i, 2)) for i in range(2)]
    paths = [shard.save(tmp_path / f"shard{i}.json") for i, shard in enumerate(shards)]
    text = paths[1].read_text()
    paths[1].write_text(text[: len(text) // 3])
    assert str(paths[1]) in assert_refused(lambda: ps.merge_profiles(paths), "not valid JSON", tmp_path)
    paths[1].write_text(text)
    short = json.loads(paths[0].read_text())  # shard 0 of 4 targets holds 2; keep 1
    short["targets"], short["cells"] = short["targets"][:1], [c for c in short["cells"] if c["target"] == short["targets"][0]["name"]]
    paths[0].write_text(json.dumps(short))
    assert_refused(lambda: ps.merge_profiles(paths), "the shards hold", tmp_path)


def test_a_plan_for_another_model_is_refused_when_applied(scanned, small_cnn, tmp_path):
    model, _, profile = scanned
    plan = ps.allocate(profile, 0.5, method="uniform")
    wider = DigitsCNN(width=8)  # the same layer names, other sizes
    message = assert_refused(lambda: ps.apply(wider, plan), "another model", tmp_path)
    assert "features.0" in message
    renamed = ps.Plan({"encoder.0": 0.5}, {"encoder.0": 36})
    assert "encoder.0" in assert_refused(lambda: ps.apply(model, renamed), "does not have", tmp_path)
    assert ps.apply(model, plan) is not model  # the model the plan was made for is accepted

    _, batches = small_cnn
    evaluator = ps.Evaluator(model, batches, "loss")
    channels = ps.scan(model, evaluator, ps.find_targets(model, "channel", example=batches[0]), levels=[0.5])
    channel_plan = ps.allocate(channels, ps.Budget(flops=0.3), method="uniform")
    assert_refused(lambda: ps.apply(wider, channel_plan, example=batches[0][0]), "another model", tmp_path)
    ps.apply(model, channel_plan, example=batches[0][0])


def test_report_refuses_a_plan_naming_layers_not_in_the_profile(scanned, tmp_path):
    _, _, profile = scanned
    profile_path = profile.save(tmp_path / "p.json")
    plan_path = ps.Plan({"encoder.0": 0.5}, {"encoder.0": 36}).save(tmp_path / "plan.json")
    result = invoke("report", "--profile", profile_path, "--plan", plan_path, "--out", tmp_path / "report")
    refused_by_cli(result, "not in the profile: encoder.0")
    assert not (tmp_path / "report").exists()


# ---- 2. strict JSON out ----------------------------------------------------------------------------


def test_nan_and_inf_cells_are_written_as_strict_json_and_read_back(scanned, tmp_path):
    _, _, profile = scanned
    cells = list(profile.cells)
    cells[0] = ps.Cell(cells[0].target, cells[0].level, cells[0].sparsity, math.nan, math.nan, math.nan, None, 12, 0.1)
    cells[1] = ps.Cell(cells[1].target, cells[1].level, cells[1].sparsity, math.inf, math.inf, -math.inf, math.inf, 12, 0.1)
    profile.cells = cells
    text = profile.to_json()
    json.loads(text, parse_constant=_no_nan)  # no NaN / Infinity tokens
    loaded = ps.Profile.load(profile.save(tmp_path / "p.json"))
    first, second = loaded.cells[0], loaded.cells[1]
    assert math.isnan(first.value) and math.isnan(first.change) and first.ci_low is None
    assert second.value == math.inf and second.ci_low == -math.inf and second.ci_high == math.inf

    plan = ps.Plan({"a": 0.5}, {"a": 10}, predicted_drop=math.nan)
    json.loads(plan.to_json(), parse_constant=_no_nan)
    assert ps.Plan.load(plan.save(tmp_path / "plan.json")).predicted_drop is None  # null: no prediction

    with CellStore(tmp_path / "s.jsonl", {"model": "m"}) as store:
        store.append(cells[0])
    for line in (tmp_path / "s.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_no_nan)
    with CellStore(tmp_path / "s.jsonl", {"model": "m"}) as store:
        assert math.isnan(store.get(cells[0].target, cells[0].level).value)


def test_strict_json_never_writes_non_standard_tokens():
    text = strict_json({"a": [math.nan, math.inf, -math.inf, 1.5, "inf"], "b": {"c": math.nan}}, indent=1)
    assert json.loads(text, parse_constant=_no_nan) == {"a": [None, math.inf, -math.inf, 1.5, "inf"], "b": {"c": None}}


# ---- 3. one writer per store ------------------------------------------------------------------------


HOLDER = textwrap.dedent("""
    import sys, time
    import torch
    import prunescope as ps
    from prunescope.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, 1, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator)) for _ in range(2)]
    calls = []

    def slow_loss(output, batch):  # the third evaluation (the second cell) announces itself and waits to be killed
        calls.append(1)
        if len(calls) == 5:
            print("holding", flush=True)
            time.sleep(120)
        return torch.nn.functional.cross_entropy(output, batch[1], reduction="none")

    evaluator = ps.Evaluator(model, batches, slow_loss, higher_is_better=False)
    ps.scan(model, evaluator, levels=[0.5, 0.9], criterion=sys.argv[2], store=sys.argv[1], incremental=False)
""")


def _holding_scan(store: Path, criterion: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), criterion], stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout.readline().strip() == "holding", "the holding scan did not start"
    return child


def test_a_second_scan_on_a_store_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, 1, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator)) for _ in range(2)]
    store = tmp_path / "s.jsonl"
    child = _holding_scan(store, "magnitude")
    try:
        header = store.read_text().splitlines()[0]
        evaluator = ps.Evaluator(model, batches, "loss")
        started = time.perf_counter()
        with pytest.raises(ps.PrunescopeError, match="in use by another scan") as info:
            ps.scan(model, evaluator, levels=[0.5, 0.9], criterion="random", store=store)
        assert time.perf_counter() - started < 30, "refused at once, not after waiting"
        assert str(store) in str(info.value) and f"pid {child.pid}" in str(info.value)
        assert store.read_text().splitlines()[0] == header, "the refused scan changed the store"
        with pytest.raises(ps.PrunescopeError, match="in use by another scan"):
            check_store_free(store)  # the CLI's check before any work
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # kill -9 left no stale lock: the store opens (and resumes) again
    with CellStore(store, json.loads(header)["fingerprint"]) as reopened:
        assert len(reopened.cells) >= 1


def test_store_is_held_until_closed_even_within_one_process(tmp_path):
    path = tmp_path / "s.jsonl"
    first = CellStore(path, {"model": "m"})
    assert_refused(lambda: CellStore(path, {"model": "m"}), "in use by another scan", tmp_path)
    first.close()
    with CellStore(path, {"model": "m"}) as second:
        assert second.cells == {}
    assert_refused(lambda: second.append(ps.Cell("a", "0.5", 0.5, 1.0, 0.0, None, None, 1, 0.0)), "is closed", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"], "a lock file or temporary file was left"


def test_scan_releases_the_store_when_it_fails(small_cnn, tmp_path):
    model, batches = small_cnn
    store = tmp_path / "s.jsonl"

    def failing(output, batch):
        failing.calls += 1
        if failing.calls > 3:
            raise RuntimeError("boom")
        return torch.nn.functional.cross_entropy(output, batch[1], reduction="none")

    failing.calls = 0
    with pytest.raises(ps.PrunescopeError, match="boom"):
        ps.scan(model, ps.Evaluator(model, batches, failing, higher_is_better=False), levels=[0.5], store=store)
    with CellStore(store, json.loads(store.read_text().splitlines()[0])["fingerprint"]):
        pass  # not held any more


# ---- 4. the evaluator's own model --------------------------------------------------------------------


def test_scan_and_estimate_refuse_a_model_that_is_not_the_evaluators(small_cnn, tmp_path):
    model, batches = small_cnn
    other = copy.deepcopy(model)
    evaluator = ps.Evaluator(model, batches, "loss")
    store = tmp_path / "s.jsonl"
    assert_refused(lambda: ps.scan(other, evaluator, levels=[0.5], store=store), "not the evaluator's", tmp_path, store)
    assert_refused(lambda: ps.estimate(other, evaluator, score="fisher", levels=[0.5]), "not the evaluator's", tmp_path)


# ---- 5. arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--samples", "-5"), "samples must be a whole number >= 1; got -5"),
        (("--samples", "0"), "samples must be a whole number >= 1; got 0"),
        (("--batch-size", "0"), "batch_size must be a whole number >= 1; got 0"),
        (("--cache-mb", "-1"), "--cache-mb must be a whole number >= 0; got -1"),
        (("--seed", "-1"), "--seed must be a whole number >= 0"),
        (("--seq-len", "0"), "seq_len must be a whole number >= 1"),
        (("--split", "banana"), "--split 'banana'; accepted: val, test, train"),
        (("--levels", "0.1:x:0.1"), "level range '0.1:x:0.1' must be start:stop:step"),
        (("--levels", "0.9:0.1:0.1"), "start <= stop"),
        (("--levels", "0.1:0.9:0.0000001"), "at most 1000"),
        (("--criterion", "bn_scale"), "criterion 'bn_scale' applies to channel targets, not weight targets"),
        (("--granularity", "head", "--criterion", "bn_scale"), "applies to channel targets, not head targets"),
        (("--granularity", "channel", "--criterion", "wanda"), "criterion 'wanda' applies to weight targets, not channel"),
        (("--granularity", "atoms"), "granularity 'atoms' is not supported"),
        (("--head-mode", "all"), "unknown head_mode 'all'"),
        (("--round-to", "0"), "--round-to must be a whole number >= 1"),
        (("--mode", "fast"), "unknown --mode 'fast'"),
        (("--max-drop", "-1"), "--max-drop must be positive"),
        (("--metric", "f1"), "unknown metric 'f1'"),
    ],
)
def test_scan_options_are_refused_before_the_model_is_loaded(tmp_path, args, message):
    out = tmp_path / "p.json"
    result = invoke("scan", *args, "--model", "python:test_validation:counted_model", "--out", out, "--store", tmp_path / "s.jsonl")
    refused_by_cli(result, message)
    assert FACTORY_CALLS == [], "the model was loaded before a cheap check"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--score", "telepathy"), "unknown estimate score 'telepathy'"),
        (("--score", "block_influence"), "does not apply to weight targets"),
        (("--granularity", "head", "--criterion", "bn_scale"), "applies to channel targets, not head targets"),
        (("--samples", "0"), "samples must be a whole number >= 1"),
        (("--levels", "0.1:x:0.1"), "must be start:stop:step"),
    ],
)
def test_estimate_options_are_refused_before_the_model_is_loaded(tmp_path, args, message):
    result = invoke("estimate", *args, "--model", "python:test_validation:counted_model", "--out", tmp_path / "e.json")
    refused_by_cli(result, message)
    assert FACTORY_CALLS == [], "the model was loaded before a cheap check"
    assert not (tmp_path / "e.json").exists()


FACTORY_CALLS: list[int] = []


def counted_model():
    """A python:MODULE:FUNCTION factory that records each call."""
    FACTORY_CALLS.append(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(8, 6)
    return model, ps.Evaluator(model, [(x, x[:, :3].argmax(dim=1))], "loss")


@pytest.fixture(autouse=True)
def _reset_factory_calls():
    FACTORY_CALLS.clear()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("scan", "--samples", "500", "--levels", "0.5"), "the digits val split has 360 images; asked for 500 samples"),
        (("scan", "--data", "random:-1,8,8", "--model", "python:test_validation:counted_model", "--levels", "0.5"),
         "random input shape (-1, 8, 8) must be whole numbers >= 1"),
        (("scan", "--data", "random:3,x", "--model", "python:test_validation:counted_model"), "random:C,H,W with integers"),
        (("scan", "--model", "python:test_validation:raising_factory"), "model factory test_validation:raising_factory raised KeyError"),
        (("scan", "--model", "python:test_validation:meta_factory"), "meta device"),
        (("scan", "--model", "python:test_validation:three_things"), "returned a tuple of 3"),
        (("scan", "--model", "python:test_validation:mismatched_labels"), "batch 0 has 8 inputs but 3 labels"),
        (("scan", "--model", "python:test_validation:label_out_of_range", "--levels", "0.5"),
         "label 7 is out of range for the loss metric: the model has 3 classes"),
        (("demo", "--epochs", "0"), "epochs must be a whole number >= 1; got 0"),
        (("prune", "--calibration-samples", "0", "--level", "0.5"), "--calibration-samples must be a whole number >= 1"),
    ],
)
def test_bad_arguments_are_one_line_not_a_traceback(tmp_path, args, message):
    out = tmp_path / "out"
    result = invoke(*args, "--out", out)
    refused_by_cli(result, message)
    assert not out.exists()


def raising_factory():
    return {}["no such key"]


def meta_factory():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def three_things():
    model = torch.nn.Linear(3, 2)
    return model, None, "extra"


def mismatched_labels():
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, ps.Evaluator(model, [(torch.randn(8, 6), torch.tensor([0, 1, 2]))], "loss")


def label_out_of_range():
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, ps.Evaluator(model, [(torch.randn(8, 6), torch.tensor([0, 1, 2, 7, 0, 1, 2, 0]))], "loss")


@pytest.mark.parametrize("where", ["folder", "below a file", "store folder"])
def test_unwritable_out_or_store_is_refused_before_any_work(tmp_path, where):
    (tmp_path / "taken").mkdir()
    (tmp_path / "file.txt").write_text("mine")
    out, store = tmp_path / "p.json", tmp_path / "s.jsonl"
    if where == "folder":
        out = tmp_path / "taken"
    elif where == "below a file":
        out = tmp_path / "file.txt" / "p.json"
    else:
        store = tmp_path / "taken"
    result = invoke("scan", "--model", "python:test_validation:counted_model", "--levels", "0.5", "--out", out, "--store", store)
    refused_by_cli(result, "folder" if where != "below a file" else "is a file, not a folder")
    assert FACTORY_CALLS == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "taken"] and not any((tmp_path / "taken").iterdir())


@pytest.mark.parametrize("command", [("prune", "--level", "0.5"), ("report",), ("demo",)])
def test_an_existing_file_where_a_folder_is_expected_is_refused(tmp_path, command):
    taken = tmp_path / "file.txt"
    taken.write_text("mine")
    refused_by_cli(invoke(*command, "--out", taken), "is a file; give a folder path")
    assert taken.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_is_refused_before_the_scan(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = invoke("scan", "--model", "python:test_validation:counted_model", "--levels", "0.5", "--out", folder / "p.json")
        refused_by_cli(result, "is not writable")
        assert FACTORY_CALLS == []
    finally:
        folder.chmod(0o700)


def test_api_arguments_raise_prunescope_errors(small_cnn, tmp_path):
    from prunescope.data import load_data, random_inputs
    from prunescope.demo import run_demo
    from prunescope.models import LoadedModel

    model, batches = small_cnn
    loaded = LoadedModel(model, "custom", "vision")
    for kwargs, message in [({"samples": -5}, "samples"), ({"samples": 0}, "samples"), ({"batch_size": 0}, "batch_size"),
                            ({"samples": 2.5}, "samples"), ({"seq_len": 0}, "seq_len")]:
        assert_refused(lambda kwargs=kwargs: load_data("digits", loaded, **kwargs), message, tmp_path)
    assert_refused(lambda: load_data("random:-1,8,8", loaded), "whole numbers >= 1", tmp_path)
    assert_refused(lambda: random_inputs((3, 100000, 100000), 16, 8), "GB", tmp_path)
    assert_refused(lambda: run_demo(tmp_path / "demo", epochs=0, progress=False), "epochs", tmp_path)
    evaluator = ps.Evaluator(model, batches, "loss")
    assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5], cache_bytes=-1), "cache_bytes", tmp_path)
    assert_refused(lambda: ps.scan(model, evaluator, levels=[0.5], seed=-1), "seed", tmp_path)
    assert_refused(lambda: ps.scan(model, evaluator, levels=None), "levels is None", tmp_path)
    assert_refused(lambda: ps.parse_level(None), "level None", tmp_path)
    assert_refused(lambda: ps.find_targets("abc"), "must be a torch.nn.Module", tmp_path)
    assert_refused(lambda: ps.find_targets(model, "abc"), "granularity 'abc'", tmp_path)
    assert_refused(lambda: ps.find_targets(model, include=5), "include must be a glob pattern", tmp_path)
    assert_refused(lambda: ps.find_targets(model, exclude=[None]), "exclude patterns must be strings", tmp_path)


def test_evaluator_refuses_bad_models_batches_and_labels(small_cnn, tmp_path):
    model, batches = small_cnn
    with torch.device("meta"):
        ghost = DigitsCNN(width=4)
    assert_refused(lambda: ps.Evaluator(ghost, batches, "loss"), "meta device", tmp_path)
    assert_refused(lambda: ps.Evaluator("model", batches, "loss"), "torch.nn.Module", tmp_path)
    assert_refused(lambda: ps.Evaluator(model, batches[0][0], "kl"), "wrap it as", tmp_path)
    assert_refused(lambda: ps.Evaluator(model, [42], "kl"), "batch 0: unsupported batch", tmp_path)
    x, y = batches[0]
    assert_refused(lambda: ps.Evaluator(model, [(x, y[:3])], "loss"), "6 inputs but 3 labels", tmp_path)
    # labels of the right count but the wrong shape would broadcast into a silent wrong accuracy
    assert_refused(lambda: ps.Evaluator(model, [(x, y.view(6, 1))], "accuracy").evaluate(), re.escape("need (6,)"), tmp_path)
    assert_refused(lambda: ps.Evaluator(model, [(x, y.float())], "accuracy").evaluate(), "integer class labels", tmp_path)
    wrong = y.clone()
    wrong[2] = 12
    message = assert_refused(lambda: ps.Evaluator(model, [(x, wrong)], "loss").evaluate(), "label 12 is out of range", tmp_path)
    assert "batch 0" in message and "10 classes" in message

    def two_values(output, batch):
        return output[:2, 0]

    assert_refused(lambda: ps.Evaluator(model, batches, two_values, higher_is_better=True).evaluate(),
                   "returned 2 values for a batch of 6 samples", tmp_path)

    def broken(output, batch):
        raise KeyError("labels")

    assert "KeyError" in assert_refused(lambda: ps.Evaluator(model, batches, broken, higher_is_better=True).evaluate(),
                                        "metric 'broken' failed on batch 0", tmp_path)


def test_perplexity_past_exp_overflow_is_infinite_not_an_error():
    from prunescope.metrics import BUILTIN_METRICS

    assert BUILTIN_METRICS["perplexity"].aggregate(800.0) == math.inf
    assert BUILTIN_METRICS["perplexity"].aggregate(1.0) == pytest.approx(math.e)


# ---- 6. error text printed literally -------------------------------------------------------------------


def two_d_model():
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    return model, ps.Evaluator(model, [torch.randn(4, 6)], "perplexity")


def test_error_text_with_square_brackets_and_colons_is_printed_literally(tmp_path):
    result = invoke("scan", "--model", "python:test_validation:two_d_model", "--levels", "0.5", "--exclude", "none",
                    "--out", tmp_path / "p.json")
    refused_by_cli(result, "causal-LM logits [batch, tokens, vocab]")
    result = invoke("scan", "--levels", "0.1:x:0.1", "--out", tmp_path / "p.json")
    refused_by_cli(result, "'0.1:x:0.1'")  # not turned into an emoji


# ---- 7. unit levels every group can take (defect 5) ---------------------------------------------------------


class CountingEvaluator(ps.Evaluator):
    """Counts evaluation passes, so a test can tell a refusal came before the dense evaluation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def evaluate(self, *args, **kwargs):
        self.calls += 1
        return super().evaluate(*args, **kwargs)


LLAMA_EVALUATORS: list[CountingEvaluator] = []


def llama_with_two_kv_groups():
    """A python: factory: a tiny Llama with 2 KV heads and token windows."""
    model = tiny_llama()
    evaluator = CountingEvaluator(model, token_batches(count=1, batch=2, length=8), "perplexity")
    LLAMA_EVALUATORS.append(evaluator)
    return model, evaluator


def test_head_scan_with_default_levels_uses_the_levels_every_group_can_take(tmp_path):
    out = tmp_path / "p.json"
    result = invoke("scan", "--model", "python:test_validation:llama_with_two_kv_groups", "--granularity", "head", "--out", out)
    assert result.exit_code == 0, result.output
    assert "levels: 0.5 (the fractions every head group can lose; the smallest has 2 units" in " ".join(result.output.split())
    profile = ps.Profile.load(out)
    assert profile.levels == ["0.5"] and {c.sparsity for c in profile.cells} == {0.5}


def test_head_levels_a_group_cannot_take_are_refused_before_the_dense_evaluation(tmp_path):
    LLAMA_EVALUATORS.clear()
    result = invoke("scan", "--model", "python:test_validation:llama_with_two_kv_groups", "--granularity", "head",
                    "--levels", "0.5,0.8", "--out", tmp_path / "p.json")
    text = refused_by_cli(result, "level 0.8 cannot apply to head group model.layers.0.self_attn")
    assert "2 units" in text and "levels every group can take: 0.5" in text
    assert LLAMA_EVALUATORS[-1].calls == 0, "the dense model was evaluated before the refusal"
    assert not (tmp_path / "p.json").exists()

    model = tiny_llama()
    evaluator = CountingEvaluator(model, token_batches(count=1, batch=2, length=8), "perplexity")
    heads = ps.find_targets(model, "head")
    for levels, problem in [([0.1, 0.5], "level 0.1 cannot apply to head group model.layers.0.self_attn: it removes none of its 2 units"),
                            (DEFAULT_LEVELS, "cannot apply to head group")]:
        message = assert_refused(lambda levels=levels: ps.scan(model, evaluator, heads, levels=levels), problem, tmp_path)
        assert "levels every group can take: 0.5" in message
    assert evaluator.calls == 0
    assert [c.level for c in ps.scan(model, evaluator, heads, levels=[0.5]).cells] == ["0.5", "0.5"]


def test_unit_levels_fit_the_smallest_group(small_cnn):
    from prunescope.scan_checks import unit_levels

    model, batches = small_cnn
    channels = ps.find_targets(model, "channel", example=batches[0])  # the smallest group has 4 channels
    assert min(t.group.units for t in channels) == 4
    assert unit_levels(channels) == [0.25, 0.5, 0.75]
    assert unit_levels(ps.find_targets(DigitsCNN(width=32), "channel", example=batches[0])) == list(DEFAULT_LEVELS)
    assert unit_levels(ps.find_targets(tiny_llama(), "neuron")) == list(DEFAULT_LEVELS)
