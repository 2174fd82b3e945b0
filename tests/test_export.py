"""prunescope.save: every format round-trips a pruned model into the tool that loads it, atomically."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import assert_unchanged, snapshot, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from typer.testing import CliRunner

import prunescope as ps
from prunescope.cli import app
from prunescope.export import MANIFEST, read_manifest
from prunescope.structure import find_channel_groups, find_transformer_groups, shrink_channels, shrink_transformer


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_resnet():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


FAMILIES = {"llama": (tiny_llama, "AutoModelForCausalLM"), "gpt2": (tiny_gpt2, "AutoModelForCausalLM"),
            "bert": (tiny_bert, "AutoModel")}
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _out(model, batch):
    with torch.no_grad():
        out = model.eval()(**batch) if isinstance(batch, dict) else model.eval()(batch)
    return out if isinstance(out, torch.Tensor) else out[0]


def _weight_plan(model, level=0.5, include=None):
    """Every Linear/Conv/Conv1D weight but the output head at ``level``."""
    targets = ps.find_targets(model, include=include)
    return ps.Plan({t.name: level for t in targets}, {t.name: t.params for t in targets})


def _masked(family, level=0.5):
    model = FAMILIES[family][0]().eval()
    return model, ps.apply(model, _weight_plan(model, level))


def _batch(model):
    return {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} if hasattr(model, "config") else IMAGES


def _auto(name):
    import transformers

    return getattr(transformers, name)


# ---- hf ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_loads_in_plain_transformers_with_the_pruned_logits(family, tmp_path):
    model, masked = _masked(family)
    before = snapshot(masked)
    folder = ps.save(masked, tmp_path / "out")
    assert_unchanged(masked, before)  # baked in a copy: the masks stay on the user's model
    assert ps.masks_of(masked)
    reloaded = _auto(FAMILIES[family][1]).from_pretrained(folder)
    assert torch.equal(_out(reloaded, _batch(model)), _out(masked, _batch(model)))
    assert not any("parametrizations" in key for key in load_file(folder / "model.safetensors"))
    assert read_manifest(folder)["format"] == "hf"


def test_hf_drops_a_gguf_quantization_config(tmp_path):
    from transformers import GgufConfig

    model, masked = _masked("llama")
    masked.config.quantization_config = GgufConfig()  # as transformers leaves it on SmolLM2's dequantized GGUF
    folder = ps.save(masked, tmp_path / "out")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert masked.config.quantization_config is not None
    reloaded = _auto("AutoModelForCausalLM").from_pretrained(folder)
    assert torch.equal(_out(reloaded, _batch(model)), _out(masked, _batch(model)))
    masked.save_pretrained(tmp_path / "plain")  # the masked model's own save_pretrained bakes the same way
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_hf_writes_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    folder = ps.save(_masked("llama")[1], tmp_path / "out", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("a") == 1
    # a model loaded from a local folder brings that folder's tokenizer along
    again = ps.save(_auto("AutoModelForCausalLM").from_pretrained(folder), tmp_path / "again")
    assert AutoTokenizer.from_pretrained(again).convert_tokens_to_ids("a") == 1


def _non_uniform_llama():
    model = tiny_llama().eval()
    heads, neurons = find_transformer_groups(model, "head"), find_transformer_groups(model, "neuron")
    # layer 0 keeps 1 of 2 KV groups and 40 of 64 neurons, layer 1 keeps both groups and 56 neurons
    removals = {heads[0].name: [1], neurons[0].name: list(range(24)), neurons[1].name: list(range(0, 16, 2))}
    return model, shrink_transformer(model, removals)


def test_non_uniform_shrink_saves_a_spec_that_load_and_hf_model_specs_rebuild(tmp_path):
    from prunescope.models import load_model

    _, shrunk = _non_uniform_llama()
    with pytest.warns(UserWarning, match="cannot express"):
        folder = ps.save(shrunk, tmp_path / "out")
    assert (folder / "prunescope.json").exists() and not (folder / "config.json").exists()
    assert "cannot express" in read_manifest(folder)["notes"][0]
    batch = _batch(shrunk)
    assert torch.equal(_out(ps.load(folder), batch), _out(shrunk, batch))
    loaded = load_model(f"hf:{folder}")  # defect: hf: needed a config.json, so this could not be pruned again
    assert loaded.kind == "causal_lm" and torch.equal(_out(loaded.model, batch), _out(shrunk, batch))
    # pruned again: a second shrink of the reloaded model, saved and rebuilt from the first origin
    again = shrink_transformer(loaded.model, {find_transformer_groups(loaded.model, "neuron")[1].name: [0, 1, 2, 3]})
    with pytest.warns(UserWarning):
        second = ps.save(again, tmp_path / "again", format="hf")
    assert torch.equal(_out(ps.load(second), batch), _out(again, batch))
    spec = json.loads((second / "prunescope.json").read_text())
    assert spec["origin_config"]["intermediate_size"] == 64 and spec["layer_lists"][0]["neurons"] == [40, 52]


def test_uniform_shrink_is_a_stock_hf_folder(tmp_path):
    model = tiny_llama().eval()
    shrunk = shrink_transformer(model, {g.name: [0, 1, 2, 3] for g in find_transformer_groups(model, "neuron")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = ps.save(shrunk, tmp_path / "out")
    reloaded = _auto("AutoModelForCausalLM").from_pretrained(folder)
    assert torch.equal(_out(reloaded, _batch(model)), _out(shrunk, _batch(model)))


# ---- compressed-tensors -------------------------------------------------------------------------


def _sizes(tmp_path, masked, name):
    hf = ps.save(masked, tmp_path / f"{name}-hf")
    compressed = ps.save(masked, tmp_path / f"{name}-ct", format="compressed-tensors")
    return (hf / "model.safetensors").stat().st_size, (compressed / "model.safetensors").stat().st_size, compressed


def test_compressed_tensors_shrinks_with_sparsity_and_decompresses_exactly(tmp_path):
    model = tiny_llama().eval()
    ratios = {}
    for level in (0.5, 0.8):
        masked = ps.apply(model, _weight_plan(model, level))
        dense_bytes, compressed_bytes, folder = _sizes(tmp_path, masked, str(level))
        ratios[level] = compressed_bytes / dense_bytes
        sparsity = json.loads((folder / "config.json").read_text())["quantization_config"]["sparsity_config"]
        assert sparsity["format"] == "sparse-bitmask" and sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
        assert sparsity["global_sparsity"] == pytest.approx(level, abs=0.01)
        check = read_manifest(folder)["check"]
        assert check["weights_bytes"] == compressed_bytes and check["ratio"] == pytest.approx(ratios[level], abs=0.03)
        decompressed = ps.load(folder)
        baked = ps.make_permanent(ps.apply(model, _weight_plan(model, level)))
        for key, tensor in baked.state_dict().items():
            assert torch.equal(decompressed.state_dict()[key], tensor), key
        assert torch.equal(_out(decompressed, _batch(model)), _out(masked, _batch(model)))
    # tiny Llama: 18432 Linear weights pruned, 8192 embedding / head weights stay dense
    assert ratios[0.8] < ratios[0.5] < 0.85, ratios


def test_compressed_tensors_2_4_and_gpt2_conv1d(tmp_path):
    model = tiny_llama().eval()
    masked = ps.apply(model, _weight_plan(model, "2:4"))
    folder = ps.save(masked, tmp_path / "24", format="compressed-tensors")
    sparsity = json.loads((folder / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert torch.equal(_out(ps.load(folder), _batch(model)), _out(masked, _batch(model)))
    gpt2, masked = _masked("gpt2", 0.7)  # Conv1D weights, lm_head tied to the embedding
    folder = ps.save(masked, tmp_path / "gpt2", format="compressed-tensors")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["sparsity_config"]["targets"] == ["Conv1D"]
    assert torch.equal(_out(ps.load(folder), _batch(gpt2)), _out(masked, _batch(gpt2)))


# ---- onnx -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*FAMILIES, "resnet"])
def test_onnx_runs_in_onnxruntime_with_the_pruned_outputs(family, tmp_path):
    import onnxruntime

    model = tiny_resnet() if family == "resnet" else FAMILIES[family][0]().eval()
    masked = ps.apply(model, _weight_plan(model, 0.5))
    batch = _batch(model)
    folder = ps.save(masked, tmp_path / "out", format="onnx", example=batch)
    check = read_manifest(folder)["check"]
    assert check["onnxruntime_max_abs_diff"] <= check["tolerance"]
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: (batch[i.name] if isinstance(batch, dict) else batch).numpy() for i in session.get_inputs()}
    got = torch.from_numpy(session.run(None, feeds)[0])
    assert torch.allclose(got, _out(masked, batch), atol=1e-4)


# ---- prunescope -------------------------------------------------------------------------------------


def test_prunescope_format_rebuilds_a_non_uniform_channel_shrink_of_a_cnn(tmp_path):
    model = tiny_resnet()
    groups = {g.name: g for g in find_channel_groups(model, IMAGES)}
    assert groups["conv1"].units == groups["layer1.0.conv1"].units == 64
    removals = {"conv1": list(range(16)), "layer1.0.conv1": list(range(0, 40, 4))}  # 48 and 54 channels kept
    shrunk = ps.apply(shrink_channels(model, removals, IMAGES), _weight_plan(model, 0.3, include=["layer4.*"]))
    with pytest.raises(ps.PrunescopeError, match="pass origin="):
        ps.save(shrunk, tmp_path / "out", format="prunescope")
    folder = ps.save(shrunk, tmp_path / "out", format="prunescope", origin="torchvision:resnet18", origin_kwargs={"num_classes": 10})
    rebuilt = ps.load(folder)
    assert torch.equal(_out(rebuilt, IMAGES), _out(shrunk, IMAGES))
    assert rebuilt.conv1.out_channels == 48 and rebuilt.layer1[0].conv1.out_channels == 54
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in model.parameters())


def test_prunescope_format_rebuilds_a_masked_cnn_from_its_origin(small_cnn, tmp_path):
    model, batches = small_cnn
    masked = ps.apply(model, _weight_plan(model, 0.5))
    folder = ps.save(masked, tmp_path / "out", format="prunescope", origin="prunescope:digits_cnn", origin_kwargs={"width": 4})
    rebuilt = ps.load(folder)
    assert torch.equal(_out(rebuilt, batches[0][0]), _out(masked, batches[0][0]))
    assert ps.sparsity_of(rebuilt) == ps.sparsity_of(masked)


def test_prunescope_format_rebuilds_a_non_uniform_llama_shrink(tmp_path):
    _, shrunk = _non_uniform_llama()
    masked = ps.apply(shrunk, _weight_plan(shrunk, 0.5))
    folder = ps.save(masked, tmp_path / "out", format="prunescope")
    assert torch.equal(_out(ps.load(folder), _batch(shrunk)), _out(masked, _batch(shrunk)))


# ---- refusals and atomicity ---------------------------------------------------------------------


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    _, masked = _masked("llama")
    cnn = tiny_resnet()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (dict(model=masked, format="tflite"), "unknown export format 'tflite'; accepted: hf, compressed-tensors, onnx, prunescope"),
        (dict(model=masked, format="onnx"), "pass example="),
        (dict(model=cnn, format="hf"), "not a transformers PreTrainedModel"),
        (dict(model=cnn, format="compressed-tensors"), "not a transformers PreTrainedModel"),
        (dict(model=masked, folder=a_file), "is an existing file"),
        (dict(model=tiny_llama(), format="compressed-tensors"), "no Linear layer of this model is at least 10% zeros"),
        (dict(model=masked, format="onnx", example=[1, 2]), "example must be a tensor"),
    ]
    for kwargs, message in cases:
        folder = kwargs.pop("folder", tmp_path / "out")
        with pytest.raises(ps.PrunescopeError, match=message.replace("(", r"\(")) as error:
            ps.save(folder=folder, **kwargs)
        assert "\n" not in str(error.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], kwargs
    assert a_file.read_text() == "x"


def test_block_bypass_hooks_are_refused_but_export_to_onnx(tmp_path):
    model = tiny_llama().eval()
    targets = ps.find_targets(model, "block")
    plan = ps.Plan({targets[0].name: 1.0}, {targets[0].name: targets[0].params}, "magnitude", "block",
                   details={"groups": {t.name: t.group.to_dict() for t in targets}})
    masked = ps.apply(model, plan, shrink=False)
    with pytest.raises(ps.PrunescopeError, match="shrink=True"):
        ps.save(masked, tmp_path / "out")
    with pytest.raises(ps.PrunescopeError, match="shrink=True"):
        masked.save_pretrained(tmp_path / "out")  # plain transformers would silently bring the block back
    assert not (tmp_path / "out").exists()
    folder = ps.save(masked, tmp_path / "out", format="onnx", example={"input_ids": IDS})
    assert read_manifest(folder)["check"]["onnxruntime_max_abs_diff"] < 1e-4


def test_saving_again_replaces_the_model_files_and_keeps_the_others(tmp_path):
    _, masked = _masked("llama")
    folder = tmp_path / "out"
    ps.save(masked, folder, format="prunescope")
    (folder / "plan.json").write_text("{}")
    ps.save(masked, folder, format="hf")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([MANIFEST, "config.json", "generation_config.json", "model.safetensors", "plan.json"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ps.PrunescopeError, match="at least 10% zeros"):  # fails after work has begun
        ps.save(tiny_llama(), folder, format="compressed-tensors")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


# ---- the CLI ----------------------------------------------------------------------------------------


def _tiny_hf_folder(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the of and to a in is that for it".split()
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    model = tiny_llama().eval()
    model.save_pretrained(folder)
    return model


def test_cli_prune_out_is_a_folder_from_pretrained_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny_hf_folder(tmp_path / "llm")
    plan = _weight_plan(model, 0.6)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", "--model", f"hf:{tmp_path / 'llm'}", "--plan", str(tmp_path / "plan.json"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "plan.json", "summary.json"} <= {p.name for p in out.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_out(reloaded, _batch(model)), _out(ps.apply(model, plan), _batch(model)))
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("the") == 1
    result = CliRunner().invoke(app, ["prune", "--model", f"hf:{tmp_path / 'llm'}", "--plan", str(tmp_path / "plan.json"),
                                      "--out", str(tmp_path / "ct"), "--format", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    assert torch.equal(_out(ps.load(tmp_path / "ct"), _batch(model)), _out(ps.apply(model, plan), _batch(model)))


def test_cli_prune_refuses_a_format_the_model_cannot_take_before_pruning(tmp_path, monkeypatch):
    """A format the model cannot be saved in is refused when the model is loaded, not after the
    pruning and the evaluations (and nothing is written)."""
    import prunescope.oneshot as oneshot

    def never(*args, **kwargs):
        raise AssertionError("pruned before the format was checked")

    monkeypatch.setattr(oneshot, "prune_oneshot", never)
    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", "--model", "digits-cnn", "--level", "0.5", "--format", "hf", "--out", str(out)])
    assert result.exit_code == 2 and "PreTrainedModel" in result.output, result.output
    assert not out.exists()
