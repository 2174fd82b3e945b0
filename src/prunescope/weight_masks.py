"""The mask parametrization of a weight: register, list, bake in, restore from a state_dict, and
keep ``save_pretrained`` of a masked Hugging Face model from writing the masks instead of the weights."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

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
    """Bake every mask into its weight (zeros stay zeros) and remove the parametrizations, in place.

    Safe on one of several ``copy.deepcopy`` copies of a masked model: the others stay masked.
    """
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            _own_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if isinstance(model.__dict__.get("save_pretrained"), _BakedSavePretrained):
        del model.__dict__["save_pretrained"]
    return model


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of torch's generated ``Parametrized<Class>``.

    Deep copies share that class, and removing a parametrization deletes the weight property from
    the class itself, which would leave every other copy without a ``weight``.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


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
    return guard_save_pretrained(model)


def sparsity_of(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each prunable weight (masked or permanent), by module name."""
    return {name: float((module.weight == 0).float().mean()) for name, module in prunable_modules(model)}


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask baked into its weight, forgetting a GGUF quantizer (the
    weights were dequantized when loaded); ``model`` is untouched."""
    from .structure.transformer_io import drop_gguf_quantizer

    return drop_gguf_quantizer(make_permanent(copy.deepcopy(model)))


# ---- save_pretrained of a masked Hugging Face model ------------------------------------------


def prunescope_hooks(model: nn.Module) -> list[str]:
    """Modules carrying a forward hook of prunescope's (a bypassed block, a norm over kept channels):
    an emulated removal that no weights file can hold."""
    found = []
    for name, module in model.named_modules():
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            function = getattr(hook, "func", hook)
            if str(getattr(function, "__module__", "")).startswith("prunescope."):
                found.append(name or "the model")
                break
    return found


def refuse_hooks(model: nn.Module, writer: str, instead: str) -> None:
    """Refuse a model whose emulated removals live in forward hooks: ``writer`` (a weights file)
    cannot carry them; ``instead`` says what else the user can do besides shrinking."""
    hooked = prunescope_hooks(model)
    if hooked:
        raise PrunescopeError(
            f"{hooked[0]} bypasses removed units with a forward hook (a structured plan applied as masks), "
            f"which {writer} cannot keep; apply the plan with shrink=True {instead}"
        )


class _BakedSavePretrained:
    """The instance-level ``save_pretrained`` of a masked transformers model: it saves a copy with
    the masks baked into the weights (zeros in place), so plain ``from_pretrained`` reloads the
    same model; the class method would write ``...parametrizations.weight.original`` / ``.0.mask``
    keys that transformers drops, re-initialising those weights at random. Deep copies carry it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        refuse_hooks(model, "save_pretrained", "and save that (prunescope.save)")
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            model = baked_copy(model)
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Give a masked transformers ``model`` the baking ``save_pretrained`` (no-op for other models)."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = _BakedSavePretrained(model)
    return model
