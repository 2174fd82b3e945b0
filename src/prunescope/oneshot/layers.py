"""The layers one-shot criteria prune: ``nn.Linear`` and GPT-2's ``Conv1D``, seen as [out, in] rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunescopeError
from ..layer_kinds import is_conv1d, is_linear_like


def check_linear_like(name: str, module: nn.Module, criterion: str) -> None:
    """Refuse a layer a calibrated criterion cannot handle (convolutions, embeddings ...)."""
    if not is_linear_like(module):
        raise PrunescopeError(
            f"criterion {criterion!r} prunes Linear and GPT-2 Conv1D layers from their input statistics; "
            f"{name!r} is a {type(module).__name__}. Exclude it or use criterion 'magnitude'"
        )


def in_features(module: nn.Module) -> int:
    """Length of the input rows the layer multiplies (Conv1D stores its weight as [in, out])."""
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def weight_rows(module: nn.Module) -> torch.Tensor:
    """A float copy of the weight as [out_features, in_features] (Conv1D's [in, out] is transposed)."""
    weight = module.weight.detach()
    weight = weight.t() if is_conv1d(module) else weight
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.to(dtype).clone()


def rows_to_layout(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """An [out, in] tensor in the module's own weight layout and dtype."""
    tensor = rows.t() if is_conv1d(module) else rows
    return tensor.to(module.weight.dtype).contiguous()


def write_rows(module: nn.Module, rows: torch.Tensor) -> None:
    """Copy an [out, in] weight into the module in place (transposed back for Conv1D)."""
    with torch.no_grad():
        module.weight.copy_(rows_to_layout(module, rows))


@dataclass
class LayerResult:
    """One pruned layer, as [out, in] rows.

    Attributes:
        weight: the pruned weight (zeros where ``keep`` is False; SparseGPT also updates the kept ones).
        keep: boolean keep-mask, True for the weights kept.
        error: the criterion's estimate of the squared reconstruction error ``||(W - W') X^T||^2``
            on the calibration tokens, in squared output units summed over tokens and outputs
            (SparseGPT: its OBS losses; Wanda: the removed ``(|w| ||x||)^2``, which ignores input
            correlations); None for magnitude, which sees no data.
        damp: SparseGPT's dampening actually used, as a fraction of the mean diagonal of H.
        dead_inputs: inputs that were zero on every calibration token (SparseGPT zeroes their weights).
    """

    weight: torch.Tensor
    keep: torch.Tensor
    error: float | None = None
    damp: float | None = None
    dead_inputs: int = 0
