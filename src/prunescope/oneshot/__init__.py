"""One-shot pruning from calibration data: magnitude, Wanda and SparseGPT, block by block.

- :mod:`.hessian`: input statistics of a Linear layer (``X^T X`` and column norms);
- :mod:`.sparsegpt`, :mod:`.wanda`, :mod:`.prune_layer`: prune one layer from them;
- :mod:`.blocks`, :mod:`.sequential`: calibrate a whole model block by block (:func:`prune_oneshot`).
"""

from .hessian import InputStats, StatsCollector, collect_input_stats
from .layers import LayerResult
from .prune_layer import prune_rows
from .sequential import LayerReport, OneShotReport, prune_oneshot
from .sparsegpt import sparsegpt_prune, sparsegpt_prune_levels
from .wanda import wanda_keep, wanda_prune

__all__ = [
    "InputStats", "LayerReport", "LayerResult", "OneShotReport", "StatsCollector",
    "collect_input_stats", "prune_oneshot", "prune_rows", "sparsegpt_prune", "sparsegpt_prune_levels", "wanda_keep", "wanda_prune",
]
