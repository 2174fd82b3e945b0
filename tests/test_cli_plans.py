"""The command line's plan makers on a tiny Llama: plan (owl, --check, --plan P --check), prune of a
SparseGPT plan, and search (budget met, resumed from its state), each refusing bad options before loading."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _save_tiny_hf_llm, invoke

import prunescope as ps
from prunescope.data import oneshot_data
from prunescope.models import load_model

SEQ_LEN = 16
CALIBRATION = 4
GRID = "0.3,0.4,0.5,0.6,0.7"


def exploding_model():
    """A python:MODULE:FUNCTION factory that fails: an option refused before it is called never shows this."""
    raise RuntimeError("the model was loaded")


EXPLODING = "python:test_cli_plans:exploding_model"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny Llama folder, a 1,200-word text (75 windows of 16 tokens) and its SparseGPT profile."""
    folder = tmp_path_factory.mktemp("plans")
    words = _save_tiny_hf_llm(folder / "llm")
    text = folder / "corpus.txt"
    generator = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (1200,), generator=generator)))
    common = ("--model", f"hf:{folder / 'llm'}", "--data", f"text:{text}", "--seq-len", SEQ_LEN)
    profile = folder / "profile.json"
    result = invoke("scan", *common, "--samples", 4, "--criterion", "sparsegpt", "--levels", GRID, "--out", profile)
    assert result.exit_code == 0, result.output
    return {"common": common, "profile": profile, "spec": f"hf:{folder / 'llm'}", "text": text}


def _held_apart(llm):
    """The calibration and evaluation batches prune --level uses on the same text."""
    loaded = load_model(llm["spec"])
    calibration, evaluation = oneshot_data(f"text:{llm['text']}", loaded, calibration_samples=CALIBRATION, seq_len=SEQ_LEN)
    return loaded.model, calibration.batches, evaluation.batches


