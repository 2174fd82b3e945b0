"""What kind of prunable layer a module is, decided in one place: Linear, Conv1d/2d/3d, or Hugging
Face's GPT-2 ``Conv1D`` (a Linear whose weight is stored transposed, [in, out])."""

from __future__ import annotations

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2, transformers.pytorch_utils): weight [in, out], ``nf`` outputs."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and Hugging Face ``Conv1D``: layers computing ``x @ W^T`` on the last axis."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_input_dim(module: nn.Module) -> int | None:
    """Axis of the weight that indexes input features (1 for Linear and convolutions, 0 for
    ``Conv1D``), or None for a module that is not a prunable layer."""
    if isinstance(module, (nn.Linear, *CONVS)):
        return 1
    if is_conv1d(module):
        return 0
    return None
