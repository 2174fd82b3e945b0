"""prunescope.load: rebuild a pruned model from the folder `prunescope prune --mode shrink` wrote."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import PrunescopeError


def load(folder: str | Path) -> nn.Module:
    """The shrunk model saved in ``folder`` (safetensors weights + a JSON spec, no pickle).

    Transformer folders carry ``prunescope.json``; CNN channel folders ``prunescope_channels.json``.
    """
    from .structure import load_shrunk, load_shrunk_channels
    from .structure.channel_io import SPEC as CHANNEL_SPEC
    from .structure.transformer_io import SPEC_FILE as TRANSFORMER_SPEC

    folder = Path(folder)
    if (folder / TRANSFORMER_SPEC).exists():
        return load_shrunk(folder)
    if (folder / CHANNEL_SPEC).exists():
        return load_shrunk_channels(folder)
    raise PrunescopeError(f"{folder} holds no prunescope spec ({TRANSFORMER_SPEC} or {CHANNEL_SPEC}); was it written by prune --mode shrink?")
