"""Activation statistics from one forward pass with hooks: the input second moments of weight
targets (for wanda and obs) and per-feature |activation| and zero counts of a module's input (for
activation and APoZ). Every hook is removed and the model's flags restored, whatever happens.

A layer's input is seen as rows of ``features``, matching the layer's weight as a matrix
``[out, features]`` (:func:`weight_matrix`): a token's input vector for Linear and GPT-2 Conv1D, an
unfolded receptive-field patch (``in/groups x kernel`` values, as ``F.unfold`` orders them) for
Conv1d/Conv2d. ``rows`` counts tokens or output positions over the whole calibration set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import run_model
from ..errors import PrunescopeError, forward_failed
from ..layer_kinds import is_conv1d
from ..modes import eval_mode


@dataclass
class InputMoments:
    """Second moments of one layer's input rows.

    ``diag`` is ``sum over rows of x_j^2`` per feature, shape ``[groups, features]`` (conv groups;
    1 otherwise); ``gram`` is ``X^T X`` (``[features, features]``, only when asked, groups == 1).
    """

    diag: torch.Tensor
    gram: torch.Tensor | None
    rows: int


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, features]`` (a view or transpose; never a modified copy)."""
    weight = module.weight
    if is_conv1d(module):
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def _conv_padding(module: nn.Module) -> tuple[int, ...]:
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise PrunescopeError(f"{type(module).__name__} with padding_mode={module.padding_mode!r}: input statistics need zero padding")
    padding = module.padding
    if padding == "valid":
        return (0,) * len(module.kernel_size)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise PrunescopeError(f"{type(module).__name__} with padding='same' and an even kernel pads unevenly; not supported")
        return tuple(t // 2 for t in total)
    return tuple(padding)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``[rows, in_channels x kernel]`` (all groups side by side)."""
    x = x.detach().float()
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        padding = _conv_padding(module)
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, dilation, stride, padding = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride), (0, *padding)
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise PrunescopeError(f"input statistics support Linear, Conv1d, Conv2d and GPT-2 Conv1D; got {type(module).__name__}")


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1


def run_forward(model: nn.Module, batches: Iterable[Any], hooks: list[tuple[nn.Module, str, Any]]) -> None:
    """One forward pass over ``batches`` in eval mode without gradients, with temporary hooks:
    ``(module, "pre" | "forward", hook)``; forward hooks are registered with kwargs."""
    handles = []
    with eval_mode(model):
        try:
            for module, kind, hook in hooks:
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
            with torch.no_grad():
                for index, batch in enumerate(batches):
                    try:
                        run_model(model, batch)
                    except PrunescopeError:
                        raise
                    except Exception as error:
                        raise forward_failed(error, f"batch {index}") from error
        finally:
            for handle in handles:
                handle.remove()


def input_moments(model: nn.Module, batches: Iterable[Any], names: list[str], gram: bool = False) -> dict[str, InputMoments]:
    """Input second moments of the named modules, in float64, from one forward pass."""
    modules = {name: model.get_submodule(name) for name in names}
    stats: dict[str, InputMoments] = {}
    for name, module in modules.items():
        if gram and _groups(module) > 1:
            raise PrunescopeError(f"{name} is a grouped convolution ({module.groups} groups); obs needs one input Gram per layer")

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            rows = input_rows(module, args[0]).to(torch.float64)
            groups = _groups(module)
            diag = rows.square().sum(0).reshape(groups, -1)
            entry = stats.get(name)
            if entry is None:
                stats[name] = InputMoments(diag, rows.t() @ rows if gram else None, rows.shape[0])
            else:
                entry.diag += diag
                if gram:
                    entry.gram += rows.t() @ rows
                entry.rows += rows.shape[0]

        return hook

    run_forward(model, batches, [(module, "pre", hook_for(name)) for name, module in modules.items()])
    missing = [n for n in names if n not in stats]
    if missing:
        raise PrunescopeError(f"the calibration pass never ran {', '.join(missing[:3])}: these targets see no input")
    return stats


def row_diag(moments: InputMoments, out_features: int) -> torch.Tensor:
    """``sum x_j^2`` for every weight element, shape ``[out, features]`` (conv groups expanded)."""
    groups = moments.diag.shape[0]
    return moments.diag.repeat_interleave(out_features // groups, dim=0)


@dataclass
class FeatureActivations:
    """Per input feature of one module: ``abs_sum`` (sum |x|), ``nonzero`` (count of x != 0) and
    ``count`` (values seen per feature)."""

    abs_sum: torch.Tensor
    nonzero: torch.Tensor
    count: int


def feature_activations(model: nn.Module, batches: Iterable[Any], names: list[str]) -> dict[str, FeatureActivations]:
    """|activation| sums and non-zero counts per input feature (channel for convs, last axis for
    Linear and Conv1D) of the named modules, from one forward pass."""
    stats: dict[str, FeatureActivations] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            x = x.movedim(1, -1) if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else x
            x = x.reshape(-1, x.shape[-1])
            abs_sum, nonzero = x.abs().sum(0), (x != 0).sum(0).to(torch.float64)
            entry = stats.get(name)
            if entry is None:
                stats[name] = FeatureActivations(abs_sum, nonzero, x.shape[0])
            else:
                entry.abs_sum += abs_sum
                entry.nonzero += nonzero
                entry.count += x.shape[0]

        return hook

    run_forward(model, batches, [(model.get_submodule(n), "pre", hook_for(n)) for n in names])
    missing = [n for n in names if n not in stats]
    if missing:
        raise PrunescopeError(f"the calibration pass never ran {', '.join(missing[:3])}")
    return stats
