"""The command line: the demo runs end to end, and scan -> plan -> prune -> report chain together."""

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from prunescope.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_demo_writes_every_artifact_and_beats_uniform(tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out, "--epochs", 8, "--levels", "0.3,0.6,0.9")
    assert result.exit_code == 0, result.output
    for name in ("profile.json", "profile.csv", "plan.json", "sensitivity.png", "heatmap.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())["results"]
    assert abs(summary["threshold"]["sparsity"] - 0.8) < 0.005
    assert summary["threshold"]["val_accuracy"] >= summary["uniform"]["val_accuracy"]
    assert summary["dense"]["test_accuracy"] > 0.9
    assert "uniform" in result.output and "threshold" in result.output


def test_scan_plan_prune_report_chain(tmp_path):
    profile, plan, pruned = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "pruned"
    result = invoke("scan", "--model", "digits-cnn", "--data", "digits", "--levels", "0.5,0.9",
                    "--out", profile, "--store", tmp_path / "store.jsonl")
    assert result.exit_code == 0, result.output
    assert "excluded by default" in result.output and (tmp_path / "p.csv").exists()
    result = invoke("plan", "--profile", profile, "--sparsity", 0.6, "--out", plan)
    assert result.exit_code == 0, result.output
    result = invoke("prune", "--model", "digits-cnn", "--plan", plan, "--data", "digits", "--out", pruned, "--compare-uniform")
    assert result.exit_code == 0, result.output
    weights = load_file(pruned / "model.safetensors")
    levels = json.loads(plan.read_text())["levels"]
    for name, level in levels.items():
        zeros = float((weights[f"{name}.weight"] == 0).float().mean())
        assert abs(zeros - level) < 0.01, name
    summary = json.loads((pruned / "summary.json").read_text())
    assert {"dense", "pruned", "uniform"} <= set(summary)
    result = invoke("report", "--profile", profile, "--plan", plan, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "heatmap.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("scan", "--levels", "0.5,1.5"), "outside (0, 1)"),
        (("scan", "--levels", "4:2"), "malformed"),
        (("scan", "--include", "nothing.*"), "matches no target"),
        (("scan", "--model", "torchvision:no_such_net"), "unknown torchvision model"),
        (("scan", "--model", "banana"), "unknown model spec"),
        (("scan", "--data", "banana"), "unknown data spec"),
        (("scan", "--criterion", "banana"), "unknown criterion"),
    ],
)
def test_cli_bad_input_names_the_problem_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "profile.json"
    result = invoke(*args, "--out", out, "--store", tmp_path / "s.jsonl")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists() and not (tmp_path / "s.jsonl").exists()


def test_plan_refuses_unreachable_budget(tmp_path):
    profile = tmp_path / "p.json"
    assert invoke("scan", "--levels", "0.2,0.4", "--out", profile).exit_code == 0
    result = invoke("plan", "--profile", profile, "--sparsity", 0.8, "--out", tmp_path / "plan.json")
    assert result.exit_code == 2 and "unreachable" in result.output
    assert not (tmp_path / "plan.json").exists()
