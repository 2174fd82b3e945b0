"""estimate: gradient scores equal finite-difference and autograd references, activation scores equal
direct computations, the model is left bit-identical, and estimated profiles work downstream."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, mixed_mode, snapshot, tiny_llama, token_batches
from torch import nn
from typer.testing import CliRunner

import prunescope as ps
from prunescope.cli import app
from prunescope.structured import units_removed

# ---- tiny models ---------------------------------------------------------------------------


def mlp_and_batches(seed: int = 0, batches: int = 3, size: int = 10):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    generator = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(size, 6, generator=generator), torch.randint(0, 5, (size,), generator=generator)) for _ in range(batches)]
    return model, data


def mean_loss(model, data) -> float:
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def removed_of(weight, level=0.5, key=""):
    return ~ps.keep_mask(weight, level, "magnitude", 1, key=key)


def nll_change(profile, cell) -> float:
    """A perplexity cell's change as the change of the mean token NLL (inverts exp)."""
    return math.log1p(cell.change / profile.dense_value)


# ---- gradient scores against references ----------------------------------------------------


def test_taylor_is_the_directional_derivative_of_the_loss():
    model, data = mlp_and_batches()
    target = ps.find_targets(model, include="0")[0]
    profile = ps.estimate(model, ps.Evaluator(model, data, "loss"), [target], score="taylor", levels=[0.5])
    weight = model[0].weight
    removed = removed_of(weight, key="0")
    step = 1e-3

    def loss_at(t: float) -> float:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            moved[0].weight -= t * weight.detach() * removed
        return mean_loss(moved, data)

    derivative = (loss_at(step) - loss_at(-step)) / (2 * step)
    assert abs(derivative) > 1e-3
    assert profile.cells[0].change == pytest.approx(derivative, rel=2e-2)


def test_taylor_for_neurons_is_the_derivative_of_scaling_their_columns():
    model = tiny_llama()
    batches = token_batches()
    target = ps.find_targets(model, "neuron")[0]
    profile = ps.estimate(model, ps.Evaluator(model, batches, "perplexity"), [target], score="taylor", levels=[0.5])
    remove = units_removed(model, target, 0.5, "magnitude")
    reference = copy.deepcopy(model).double()  # the derivative in float64: the change is ~1e-4 nats
    step = 1e-3

    def nll_at(t: float) -> float:
        moved = copy.deepcopy(reference)
        down = moved.model.layers[0].mlp.down_proj.weight
        with torch.no_grad():
            down[:, remove] *= 1 - t
            ids = torch.cat([b["input_ids"] for b in batches])
            logits = moved(input_ids=ids).logits[:, :-1]
            return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))

    derivative = (nll_at(step) - nll_at(-step)) / (2 * step)
    assert abs(derivative) > 1e-4
    assert nll_change(profile, profile.cells[0]) == pytest.approx(derivative, rel=2e-2)


def test_snip_sums_abs_g_w_of_the_full_data_gradient():
    model, data = mlp_and_batches()
    target = ps.find_targets(model, include="2", exclude=[])[0]
    profile = ps.estimate(model, ps.Evaluator(model, data, "loss"), [target], score="snip", levels=[0.3, 0.7])
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), [model[2].weight])
    for cell, level in zip(profile.cells, (0.3, 0.7), strict=True):
        expected = float((grad * model[2].weight.detach()).abs()[removed_of(model[2].weight, level, "2")].sum())
        assert cell.value == pytest.approx(expected, rel=1e-5)
        assert ps.Profile.drop(profile, cell) == cell.value  # a loss: drop = score


