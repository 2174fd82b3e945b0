"""prunescope.save: write a pruned model in a format other tools load, atomically and checked."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..errors import PrunescopeError
from ..weight_masks import baked_copy, refuse_hooks
from .baking import is_hf_model, quiet_transformers, tokenizer_of
from .folder import check_target, publish, staging

FORMATS = ("hf", "compressed-tensors", "onnx", "prunescope")


def save(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    format: str = "hf",
    example: Any = None,
    tokenizer: Any = None,
    origin: Any = None,
    origin_kwargs: dict | None = None,
) -> Path:
    """Write ``model`` (masked, baked or shrunk) into ``folder`` and return the folder's path.

    Formats:
        ``"hf"``: config.json + model.safetensors (+ tokenizer) that plain
            ``transformers.AutoModel*.from_pretrained(folder)`` loads. A non-uniform structured
            shrink has no stock config: then prunescope's spec is written instead (the manifest's
            notes and a warning say so) and ``prunescope.load`` rebuilds it.
        ``"compressed-tensors"``: llm-compressor's sparse checkpoint (bitmask-compressed Linear
            weights, ``sparsity_config`` in config.json); smaller on disk the sparser the model.
        ``"onnx"``: model.onnx traced on ``example`` (a tensor, or a dict of model inputs),
            checked with onnxruntime against torch on that batch.
        ``"prunescope"``: model.safetensors + the JSON spec ``prunescope.load`` rebuilds from; a
            non-transformers model needs ``origin`` (``"torchvision:resnet18"``, ``"prunescope:digits_cnn"``,
            ``"python:MODULE:FUNCTION"``) and maybe ``origin_kwargs`` (``{"num_classes": 10}``).

    Masks are baked into a copy (zeros in place; ``model`` is never changed). ``tokenizer`` (or the
    one in the local folder a transformers model came from) is saved beside. The files are written
    into a hidden sibling folder, reloaded and compared with the model (every tensor bit for bit;
    onnx: outputs within tolerance), and only then moved into ``folder``; a refused or failed call
    leaves ``folder`` as it was. ``folder``/prunescope_export.json records the format, files, notes
    and the check (see :func:`read_manifest`).
    """
    _validate(model, folder, format, example, origin)
    target = check_target(folder)
    with quiet_transformers() if is_hf_model(model) else contextlib.nullcontext(), staging(target) as tmp:
        baked = baked_copy(model).eval()
        if format == "hf":
            from .hf_folder import write_hf

            info = write_hf(baked, tmp)
        elif format == "compressed-tensors":
            from .compressed import write_compressed

            info = write_compressed(baked, tmp)
        elif format == "onnx":
            from .onnx_file import write_onnx

            info = write_onnx(baked, tmp, example)
        else:
            from .spec_folder import write_spec

            info = write_spec(baked, tmp, origin, origin_kwargs)
        chosen = tokenizer_of(model, tokenizer)
        if chosen is not None:
            chosen.save_pretrained(tmp)
        publish(tmp, target, {"format": format, "model": type(model).__name__, **info})
    if format == "hf":
        for note in info["notes"]:
            warnings.warn(note, stacklevel=2)
    return target


def default_format(model: nn.Module) -> str:
    """``"hf"`` for a transformers model, ``"prunescope"`` for any other."""
    return "hf" if is_hf_model(model) else "prunescope"


def _validate(model: Any, folder: Any, format: str, example: Any, origin: Any) -> None:
    check_format(model, format, example=example, origin=origin)
    check_target(folder)


def check_format(model: Any, format: str, *, example: Any = None, origin: Any = None) -> None:
    """Refuse, before any work, a model that ``format`` cannot hold (what :func:`save` checks first)."""
    if format not in FORMATS:
        raise PrunescopeError(f"unknown export format {format!r}; accepted: {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise PrunescopeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if format in ("hf", "compressed-tensors"):
        from .hf_folder import check_hf

        check_hf(model, format)
    if format == "compressed-tensors":
        from ..structure.transformer_shrink import config_describes
        from .compressed import FORMAT, check_package

        check_package()
        masked = any(parametrize.is_parametrized(m) for m in model.modules())  # masks keep the shapes
        if not masked and not config_describes(model):
            raise PrunescopeError(f"format {FORMAT!r} needs a stock config, but this shrunk model keeps different head or "
                                  "neuron counts in different blocks; use format 'prunescope'")
    if format == "onnx":
        from .onnx_file import check_example

        check_example(example)
    else:
        refuse_hooks(model, f"format {format!r}", "or use format 'onnx'")
    if format == "prunescope":
        from .spec_folder import check_origin

        check_origin(model, origin)
