"""prunescope.load: the model in a folder that prunescope.save (or prune --out) wrote."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .errors import PrunescopeError


def load(folder: str | Path) -> nn.Module:
    """The model saved in ``folder``, in eval mode (safetensors + JSON, no pickle).

    Reads, in this order: a shrunk-transformer spec (``prunescope.json``), a channel spec
    (``prunescope_channels.json``), a compressed-tensors sparse folder (decompressed with the
    package), a plain Hugging Face folder (``config.json``; transformers ``from_pretrained``).
    """
    from .export.compressed import is_compressed, load_compressed
    from .structure import load_shrunk, load_shrunk_channels
    from .structure.channel_io import SPEC as CHANNEL_SPEC
    from .structure.transformer_io import SPEC_FILE as TRANSFORMER_SPEC

    folder = Path(folder)
    if not folder.is_dir():
        raise PrunescopeError(f"{folder} is not a folder; give the folder prunescope.save or prune --out wrote")
    if (folder / TRANSFORMER_SPEC).exists():
        return load_shrunk(folder)
    if (folder / CHANNEL_SPEC).exists():
        return load_shrunk_channels(folder)
    if is_compressed(folder):
        return load_compressed(folder)
    if (folder / "config.json").exists():
        return _from_pretrained(folder)
    onnx = " (model.onnx loads with onnxruntime.InferenceSession)" if (folder / "model.onnx").exists() else ""
    raise PrunescopeError(f"{folder} holds no prunescope spec ({TRANSFORMER_SPEC} or {CHANNEL_SPEC}) and no config.json{onnx}")


def _from_pretrained(folder: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise PrunescopeError("loading a Hugging Face folder needs transformers: pip install 'prunescope[hf]'") from None
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else transformers.AutoModel
    if not isinstance(cls, type):
        raise PrunescopeError(f"{folder}/config.json names {architectures[0]!r}, which is not a transformers model class")
    return cls.from_pretrained(folder).eval()
