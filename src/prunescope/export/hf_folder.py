"""Format ``hf``: a Hugging Face folder (config, tokenizer, safetensors) that plain
``AutoModel*.from_pretrained`` loads; a non-uniform shrink gets prunescope's spec instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PrunescopeError
from .baking import check_same_weights, is_hf_model


def check_hf(model: nn.Module, format: str) -> None:
    if not is_hf_model(model):
        raise PrunescopeError(
            f"format {format!r} writes a Hugging Face folder, but {type(model).__name__} is not a transformers "
            "PreTrainedModel; accepted for it: 'prunescope' (with origin=), 'onnx' (with example=)"
        )


def write_hf(baked: nn.Module, folder: Path) -> dict[str, Any]:
    """Write ``baked`` (masks already baked) into ``folder`` and check that it reloads whole.

    Returns the manifest entries: ``loader`` and ``notes``.
    """
    from ..structure.transformer_shrink import config_describes

    if not config_describes(baked):  # a non-uniform shrink: the stock config cannot build its shapes
        from ..loading import load
        from ..structure.transformer_io import save_shrunk

        save_shrunk(baked, folder)
        check_same_weights(baked, load(folder), "the saved prunescope spec")
        note = (f"the shrunk {type(baked).__name__} keeps different head or neuron counts in different blocks, which a "
                f"stock {baked.config.model_type} config cannot express: wrote prunescope's spec (prunescope.json) and no "
                "config.json; load it with prunescope.load(folder) or --model hf:FOLDER")
        return {"loader": "prunescope.load", "notes": [note]}
    baked.save_pretrained(folder)
    reloaded = type(baked).from_pretrained(folder, dtype=baked.dtype)
    check_same_weights(baked, reloaded, "the saved Hugging Face folder")
    return {"loader": f"transformers.{type(baked).__name__}.from_pretrained", "notes": []}