def test_fisher_is_half_the_per_sample_fisher_times_w_squared():
    model, data = mlp_and_batches()
    target = ps.find_targets(model, include="0")[0]
    profile = ps.estimate(model, ps.Evaluator(model, data, "loss"), [target], score="fisher", levels=[0.5])
    weight = model[0].weight
    squares = torch.zeros_like(weight)
    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(len(y))]
    for x, y in samples:
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [weight])
        squares += g.square()
    expected = float((0.5 * squares / len(samples) * weight.detach().square())[removed_of(weight, key="0")].sum())
    assert profile.cells[0].change == pytest.approx(expected, rel=1e-5)
    assert profile.provenance["units"] == "predicted change of loss"


def test_fisher_on_sequences_squares_the_summed_token_nll_gradient():
    model = tiny_llama()
    batches = token_batches(count=1, batch=3)
    target = ps.find_targets(model, include="model.layers.1.self_attn.v_proj")[0]
    profile = ps.estimate(model, ps.Evaluator(model, batches, "perplexity"), [target], score="fisher", levels=[0.5])
    weight = model.get_submodule(target.name).weight
    squares, tokens = torch.zeros_like(weight), 0
    ids = batches[0]["input_ids"]
    for row in ids:
        logits = model(input_ids=row[None]).logits[0, :-1]
        (g,) = torch.autograd.grad(F.cross_entropy(logits, row[1:], reduction="sum"), [weight])
        squares += g.square()
        tokens += row.numel() - 1
    expected = float((0.5 * squares / tokens * weight.detach().square())[removed_of(weight, key=target.name)].sum())
    assert nll_change(profile, profile.cells[0]) == pytest.approx(expected, rel=1e-4)


