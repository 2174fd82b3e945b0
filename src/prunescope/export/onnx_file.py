"""Format ``onnx``: ``model.onnx`` from torch's dynamo exporter, checked with onnxruntime on the example batch."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PrunescopeError, describe
from .baking import is_hf_model

ONNX_FILE = "model.onnx"
TOLERANCE = 1e-4
"""Largest accepted |onnxruntime - torch| on the example, relative to max(1, max |torch output|)."""
EXTERNAL_DATA_BYTES = 1 << 30
"""Weights above this go to ``model.onnx.data`` beside the graph (protobuf files stop at 2 GiB)."""


def check_example(example: Any) -> None:
    """Refuse a missing or unusable example and a missing exporter before any work."""
    if example is None:
        raise PrunescopeError("format 'onnx' traces the model on one batch: pass example= (a tensor, or a dict of model inputs for a Hugging Face model)")
    values = example.values() if isinstance(example, Mapping) else example if isinstance(example, (tuple, list)) else [example]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise PrunescopeError(f"example must be a tensor, a tuple of tensors or a dict of tensors; got {type(example).__name__}")
    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise PrunescopeError(f"format 'onnx' needs {package}: pip install 'prunescope[export]'") from None


def default_example(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Any:
    """A stand-in batch for tracing when no data is at hand: 16 token ids for a transformers model,
    one random image of ``input_shape`` otherwise (None when neither applies)."""
    generator = torch.Generator().manual_seed(0)
    if is_hf_model(model):
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        return {"input_ids": torch.randint(0, vocab, (1, 16), generator=generator)}
    if input_shape is not None:
        return torch.rand((1, *input_shape), generator=generator)
    return None


class _MainOutput(nn.Module):
    """The model with its first output only: logits / last hidden state for transformers, the tensor otherwise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.model(*args, **kwargs)
        return output if isinstance(output, torch.Tensor) else output[0]


def write_onnx(baked: nn.Module, folder: Path, example: Any) -> dict[str, Any]:
    """Export ``baked`` on ``example`` into ``folder``/model.onnx; check onnxruntime against torch.

    Every dimension of every input is exported as dynamic where the model allows (``Dim.AUTO``).
    """
    import onnxruntime
    from torch.export import Dim

    if is_hf_model(baked):
        baked.config.use_cache = False
    wrapped = _MainOutput(baked).eval()
    if isinstance(example, Mapping):
        args, kwargs = (), {k: v for k, v in example.items() if k != "labels"}  # outputs, not the loss
        dynamic: Any = {name: {d: Dim.AUTO for d in range(t.dim())} for name, t in kwargs.items()}
        names = list(kwargs)
    else:
        args, kwargs = (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {}
        dynamic = (tuple({d: Dim.AUTO for d in range(t.dim())} for t in args),)
        names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    with torch.no_grad():
        expected = wrapped(*args, **kwargs)
    external = sum(p.numel() * p.element_size() for p in baked.parameters()) > EXTERNAL_DATA_BYTES
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(wrapped, args, str(folder / ONNX_FILE), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic,
                              input_names=names, output_names=["output"], external_data=external, verbose=False)
    except Exception as error:  # noqa: BLE001 - the exporter raises many types; the user needs the first line
        raise PrunescopeError(f"torch.onnx.export failed on {type(baked).__name__}: {describe(error)}") from error
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    inputs = list(kwargs.values() if kwargs else args)
    by_name = dict(zip(names, inputs, strict=True))
    wanted = [i.name for i in session.get_inputs()]
    pairs = [(n, by_name[n]) for n in wanted] if set(wanted) <= set(by_name) else list(zip(wanted, inputs, strict=False))
    feeds = {name: tensor.detach().cpu().numpy() for name, tensor in pairs}
    got = torch.from_numpy(session.run(None, feeds)[0])
    reference = expected.detach().cpu().to(got.dtype)
    difference = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    scale = max(1.0, float(reference.abs().max()))
    if difference > TOLERANCE * scale:
        raise PrunescopeError(
            f"onnxruntime differs from torch on the example by {difference:.3g} (tolerance {TOLERANCE * scale:.3g}); nothing was written"
        )
    return {
        "loader": "onnxruntime.InferenceSession(folder/model.onnx)",
        "notes": [f"inputs {', '.join(i.name for i in session.get_inputs())}; output: the model's first output"],
        "check": {"onnxruntime_max_abs_diff": difference, "tolerance": TOLERANCE * scale, "example_shapes": [list(t.shape) for t in inputs]},
    }
