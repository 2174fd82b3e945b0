"""Save and load shrunk Hugging Face transformers: safetensors weights plus a JSON spec, no pickle.

A folder written by :func:`save_shrunk` holds:
    ``model.safetensors``  the shrunk weights (tied duplicates stored once, HF's metadata ``format=pt``).
    ``prunescope.json``    the spec: the origin (a HF config and model class, or an origin string such
                           as ``"torchvision:vit_b_16"`` with its constructor arguments), and per
                           block the kept (query heads, KV heads) and neurons, and which original
                           blocks were kept.
    ``config.json``        only when the shrunk model's own config describes it exactly (uniform
                           counts the config can express): then plain
                           ``transformers.AutoModel*.from_pretrained(folder)`` loads it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_bytes_atomic, write_text_atomic
from ..errors import PrunescopeError
from .transformer_layout import find_attention, find_feed_forward, find_layer_lists
from .transformer_shrink import (
    KEPT_BLOCKS_ATTRIBUTE,
    ORIGIN_CONFIG_ATTRIBUTE,
    config_describes,
    layer_counts,
    shrink_in_place,
)

SPEC_FILE = "prunescope.json"
WEIGHTS_FILE = "model.safetensors"
SPEC_FORMAT = "prunescope.shrunk-transformer"
SPEC_VERSION = 1


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise PrunescopeError("saving and loading shrunk transformers needs transformers: pip install 'prunescope[hf]'") from None
    return transformers


def _model_class(name: str) -> type:
    transformers = _transformers()
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise PrunescopeError(f"{name!r} is not a transformers model class; the spec can only rebuild transformers models")
    return cls


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with tied tensors stored once (the first name, as transformers keeps the input embedding)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tensors = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        tensors[key] = tensor.detach().contiguous().clone()
    return tensors


def plain_config_dict(config: Any) -> dict:
    """``config.to_dict()`` without a GGUF ``quantization_config``: the weights were dequantized on
    loading (SmolLM2's package is a GGUF file), so a saved copy is not "already quantized"."""
    values = dict(config) if isinstance(config, dict) else config.to_dict()
    quantization = values.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        values.pop("quantization_config")
    return values


def drop_gguf_quantizer(model: nn.Module) -> nn.Module:
    """Forget, in place, that a transformers model was loaded from GGUF (its weights are plain
    dequantized tensors): otherwise ``save_pretrained`` refuses, or writes a config that is "already quantized"."""
    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None and "quantization_config" not in plain_config_dict(config):
        del config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
    return model


def origin_config_of(model: nn.Module) -> Any:
    """The config of the dense model ``model`` was shrunk from (recorded by the first shrink),
    or ``model.config`` for a model that was never shrunk."""
    recorded = getattr(model, ORIGIN_CONFIG_ATTRIBUTE, None)
    if recorded is None:
        return model.config
    return model.config.__class__.from_dict(plain_config_dict(recorded))


def shrink_spec(model: nn.Module, origin: dict) -> dict:
    """The JSON spec of a shrunk model (see the module docstring); ``origin`` holds the spec's
    origin entries (``class`` + ``origin_config``, or ``origin`` + ``origin_kwargs``)."""
    kept_blocks = getattr(model, KEPT_BLOCKS_ATTRIBUTE, {}) or {}
    lists = []
    for layers, counts in layer_counts(model):
        origin_length, kept = kept_blocks.get(layers.path, (layers.length, list(range(layers.length))))
        lists.append({
            "path": layers.path,
            "origin_length": origin_length,
            "kept_blocks": list(kept),
            "heads": [list(heads) if heads is not None else None for heads, _ in counts],
            "neurons": [neurons for _, neurons in counts],
        })
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        **origin,
        "layer_lists": lists,
        "weights": WEIGHTS_FILE,
        "params": sum(p.numel() for p in model.parameters()),
    }


