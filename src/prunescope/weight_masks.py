"""The mask parametrization of a weight: register, list, bake in, and restore from a state_dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PrunescopeError
from .target import prunable_modules


class WeightMask(nn.Module):
    """Parametrization ``weight -> weight * mask``; the mask is a buffer, so it is saved and loaded."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The keep-mask of every masked weight, by module name."""
    return {
        name: module.parametrizations.weight[0].mask
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0], WeightMask)
    }


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (zeros stay zeros) and remove the parametrizations, in place."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def load_masked(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a masked model's ``state_dict`` into a fresh, unmasked model of the same architecture."""
    suffix = ".parametrizations.weight.0.mask"
    modules = dict(model.named_modules())
    for key, mask in state_dict.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            if name not in modules:
                raise PrunescopeError(f"state_dict masks {name!r}, which this model does not have")
            if not parametrize.is_parametrized(modules[name], "weight"):
                parametrize.register_parametrization(modules[name], "weight", WeightMask(mask))
    model.load_state_dict(state_dict)
    return model


def sparsity_of(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each prunable weight (masked or permanent), by module name."""
    return {name: float((module.weight == 0).float().mean()) for name, module in prunable_modules(model)}
