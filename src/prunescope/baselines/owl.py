"""OWL layer sparsities (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity").

Layers are grouped by transformer block (every target inside one block of the model's layer
lists; a target outside any block, or every target of a model without one, is its own group).
For each group, from the dense model on the calibration batches:

1. the Wanda metric ``A_ij = |W_ij| * ||X_j||_2`` of each of its layers (``||X_j||_2``: the norm
   of input feature ``j`` over every calibration token);
2. its outlier ratio ``D``: the fraction of the group's entries of ``A`` greater than ``m`` times
   their mean.

The ratios are scaled linearly onto ``[0, 2 * lambda]`` (``u = (D - min D) / (max D - min D)``, all 0
when every ratio is equal) and a group's density (fraction kept) is ``1 - budget + 2 * lambda * (u
- mean u)``: more outliers, more kept. This is the reference code's rule (luuyin/OWL
``prune_wanda_outlier``, llm-compressor's ``_infer_owl_layer_sparsity``) except that ``mean u`` is
weighted by the groups' parameters, so groups of different sizes still meet the budget exactly
(equal groups: the plain mean, as the reference). Densities are then clipped to [1 - max level, 1]
(see :mod:`.fit`) with one shift added to every group so the budget still holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PrunescopeError
from ..layer_kinds import is_linear_like
from ..oneshot.blocks import find_block_stack
from ..oneshot.hessian import collect_input_stats
from ..oneshot.layers import weight_rows
from ..structure.transformer_layout import find_layer_lists
from ..target import Target
from .fit import check_reachable, fit_densities, max_levels


def block_groups(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """Target names grouped by the transformer block holding them (keyed by block path), in order;
    a target in no block is a group of its own (keyed by its name)."""
    try:
        lists = find_layer_lists(model)
    except PrunescopeError:
        lists = []
    blocks = [block for layers in lists for block, _ in find_block_stack(model, layers.path).blocks]
    groups: dict[str, list[str]] = {}
    for name in names:
        group = next((block for block in blocks if name.startswith(f"{block}.")), name)
        groups.setdefault(group, []).append(name)
    return groups


def outlier_ratio(metrics: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``metrics`` (one group's Wanda metrics) above ``m`` times their mean."""
    count = sum(x.numel() for x in metrics)
    mean = float(sum(x.sum(dtype=torch.float64) for x in metrics)) / count
    return sum(int((x > m * mean).sum()) for x in metrics) / count


def wanda_metric(module: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||_2`` as [out, in] (``norms``: the input features' norms)."""
    rows = weight_rows(module).abs()
    return rows * norms.to(device=rows.device, dtype=rows.dtype)[None, :]


def check_owl_layers(model: nn.Module, targets: Sequence[Target]) -> None:
    """Refuse a target the Wanda metric cannot weigh (a convolution)."""
    for target in targets:
        module = model.get_submodule(target.name)
        if not is_linear_like(module):
            raise PrunescopeError(
                f"method 'owl' weighs Linear and GPT-2 Conv1D layers by their input norms; {target.name!r} is a "
                f"{type(module).__name__}: exclude it or use method 'erk' or 'lamp'"
            )


def owl_levels(model: nn.Module, targets: Sequence[Target], fraction: float, calibration: list[Any],
               m: float, lam: float) -> tuple[dict[str, float], dict]:
    """The level of each target (its group's) and the details: groups, outlier ratios, group levels, shift."""
    check_owl_layers(model, targets)
    params = {t.name: t.params for t in targets}
    groups = block_groups(model, [t.name for t in targets])
    group_params = np.array([sum(params[n] for n in names) for names in groups.values()], dtype=np.float64)
    group_tops = np.array([min(max_levels([params[n] for n in names])) for names in groups.values()])
    check_reachable("owl", fraction, group_params, group_tops)
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    stats = collect_input_stats(model, modules, calibration, hessian=False)
    ratios = np.array([outlier_ratio([wanda_metric(modules[n], stats[n].norms) for n in names], m) for names in groups.values()])
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread if spread > 0 else np.zeros_like(ratios)
    centred = scaled - float(scaled @ group_params) / group_params.sum()
    base = (1.0 - fraction) + 2.0 * lam * centred
    levels, shift = fit_densities(base, np.ones_like(base), group_params, group_tops, fraction)
    by_group = dict(zip(groups, levels.tolist(), strict=True))
    details = {
        "groups": dict(groups),
        "outlier_ratios": dict(zip(groups, ratios.tolist(), strict=True)),
        "group_levels": by_group,
        "shift": shift,
    }
    group_of = {name: group for group, names in groups.items() for name in names}
    return {t.name: by_group[group_of[t.name]] for t in targets}, details