def save_shrunk(model: nn.Module, folder: str | Path, origin: nn.Module | Any = None, origin_kwargs: dict | None = None) -> Path:
    """Write ``model`` (made by :func:`shrink_transformer` from ``origin``) to ``folder``.

    Args:
        model: the shrunk model.
        folder: created if needed; files are written atomically, the spec last.
        origin: for a transformers model, the dense model it was shrunk from or its HF config
            (default: the config the first shrink recorded); for any other model, an origin string
            (``"torchvision:vit_b_16"``) that builds the dense one.
        origin_kwargs: constructor arguments of a string origin (e.g. ``{"num_classes": 10}``).

    Returns:
        The path of the spec file.
    """
    if isinstance(origin, str):
        return _save_with_origin(model, Path(folder), origin, origin_kwargs or {})
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise PrunescopeError(f"save_shrunk needs a transformers model; got {type(model).__name__}")
    _model_class(type(model).__name__)
    origin_config = origin_config_of(model) if origin is None else origin.config if isinstance(origin, nn.Module) else origin
    if not hasattr(origin_config, "to_dict") or getattr(origin_config, "model_type", None) != model.config.model_type:
        raise PrunescopeError(
            f"origin must be the dense model {type(model).__name__} was shrunk from, or its config "
            f"(model_type {model.config.model_type!r}); got {type(origin).__name__}"
        )
    spec = shrink_spec(model, {"class": type(model).__name__, "origin_config": plain_config_dict(origin_config)})
    origin_layers = getattr(origin_config, "num_hidden_layers", None)
    if len(spec["layer_lists"]) == 1 and spec["layer_lists"][0]["origin_length"] != origin_layers:
        raise PrunescopeError(
            f"origin has {origin_layers} blocks but {type(model).__name__} was shrunk from a model with "
            f"{spec['layer_lists'][0]['origin_length']}; pass the dense model it came from"
        )
    from safetensors.torch import save

    folder = Path(folder)
    write_bytes_atomic(folder / WEIGHTS_FILE, save(_unique_state(model), metadata={"format": "pt"}))
    hf_loadable = config_describes(model)
    spec["hf_loadable"] = hf_loadable
    config_file = folder / "config.json"
    if hf_loadable:
        config = model.config.__class__.from_dict(plain_config_dict(model.config))
        config.architectures = [type(model).__name__]
        write_text_atomic(config_file, config.to_json_string())
    elif config_file.exists():
        config_file.unlink()
    return write_text_atomic(folder / SPEC_FILE, json.dumps(spec, indent=1) + "\n")


def _save_with_origin(model: nn.Module, folder: Path, origin: str, origin_kwargs: dict) -> Path:
    """Save a shrunk non-transformers model (torchvision ViT) whose dense form ``origin`` builds."""
    from safetensors.torch import save

    from .channel_io import build_origin

    dense = build_origin(origin, origin_kwargs)  # refuses an unknown origin before anything is written
    spec = shrink_spec(model, {"origin": origin, "origin_kwargs": origin_kwargs})
    _removals_for(dense, spec)  # refuses a model that origin cannot be shrunk into
    write_bytes_atomic(folder / WEIGHTS_FILE, save(_unique_state(model)))
    spec["hf_loadable"] = False
    return write_text_atomic(folder / SPEC_FILE, json.dumps(spec, indent=1) + "\n")


def _read_spec(folder: Path) -> dict:
    path = folder / SPEC_FILE
    if not path.exists():
        raise PrunescopeError(f"{folder} has no {SPEC_FILE}; it was not written by save_shrunk")
    spec = json.loads(path.read_text())
    if spec.get("format") != SPEC_FORMAT or spec.get("version") != SPEC_VERSION:
        raise PrunescopeError(
            f"{path} is not a {SPEC_FORMAT} spec of version {SPEC_VERSION} "
            f"(format {spec.get('format')!r}, version {spec.get('version')!r})"
        )
    return spec


