"""Format ``prunescope``: safetensors weights plus the JSON spec that ``prunescope.load`` rebuilds the
architecture from (shrunk transformers, channel-shrunk CNNs, or any model built from an origin string)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PrunescopeError
from .baking import check_same_weights, is_hf_model


def origin_of_spec(spec: str) -> str:
    """The origin string of a CLI model spec: ``digits-cnn`` is ``prunescope:digits_cnn``, others are their own."""
    return {"digits-cnn": "prunescope:digits_cnn"}.get(spec, spec)


def check_origin(model: nn.Module, origin: Any) -> None:
    """A non-transformers model needs the origin string that builds its dense architecture."""
    from ..structure.channel_io import ORIGINS

    if is_hf_model(model):
        return
    if not isinstance(origin, str) or ":" not in origin:
        got = "none" if origin is None else repr(origin)
        raise PrunescopeError(
            f"format 'prunescope' rebuilds {type(model).__name__} from its dense architecture: pass origin= "
            f"(got {got}; accepted: {', '.join(ORIGINS)})"
        )


def write_spec(baked: nn.Module, folder: Path, origin: Any = None, origin_kwargs: dict | None = None) -> dict[str, Any]:
    """Write ``baked`` (masks baked) with its spec into ``folder``; check ``prunescope.load`` rebuilds it exactly."""
    from ..loading import load
    from ..structure import save_shrunk
    from ..structure.channel_io import save_with_origin
    from ..structure.channel_shrink import SPEC_ATTRIBUTE
    from ..structure.transformer_layout import has_transformer_layers

    if is_hf_model(baked):
        save_shrunk(baked, folder, origin if isinstance(origin, nn.Module) or hasattr(origin, "to_dict") else None)
    elif has_transformer_layers(baked) and not getattr(baked, SPEC_ATTRIBUTE, None):
        save_shrunk(baked, folder, origin, origin_kwargs)  # a torchvision ViT, shrunk by heads / neurons / blocks or not
    else:
        save_with_origin(baked, folder, origin, origin_kwargs)  # channel or residual-block steps, or none
    check_same_weights(baked, load(folder), "the saved prunescope spec")
    loadable = (folder / "config.json").exists()
    return {"loader": "prunescope.load" + (" (or transformers from_pretrained)" if loadable else ""), "notes": []}
