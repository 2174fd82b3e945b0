"""The command line: the demo runs end to end, and scan -> plan -> prune -> report chain together."""

import json

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file
from typer.testing import CliRunner

import prunescope as ps
from prunescope.cli import app
from prunescope.digits import batches_of, digits_splits

runner = CliRunner()


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
    structured = json.loads((out / "summary.json").read_text())["structured"]
    dense_flops = structured["dense"]["flops_per_image"]
    assert structured["threshold"]["flops_per_image"] <= 0.52 * dense_flops
    assert structured["threshold"]["params"] < structured["dense"]["params"]
    assert structured["threshold"]["val_accuracy"] >= structured["uniform"]["val_accuracy"]
    shrunk = ps.load(out / "shrunk").eval()
    evaluator = ps.Evaluator(shrunk, batches_of(digits_splits().test), "accuracy")
    assert evaluator.dense.value == pytest.approx(structured["threshold"]["test_accuracy"])


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
    removed = sum(round(level * json.loads(plan.read_text())["params"][name]) for name, level in levels.items())
    assert abs(summary["params_dense"] - summary["params_pruned"] - removed) <= len(levels)  # counted as the model computes
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
        (("scan", "--shard", "2/2"), "0 <= index < count"),
        (("scan", "--shard", "first"), "--shard must be I/N"),
        (("scan", "--mode", "adaptive", "--tolerance", "0.1", "--min-batches", "0"), "min_batches must be a whole number >= 1"),
    ],
)
def test_cli_bad_input_names_the_problem_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "profile.json"
    result = invoke(*args, "--out", out, "--store", tmp_path / "s.jsonl")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists() and not (tmp_path / "s.jsonl").exists()


def test_shard_scans_merge_into_the_single_scan(tmp_path):
    common = ("scan", "--levels", "0.5,0.9", "--samples", 64)
    assert invoke(*common, "--out", tmp_path / "whole.json").exit_code == 0
    for index in range(2):
        result = invoke(*common, "--shard", f"{index}/2", "--out", tmp_path / f"shard{index}.json")
        assert result.exit_code == 0, result.output
    result = invoke("merge", tmp_path / "shard1.json", tmp_path / "shard0.json", "--out", tmp_path / "merged.json")
    assert result.exit_code == 0, result.output
    whole, merged = ps.Profile.load(tmp_path / "whole.json"), ps.Profile.load(tmp_path / "merged.json")
    assert [t.name for t in merged.targets] == [t.name for t in whole.targets]
    assert [(c.target, c.level, c.change) for c in merged.cells] == [(c.target, c.level, c.change) for c in whole.cells]
    result = invoke("merge", tmp_path / "shard0.json", "--out", tmp_path / "half.json")
    assert result.exit_code == 2 and "missing [1]" in result.output and not (tmp_path / "half.json").exists()


def test_plan_refuses_unreachable_budget(tmp_path):
    profile = tmp_path / "p.json"
    assert invoke("scan", "--levels", "0.2,0.4", "--out", profile).exit_code == 0
    result = invoke("plan", "--profile", profile, "--sparsity", 0.8, "--out", tmp_path / "plan.json")
    assert result.exit_code == 2 and "unreachable" in result.output
    assert not (tmp_path / "plan.json").exists()


def _save_tiny_hf_llm(folder):
    """A tiny random Llama and a word-level tokenizer, saved as a plain Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the of and to a in is that for it as with be on not this are by or from".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    tiny_llama().save_pretrained(folder)
    return words


def test_hf_folder_with_text_file_scans_and_prunes(tmp_path):
    words = _save_tiny_hf_llm(tmp_path / "llm")
    text = tmp_path / "corpus.txt"
    generator = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (600,), generator=generator)))
    profile, plan = tmp_path / "p.json", tmp_path / "plan.json"
    common = ("--model", f"hf:{tmp_path / 'llm'}", "--data", f"text:{text}", "--samples", 4, "--seq-len", 32)
    result = invoke("scan", *common, "--levels", "0.3,0.6,2:4", "--out", profile)
    assert result.exit_code == 0, result.output
    loaded = ps.Profile.load(profile)
    assert loaded.metric == "perplexity" and len(loaded.targets) == 14  # 2 blocks x 7 Linear, lm_head excluded
    assert {c.level for c in loaded.cells} == {"0.3", "0.6", "2:4"}
    assert invoke("plan", "--profile", profile, "--sparsity", 0.4, "--out", plan).exit_code == 0
    result = invoke("prune", *common, "--plan", plan, "--out", tmp_path / "pruned")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "pruned" / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["pruned"] != summary["dense"]


def test_torchvision_model_on_random_inputs(tmp_path):
    out = tmp_path / "p.json"
    result = invoke("scan", "--model", "torchvision:resnet18", "--data", "random:3,32,32", "--samples", 4,
                    "--levels", "0.5", "--include", "layer4.*", "--out", out)
    assert result.exit_code == 0, result.output
    profile = ps.Profile.load(out)
    assert profile.metric == "kl" and all(t.name.startswith("layer4.") for t in profile.targets)
    assert all(c.change >= 0 for c in profile.cells)  # KL to the dense outputs cannot be negative


def make_user_model():
    """A python:MODULE:FUNCTION factory, as a user would write one: returns (model, evaluator)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(32, 6)
    return model, ps.Evaluator(model, [(x, x[:, :3].argmax(dim=1))], metric="loss")


def test_python_factory_spec_needs_no_data(tmp_path):
    out = tmp_path / "p.json"
    result = invoke("scan", "--model", "python:test_cli:make_user_model", "--levels", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    profile = ps.Profile.load(out)
    assert profile.metric == "loss" and [t.name for t in profile.targets] == ["0"]