def _removals_for(model: nn.Module, spec: dict) -> tuple[dict, dict, dict]:
    """Removals that take the freshly built origin to the spec's counts: KV groups and neurons,
    then query heads inside groups, then blocks. Which units go does not matter: weights are loaded after."""
    lists = {layers.path: layers for layers in find_layer_lists(model)}
    kv_and_neurons: dict[str, list[int]] = {}
    queries: dict[str, list[int]] = {}
    blocks: dict[str, list[int]] = {}
    for entry in spec["layer_lists"]:
        layers = lists.get(entry["path"])
        if layers is None or layers.length != entry["origin_length"]:
            found = f"{layers.length} blocks" if layers else "nothing"
            raise PrunescopeError(f"spec expects {entry['origin_length']} blocks at {entry['path']!r}; the origin config builds {found}")
        container = model.get_submodule(layers.path)
        for slot, original in enumerate(entry["kept_blocks"]):
            path, layer = layers.layer(original), container[original]
            heads, neurons = entry["heads"][slot], entry["neurons"][slot]
            if heads is not None:
                attention = find_attention(path, layer)
                q, kv = heads
                per_group = q // kv if kv else 0
                if not (1 <= kv <= attention.kv_heads and per_group * kv == q and 1 <= per_group <= attention.queries_per_group):
                    raise PrunescopeError(
                        f"spec keeps {q} query / {kv} KV heads in {attention.path}, which has {attention.heads} / {attention.kv_heads}"
                    )
                if kv < attention.kv_heads:
                    kv_and_neurons[attention.path] = list(range(kv, attention.kv_heads))
                if per_group < attention.queries_per_group:
                    queries[attention.path] = list(range(per_group, attention.queries_per_group))
            if neurons is not None:
                ffn = find_feed_forward(path, layer)
                if not 1 <= neurons <= ffn.neurons:
                    raise PrunescopeError(f"spec keeps {neurons} neurons in {ffn.path}, which has {ffn.neurons}")
                if neurons < ffn.neurons:
                    kv_and_neurons[ffn.path] = list(range(neurons, ffn.neurons))
        kept = set(entry["kept_blocks"])
        blocks.update({layers.layer(i): [0] for i in range(layers.length) if i not in kept})
    return kv_and_neurons, queries, blocks


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.exists():
        raise PrunescopeError(f"weights file {path} is missing")
    tensors = load_file(path)
    state = model.state_dict()
    for key, tensor in tensors.items():
        if key not in state:
            raise PrunescopeError(f"{path.name} has tensor {key!r}, which the spec's architecture does not have")
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise PrunescopeError(
                f"weight {key!r} has shape {tuple(tensor.shape)} in {path.name} but the spec builds {tuple(state[key].shape)}"
            )
    loaded = {state[key].data_ptr() for key in tensors}
    missing = [key for key in state if key not in tensors and state[key].data_ptr() not in loaded]
    if missing:
        raise PrunescopeError(f"{path.name} lacks {len(missing)} tensor(s) the spec builds, e.g. {', '.join(missing[:3])}")
    model.load_state_dict(tensors, strict=False)


def load_shrunk(folder: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_shrunk`: the origin architecture from its config, shrunk
    to the spec's counts, then the weights (shapes checked tensor by tensor). Returned in eval mode."""
    folder = Path(folder)
    spec = _read_spec(folder)
    if "origin" in spec:
        from .channel_io import build_origin

        model = build_origin(spec["origin"], spec.get("origin_kwargs"))
    else:
        cls = _model_class(spec["class"])
        model = cls(cls.config_class.from_dict(spec["origin_config"]))
    kv_and_neurons, queries, blocks = _removals_for(model, spec)
    for removals, head_mode in ((kv_and_neurons, "kv_group"), (queries, "query"), (blocks, "kv_group")):
        if removals:
            shrink_in_place(model, removals, head_mode=head_mode)
    _load_weights(model, folder / spec["weights"])
    return model.eval()