def test_kl_fisher_matches_the_closed_form_fisher_of_softmax_regression():
    """For logits W x, the Fisher of log p(y|x) with y drawn from the model is x_j^2 p_k (1 - p_k)
    on the diagonal; the sampled-label estimate must approach it (and predict KL in nats)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    x = torch.randn(1200, 4, generator=torch.Generator().manual_seed(3))
    batches = [x[i : i + 200] for i in range(0, len(x), 200)]
    target = ps.find_targets(model, exclude=[])[0]
    profile = ps.estimate(model, batches, [target], score="fisher", levels=[0.5])
    assert profile.metric == "kl" and profile.provenance["units"] == "predicted change of kl"
    with torch.no_grad():
        p = model(x).softmax(-1)
        fisher = (p * (1 - p)).t() @ x.square() / len(x)  # [out, in]
        w = model[0].weight.detach()
    expected = float((0.5 * fisher * w.square())[removed_of(w)].sum())
    assert profile.cells[0].change == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("head_mode", ["kv_group", "query"])
def test_head_importance_is_the_mean_abs_gradient_of_a_head_gate(head_mode):
    model = tiny_llama()
    batches = token_batches(count=1, batch=3)
    target = ps.find_targets(model, "head", head_mode=head_mode)[1]
    profile = ps.estimate(model, ps.Evaluator(model, batches, "perplexity"), [target], score="head_importance", levels=[0.5])
    attention = model.model.layers[1].self_attn
    gate = torch.ones(target.group.units, requires_grad=True)
    d, per_group = attention.head_dim, attention.num_key_value_groups if hasattr(attention, "num_key_value_groups") else 2

    def gated(_module, args):
        x = args[0]
        if head_mode == "kv_group":
            scale = gate.repeat_interleave(per_group * d)
        else:
            scale = gate.repeat_interleave(d).repeat(x.shape[-1] // (per_group * d))
        return (x * scale,)

    handle = attention.o_proj.register_forward_pre_hook(gated)
    try:
        total, tokens = torch.zeros(target.group.units, dtype=torch.float64), 0
        for row in batches[0]["input_ids"]:
            logits = model(input_ids=row[None]).logits[0, :-1]
            (g,) = torch.autograd.grad(F.cross_entropy(logits, row[1:]), [gate])
            total += (row.numel() - 1) * g.abs().double()
            tokens += row.numel() - 1
    finally:
        handle.remove()
    importance = total / tokens
    remove = units_removed(model, target, 0.5, "magnitude")
    assert len(remove) == 1
    assert profile.cells[0].value == pytest.approx(float(importance[remove].sum()), rel=1e-4)


def test_block_influence_is_one_minus_the_cosine_of_hidden_states():
    model = tiny_llama()
    batches = token_batches(count=2, batch=2)
    targets = ps.find_targets(model, "block")
    profile = ps.estimate(model, ps.Evaluator(model, batches, "perplexity"), targets, score="block_influence", levels=[0.5])
    cosines = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states
            cosines.append(F.cosine_similarity(hidden[0], hidden[1], dim=-1).flatten())
    expected = 1 - float(torch.cat(cosines).double().mean())
    cell = profile.cell("model.layers.0", "1")
    assert cell.value == pytest.approx(expected, rel=1e-5)
    assert profile.levels == ["1"]


# ---- activation-based scores against direct computations ----------------------------------


def test_wanda_on_a_conv_sums_w2_times_shifted_input_energy(small_cnn):
    model, batches = small_cnn
    target = ps.find_targets(model, include="features.3", example=batches[0])[0]
    profile = ps.estimate(model, ps.Evaluator(model, batches, "loss"), [target], score="wanda", levels=[0.5])
    conv = model.features[3]
    inputs = []
    handle = conv.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    x = torch.cat(inputs).double()
    padded = F.pad(x, (1, 1, 1, 1))
    height, width = x.shape[2:]
    energy = torch.stack([torch.stack([padded[:, :, a : a + height, b : b + width].square().sum((0, 2, 3)) for b in range(3)], -1)
                          for a in range(3)], -2)  # [in, 3, 3]: sum over positions of the input each kernel tap reads
    rows = x.shape[0] * height * width
    w = conv.weight.detach().double()
    expected = float((w.square() * energy.unsqueeze(0) / rows)[removed_of(conv.weight, key="features.3")].sum())
    assert profile.cells[0].value == pytest.approx(expected, rel=1e-6)


def test_obs_error_is_the_output_error_sparsegpt_leaves():
    from prunescope.oneshot.sparsegpt import sparsegpt_prune

    model, data = mlp_and_batches()
    target = ps.find_targets(model, include="2", exclude=[])[0]
    profile = ps.estimate(model, ps.Evaluator(model, data, "loss"), [target], score="obs", levels=[0.5], damp=0.0)
    with torch.no_grad():
        x = torch.tanh(model[0](torch.cat([b[0] for b in data]))).double()
        pruned = sparsegpt_prune(model[2].weight.double(), x.t() @ x, 0.5, damp=0.0).weight
        error = float((x @ (model[2].weight.double() - pruned).t()).square().sum()) / len(x)
    assert (pruned == 0).double().mean() == pytest.approx(0.5)
    assert profile.cells[0].value == pytest.approx(error, rel=1e-4)
    assert profile.criterion == "sparsegpt"


def test_activation_and_apoz_of_channels_are_shares_of_the_consumer_inputs(small_cnn):
    model, batches = small_cnn
    targets = ps.find_targets(model, "channel", example=batches[0])
    target = next(t for t in targets if t.name == "features.0")
    inputs = []
    consumer = model.features[3]  # reads features.0's channels after BatchNorm and ReLU
    handle = consumer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    x = torch.cat(inputs).double().transpose(0, 1).reshape(4, -1)
    remove = units_removed(model, target, 0.5, "magnitude")
    for method, per_channel in (("activation", x.abs().mean(1)), ("apoz", (x != 0).double().mean(1))):
        profile = ps.estimate(model, ps.Evaluator(model, batches, "loss"), [target], score=method, levels=[0.5])
        assert profile.cells[0].value == pytest.approx(float(per_channel[remove].sum() / per_channel.sum()), rel=1e-6)


# ---- the model is left alone ---------------------------------------------------------------


CNN_CASES = [("weight", m) for m in ("magnitude", "snip", "taylor", "fisher", "wanda", "obs")] + [
    ("channel", m) for m in ("magnitude", "taylor", "fisher", "activation", "apoz")]
LLM_CASES = [("head", "head_importance"), ("head", "fisher"), ("neuron", "taylor"), ("neuron", "activation"), ("block", "block_influence")]


@pytest.mark.parametrize(("granularity", "method"), CNN_CASES)
def test_estimate_leaves_a_cnn_bit_identical(small_cnn, granularity, method):
    model, batches = small_cnn
    mixed_mode(model)  # train mode on some BatchNorms: a forward in train mode would change their statistics
    targets = ps.find_targets(model, granularity, example=batches[0])
    before = snapshot(model)
    profile = ps.estimate(model, batches, targets, score=method, levels=[0.25, 0.75])
    assert_unchanged(model, before)
    assert profile.kind == "estimated" and profile.provenance["score"] == method
    assert all(math.isfinite(c.change) and c.ci_low is None for c in profile.cells)
    assert len(profile.cells) == 2 * len(targets)


@pytest.mark.parametrize(("granularity", "method"), LLM_CASES)
def test_estimate_leaves_a_transformer_bit_identical(granularity, method):
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    targets = ps.find_targets(model, granularity)
    before = snapshot(model)
    profile = ps.estimate(model, ps.Evaluator(model, token_batches(count=1), "perplexity"), targets, score=method, levels=[0.5])
    assert_unchanged(model, before)
    assert profile.granularity == granularity and all(math.isfinite(c.value) for c in profile.cells)


# ---- downstream: allocate, JSON, agreement, report, CLI -----------------------------------


def test_allocate_threshold_takes_an_estimated_profile(small_cnn, tmp_path):
    model, batches = small_cnn
    for metric in ("loss", "accuracy"):
        profile = ps.estimate(model, ps.Evaluator(model, batches, metric), score="fisher", levels=[0.2, 0.5, 0.8])
        plan = ps.allocate(profile, 0.5, method="threshold")
        assert plan.sparsity == pytest.approx(0.5, abs=0.005)
        # the least sensitive layer (smallest predicted drop at 0.5) is pruned at least as hard as the most sensitive
        drops = {c.target: profile.drop(c) for c in profile.cells if c.level == "0.5"}
        assert plan.levels[min(drops, key=drops.get)] >= plan.levels[max(drops, key=drops.get)]
        loaded = ps.Profile.load(profile.save(tmp_path / f"{metric}.json"))
        assert loaded.kind == "estimated" and loaded.cells == profile.cells and loaded.provenance["loss"] == profile.provenance["loss"]
    assert "cross-entropy" in profile.provenance["loss"] and profile.provenance["units"].startswith("score")


def test_magnitude_needs_no_data_and_is_the_removed_share_of_w_squared():
    model, _ = mlp_and_batches()
    profile = ps.estimate(model, None, ps.find_targets(model, exclude=[]), score="magnitude", levels=[0.5])
    w = model[0].weight.detach()
    expected = float(w.square()[removed_of(w, key="0")].sum() / w.square().sum())
    assert profile.cell("0", "0.5").value == pytest.approx(expected, rel=1e-6)
    assert profile.metric == "score" and profile.provenance["samples"] == 0


def test_agreement_ranks_cells_and_refuses_too_few(small_cnn):
    model, batches = small_cnn
    evaluator = ps.Evaluator(model, batches, "loss")
    measured = ps.scan(model, evaluator, levels=[0.3, 0.6, 0.9])
    perfect = ps.Profile.from_dict({**measured.to_dict(), "kind": "estimated", "provenance": {"score": "oracle"}})
    result = ps.agreement(perfect, measured)
    assert result.spearman == pytest.approx(1.0) and result.cells == 12 and result.score == "oracle"
    reversed_cells = [ps.Cell(**{**c.to_dict(), "change": -c.change}) for c in measured.cells]
    assert ps.agreement(ps.Profile.from_dict({**perfect.to_dict(), "cells": [c.to_dict() for c in reversed_cells]}), measured).spearman == pytest.approx(-1.0)
    with pytest.raises(ps.PrunescopeError, match="at least 3"):
        ps.agreement(ps.Profile.from_dict({**perfect.to_dict(), "cells": [c.to_dict() for c in measured.cells[:2]]}), measured)
    with pytest.raises(ps.PrunescopeError, match="measured scan"):
        ps.agreement(perfect, perfect)


def test_cli_estimate_records_and_reports_the_agreement(tmp_path):
    runner = CliRunner()
    scan_file, estimate_file = tmp_path / "scan.json", tmp_path / "estimate.json"
    result = runner.invoke(app, ["scan", "--levels", "0.5,0.9", "--metric", "loss", "--out", str(scan_file)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["estimate", "--score", "fisher", "--levels", "0.5,0.9", "--metric", "loss", "--out", str(estimate_file),
                                 "--compare", str(scan_file)])
    assert result.exit_code == 0, result.output
    saved = json.loads(estimate_file.read_text())
    assert saved["kind"] == "estimated" and saved["provenance"]["agreement"]["cells"] == 8
    assert "Spearman vs measured scan" in result.output
    result = runner.invoke(app, ["report", "--profile", str(estimate_file), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0 and "Spearman vs measured scan" in result.output
    result = runner.invoke(app, ["estimate", "--score", "guess", "--out", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "accepted: magnitude" in result.output and not (tmp_path / "bad.json").exists()


# ---- bad input -----------------------------------------------------------------------------


def test_estimate_refuses_bad_input(small_cnn):
    model, batches = small_cnn
    llm = tiny_llama()
    text = token_batches(count=1)

    def refused(match, *args, **kwargs):
        with pytest.raises(ps.PrunescopeError, match=match):
            ps.estimate(*args, **kwargs)

    refused("unknown estimate score 'guess'; accepted: magnitude, snip", model, batches, score="guess")
    refused("does not apply to weight targets; for weight targets use: magnitude, snip, taylor, fisher, obs, wanda", model, batches, score="activation")
    refused("does not apply to head targets; for head targets use: .*head_importance", llm, text, ps.find_targets(llm, "head"), score="wanda")
    refused("empty", model, [], score="fisher")
    refused("needs calibration data", model, None, score="taylor")
    refused("has none; use an Evaluator with metric loss, perplexity, accuracy or kl", model, ps.Evaluator(model, batches, "cosine"), score="fisher")
    refused("first-order, and metric 'kl' has zero gradient", model, ps.Evaluator(model, batches, "kl"), score="taylor")
    refused("criterion 'l1' applies to channel, head, neuron, block targets, not weight targets; accepted: magnitude, random", model, batches, score="fisher", criterion="l1")
    refused("criterion 'wanda' is estimated by score 'obs'", model, batches, score="fisher", criterion="wanda")
    refused("its criterion is 'sparsegpt'", model, batches, score="obs", criterion="magnitude")
    refused("N:M levels apply to weights only", llm, text, ps.find_targets(llm, "neuron"), score="taylor", levels=["2:4"])
    refused("outside", model, batches, score="fisher", levels=[1.5])


def test_block_influence_of_cnn_residual_blocks_compares_channel_vectors():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = ps.find_targets(model, "block", example=images)
    before = snapshot(model)
    profile = ps.estimate(model, [images], targets, score="block_influence", levels=[0.5])
    assert_unchanged(model, before)
    block = model.get_submodule(targets[0].name)
    seen = []
    handle = block.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(images)
    handle.remove()
    (h_in, h_out), = seen
    expected = 1 - float(F.cosine_similarity(h_in.double(), h_out.double(), dim=1).mean())
    assert profile.cell(targets[0].name, "1").value == pytest.approx(expected, rel=1e-6)
