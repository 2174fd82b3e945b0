"""Input statistics of single layers of the dense model, for scans with a calibrated criterion.

A scan prunes one layer at a time in the otherwise dense model, so each layer's statistics come
from the dense model's forward over the calibration batches. They are gathered for consecutive
targets in one pass, as many as fit in ``budget_bytes``, and dropped when the scan moves on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..batches import batch_fingerprint_tensors
from ..levels import Level
from .hessian import InputStats, collect_input_stats
from .layers import check_linear_like, in_features, rows_to_layout, weight_rows
from .prune_layer import needs_hessian, prune_rows

DEFAULT_BUDGET_BYTES = 256 * 2**20


class DenseStats:
    """Lazy per-layer input statistics of ``model`` on ``batches``, gathered in chunks of ``names``."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], names: Sequence[str], criterion: str,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.model, self.batches, self.names, self.criterion = model, list(batches), list(names), criterion
        self.budget_bytes = budget_bytes
        self.passes = 0
        self._chunk: dict[str, InputStats] = {}
        for name in self.names:
            check_linear_like(name, model.get_submodule(name), criterion)

    def _size(self, name: str) -> int:
        features = in_features(self.model.get_submodule(name))
        return 8 * (features * features + features if needs_hessian(self.criterion) else features)

    def get(self, name: str) -> InputStats:
        """The statistics of layer ``name`` (one forward pass over the batches per chunk)."""
        if name not in self._chunk:
            self._chunk = {}
            start = self.names.index(name)
            chunk, used = [], 0
            for other in self.names[start:]:
                used += self._size(other)
                if chunk and used > self.budget_bytes:
                    break
                chunk.append(other)
            modules = {n: self.model.get_submodule(n) for n in chunk}
            self._chunk = collect_input_stats(self.model, modules, self.batches, needs_hessian(self.criterion))
            self.passes += 1
        return self._chunk[name]


def pruned_weight(model: nn.Module, name: str, level: Level, criterion: str, stats: InputStats) -> torch.Tensor:
    """Layer ``name``'s weight pruned by ``criterion`` from ``stats``, in the module's own layout and dtype."""
    module = model.get_submodule(name)
    result = prune_rows(weight_rows(module), level, criterion, stats, name=name)
    return rows_to_layout(module, result.weight)


def batches_fingerprint(batches: Sequence[Any]) -> str:
    """SHA-256 of every tensor of every batch (shapes, dtypes and bytes), in order."""
    digest = hashlib.sha256()
    for batch in batches:
        for tensor in batch_fingerprint_tensors(batch):
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