def _words(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("plan", "--sparsity", 0.5, "--method", "banana"), "unknown --method 'banana'; accepted: uniform, global_magnitude"),
        (("plan", "--sparsity", 0.5, "--method", "lamp"), "--method lamp needs --model"),
        (("plan", "--sparsity", 0.5, "--method", "owl", "--model", EXPLODING, "--owl-lambda", 0.9), "owl_lambda must be a number in [0, 0.5]"),
        (("plan", "--sparsity", 0.5, "--owl-m", 3), "--owl-m and --owl-lambda go with --method owl"),
        (("plan", "--sparsity", 0.5, "--method", "owl", "--model", EXPLODING, "--grid-step", 0.1), "grid_step is a setting of method 'knapsack'"),
        (("plan", "--sparsity", 0.5, "--check", "--model", EXPLODING, "--data", "text:/no/such.txt"), "text file '/no/such.txt' does not exist"),
        (("plan", "--sparsity", 0.5, "--check", "--model", EXPLODING, "--calibration-samples", 0), "--calibration-samples must be a whole number >= 1"),
        (("plan", "--sparsity", 0.5, "--check", "--model", EXPLODING, "--metric", "banana"), "unknown metric 'banana'"),
        (("plan", "--params", 0.5, "--method", "owl", "--model", EXPLODING), "--method owl meets a --sparsity budget only"),
        (("plan", "--plan", "p.json", "--model", EXPLODING), "--plan checks an existing plan: it goes with --check"),
        (("plan", "--plan", "p.json", "--check", "--sparsity", 0.5, "--model", EXPLODING), "takes no --sparsity"),
        (("search", "--model", EXPLODING, "--evaluations", 10), "--sparsity is required"),
        (("search", "--sparsity", 0.5, "--model", EXPLODING), "a search needs a limit"),
        (("search", "--sparsity", 0.5, "--model", EXPLODING, "--evaluations", 10, "--levels", "0.3,0.5,0.6"), "ascending and equally spaced"),
        (("search", "--sparsity", 0.42, "--model", EXPLODING, "--evaluations", 10), "no plan on the grid 0.3, 0.4, 0.5, 0.6, 0.7 removes exactly 42"),
        (("search", "--sparsity", 0.5, "--model", EXPLODING, "--evaluations", 10, "--start", "cold"), "unknown search start 'cold'"),
        (("search", "--sparsity", 0.5, "--model", EXPLODING, "--evaluations", 10, "--data", "digits"), "--data pydoc or text:FILE; got 'digits'"),
        (("search", "--sparsity", 0.5, "--model", EXPLODING, "--evaluations", 10, "--survivors", 0), "survivors must be a whole number >= 1"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_the_model_loads(llm, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # a relative --plan p.json, and nothing written here
    out = tmp_path / "out.json"
    result = invoke(*args, "--profile", llm["profile"], "--out", out)
    assert result.exit_code == 2, result.output
    assert message in _words(result.output)
    assert _words(result.output).startswith("error: ") and result.output.count("error") == 1  # one message, wrapped by the console
    assert "was loaded" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_owl_plan_from_the_cli_meets_the_budget_with_block_dependent_levels(llm, tmp_path):
    out = tmp_path / "owl.json"
    result = invoke("plan", *llm["common"], "--profile", llm["profile"], "--sparsity", 0.5, "--method", "owl",
                    "--calibration-samples", CALIBRATION, "--owl-lambda", 0.1, "--out", out)
    assert result.exit_code == 0, result.output
    plan = ps.Plan.load(out)
    assert plan.method == "owl" and plan.criterion == "sparsegpt"
    assert plan.sparsity == pytest.approx(0.5, abs=1e-6)
    blocks = {name.split(".")[2]: level for name, level in plan.levels.items()}  # model.layers.<i>.*: one level per block
    assert len(set(blocks.values())) == 2 and all(abs(level - 0.5) <= 0.1 + 1e-9 for level in blocks.values())


def test_plan_check_prints_the_measured_drop_and_writes_it_into_the_plan(llm, tmp_path):
    out = tmp_path / "plan.json"
    result = invoke("plan", *llm["common"], "--profile", llm["profile"], "--sparsity", 0.5, "--calibration-samples", CALIBRATION,
                    "--check", "--out", out)
    assert result.exit_code == 0, result.output
    plan = ps.Plan.load(out)
    check = plan.details["check"]
    assert check["metric"] == "perplexity" == plan.metric  # the profile's metric, so the ratio compares like with like
    assert check["predicted"] == pytest.approx(plan.predicted_drop)
    assert check["ratio"] == pytest.approx(check["predicted"] / check["measured"])
    assert check["ci_low"] <= check["measured"] <= check["ci_high"]
    assert "windows 0..3" in check["data"] and "windows 37..40" in check["data"]  # calibration and evaluation halves apart
    assert f"check: perplexity {check['dense']:.4g} -> {check['pruned']:.4g}: measured drop" in _words(result.output)
    assert "predicted/measured" in result.output
    model, calibration, evaluation = _held_apart(llm)  # the check applied the plan as prune will: calibrated block by block
    evaluator = ps.Evaluator(model, evaluation, "perplexity")
    assert check["pruned"] == pytest.approx(evaluator.evaluate(ps.apply(model, plan, calibration=calibration)).value, rel=1e-5)
    assert check["dense"] == pytest.approx(evaluator.dense.value, rel=1e-6)

    uniform = tmp_path / "uniform.json"  # a plan file made before: --plan P --check writes its check into P
    assert invoke("plan", "--profile", llm["profile"], "--sparsity", 0.5, "--method", "uniform", "--out", uniform).exit_code == 0
    assert "check" not in ps.Plan.load(uniform).details
    result = invoke("plan", *llm["common"], "--plan", uniform, "--check", "--calibration-samples", CALIBRATION)
    assert result.exit_code == 0, result.output
    checked = ps.Plan.load(uniform)
    assert checked.method == "uniform" and checked.details["check"]["dense"] == pytest.approx(check["dense"])
    assert "check: perplexity" in result.output
    report = invoke("report", "--profile", llm["profile"], "--plan", out, "--out", tmp_path / "report")
    assert report.exit_code == 0, report.output
    assert f"plan check: perplexity {check['dense']:.4g} -> {check['pruned']:.4g}" in _words(report.output)


def test_prune_applies_a_sparsegpt_plan_calibrated_on_the_texts_first_half(llm, tmp_path):
    plan_file, out = tmp_path / "plan.json", tmp_path / "pruned"
    assert invoke("plan", "--profile", llm["profile"], "--sparsity", 0.5, "--out", plan_file).exit_code == 0
    result = invoke("prune", *llm["common"], "--plan", plan_file, "--calibration-samples", CALIBRATION, "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["pruned"] != summary["dense"]
    plan = ps.Plan.load(plan_file)
    model, calibration, evaluation = _held_apart(llm)
    expected = ps.apply(model, plan, calibration=calibration)
    weights = load_file(out / "model.safetensors")
    for name, level in plan.levels.items():
        saved = weights[f"{name}.weight"]
        assert torch.allclose(saved, expected.get_submodule(name).weight, atol=1e-6, rtol=0), name
        assert float((saved == 0).float().mean()) == pytest.approx(level, abs=1 / saved.numel() + 1e-3), name
    assert summary["pruned"] == pytest.approx(ps.Evaluator(model, evaluation, "perplexity").evaluate(expected).value, rel=1e-5)


def test_search_meets_the_budget_and_resumes_from_its_state(llm, tmp_path):
    state, out = tmp_path / "state.json", tmp_path / "search.json"
    common = (*llm["common"], "--profile", llm["profile"], "--sparsity", 0.5, "--levels", GRID, "--calibration-samples", CALIBRATION,
              "--fitness-samples", 4, "--offspring", 4, "--survivors", 2, "--state", state, "--out", out)
    result = invoke("search", *common, "--evaluations", 12, "--check")  # the start, then 1 generation of 4 + 2 evaluations
    assert result.exit_code == 0, result.output
    first = ps.Plan.load(out)
    assert first.method == "search" and first.sparsity == pytest.approx(0.5, abs=1e-9)
    assert first.details["generations"] == 1 and first.details["evaluations"] == 7
    assert first.details["fitness_end"] <= first.details["fitness_start"]
    assert "resumed" not in result.output and "search from the profile start: fitness" in _words(result.output)
    assert "check: perplexity" in result.output and first.details["check"]["data"].startswith("evaluation on ")
    assert json.loads(state.read_text())["generation"] == 1

    result = invoke("search", *common, "--evaluations", 25)
    assert result.exit_code == 0, result.output
    assert f"resumed the search in {state} from generation 1" in _words(result.output)
    second = ps.Plan.load(out)
    assert second.details["generations"] == 4 and second.details["evaluations"] == 25
    assert second.details["history"][:2] == first.details["history"]  # continued, not started over
    assert second.sparsity == pytest.approx(0.5, abs=1e-9) and second.details["fitness_end"] <= first.details["fitness_end"]
    assert json.loads(state.read_text())["generation"] == 4

    result = invoke("search", *common, "--evaluations", 25)  # finished: the plan is read back, no bank is built
    assert result.exit_code == 0, result.output
    assert "no variant bank built" in _words(result.output)
    assert ps.Plan.load(out).levels == second.levels
