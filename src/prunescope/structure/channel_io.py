"""Save and load channel-shrunk models without pickle: safetensors weights plus a JSON spec that
rebuilds the smaller architecture from its origin and the removed channels."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_bytes_atomic, write_text_atomic
from ..errors import PrunescopeError
from .channel_shrink import SPEC_ATTRIBUTE, shrink_channels
from .residual_blocks import REMOVED_STEP, remove_blocks

FORMAT = "prunescope.channels/1"
WEIGHTS = "model.safetensors"
SPEC = "prunescope_channels.json"
ORIGINS = ("torchvision:<model name or class, e.g. resnet18, VisionTransformer>", "prunescope:digits_cnn",
           "python:MODULE:FUNCTION (a factory returning the model, or (model, evaluator))")


def build_origin(origin: str, kwargs: dict | None = None) -> nn.Module:
    """A fresh (random-init) model from an origin string such as ``"torchvision:resnet18"``."""
    kwargs = dict(kwargs or {})
    if not isinstance(origin, str):
        raise PrunescopeError(f"origin must be a string; accepted: {', '.join(ORIGINS)}")
    kind, _, name = origin.partition(":")
    if kind == "python" and name:
        from ..python_factory import call_factory

        return call_factory(name, origin)[0]
    if kind == "torchvision" and name:
        import torchvision

        if name in torchvision.models.list_models():
            return torchvision.models.get_model(name, weights=None, **kwargs)
        cls = getattr(torchvision.models, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls(**kwargs)
        raise PrunescopeError(f"origin {origin!r}: torchvision has no model or model class {name!r}")
    if origin == "prunescope:digits_cnn":
        from ..digits import DigitsCNN

        return DigitsCNN(**kwargs)
    raise PrunescopeError(f"unknown origin {origin!r}; accepted: {', '.join(ORIGINS)}")


def save_shrunk_channels(model: nn.Module, folder: str | Path, origin: str, origin_kwargs: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``prunescope_channels.json`` into ``folder`` (atomically).

    ``model`` must come from :func:`shrink_channels` or ``shrink_residual_blocks``; ``origin`` names
    the dense architecture it was shrunk from (``"torchvision:resnet18"``, ``"prunescope:digits_cnn"``),
    ``origin_kwargs`` its constructor arguments (e.g. ``{"num_classes": 10}``). The spec lists, per
    shrink step, the example input shape used to trace the graph and the kept channel units of
    every group, or the residual blocks removed.
    """
    if not getattr(model, SPEC_ATTRIBUTE, None):
        raise PrunescopeError("the model was not made by shrink_channels or shrink_residual_blocks, so there is no spec to save")
    return save_with_origin(model, folder, origin, origin_kwargs)


def save_with_origin(model: nn.Module, folder: str | Path, origin: str, origin_kwargs: dict | None = None) -> Path:
    """:func:`save_shrunk_channels` for any model built by ``origin``: a model never shrunk gets a
    spec without steps (rebuilt as the origin, then its weights)."""
    from safetensors.torch import save

    steps = getattr(model, SPEC_ATTRIBUTE, None) or []
    if any(REMOVED_STEP not in step and step["example"] is None for step in steps):
        raise PrunescopeError("the model was shrunk with a non-tensor example input; only a single tensor input can be saved")
    build_origin(origin, origin_kwargs)  # refuse an unknown origin before writing anything
    spec = {
        "format": FORMAT,
        "origin": origin,
        "origin_kwargs": origin_kwargs or {},
        "steps": [
            {REMOVED_STEP: list(step[REMOVED_STEP])} if REMOVED_STEP in step else {
                "example": step["example"],
                "kept": {name: [u for u in range(units) if u not in set(step["removed"][name])] for name, units in step["units"].items()},
                "units": step["units"],
            }
            for step in steps
        ],
    }
    folder = Path(folder)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_bytes_atomic(folder / WEIGHTS, save(tensors))
    write_text_atomic(folder / SPEC, json.dumps(spec, indent=1))
    return folder


def load_shrunk_channels(folder: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_shrunk_channels` (eval mode): origin, then each shrink
    step (verified against masks), then the weights; every tensor's shape is checked first."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / SPEC).exists() or not (folder / WEIGHTS).exists():
        raise PrunescopeError(f"{folder} does not hold a shrunk model: expected {SPEC} and {WEIGHTS}")
    spec = json.loads((folder / SPEC).read_text())
    if spec.get("format") != FORMAT:
        raise PrunescopeError(f"{folder / SPEC} has format {spec.get('format')!r}; expected {FORMAT!r}")
    model = build_origin(spec["origin"], spec.get("origin_kwargs")).eval()
    generator = torch.Generator().manual_seed(0)
    for step in spec["steps"]:
        if REMOVED_STEP in step:
            remove_blocks(model, step[REMOVED_STEP])
            continue
        example = torch.randn(step["example"]["shape"], generator=generator).to(getattr(torch, step["example"]["dtype"]))
        removals = {name: [u for u in range(units) if u not in set(step["kept"][name])] for name, units in step["units"].items()}
        model = shrink_channels(model, removals, example)
    weights = load_file(folder / WEIGHTS)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise PrunescopeError(f"{folder / WEIGHTS} has no tensor {key}, which the rebuilt model needs")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise PrunescopeError(
                f"tensor {key} in {folder / WEIGHTS} has shape {tuple(weights[key].shape)}, but the model rebuilt "
                f"from the spec expects {tuple(tensor.shape)}"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise PrunescopeError(f"{folder / WEIGHTS} has tensors the rebuilt model does not: {', '.join(extra[:5])}")
    model.load_state_dict(weights)
    return model.eval()
