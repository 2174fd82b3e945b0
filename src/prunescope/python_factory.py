"""Call a user's model factory named ``MODULE:FUNCTION`` (the ``python:`` model spec, and the
origin of a saved model), turning every way it can fail into one line."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .checks import real_module
from .errors import PrunescopeError, describe


def call_factory(target: str, spec: str) -> tuple[torch.nn.Module, Any]:
    """``(model, evaluator or None)`` from the function ``target`` (``module:function``) names, which
    returns a model or a pair (model, evaluator); ``spec`` is what the user wrote, for messages."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise PrunescopeError(f"python model spec {spec!r} must be python:MODULE:FUNCTION")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise PrunescopeError(f"cannot load {module_name}:{function_name}: {error}") from None
    except Exception as error:  # the user's module failed while importing
        raise PrunescopeError(f"importing {module_name} failed: {describe(error)}") from error
    if not callable(factory):
        raise PrunescopeError(f"{module_name}:{function_name} is a {type(factory).__name__}, not a function returning a model")
    try:
        result = factory()
    except PrunescopeError as error:  # e.g. the Evaluator it builds refused its batches
        raise PrunescopeError(f"model factory {module_name}:{function_name}: {error}") from None
    except Exception as error:  # the user's factory failed: say so briefly
        raise PrunescopeError(f"model factory {module_name}:{function_name} raised {describe(error)}") from error
    if isinstance(result, tuple) and len(result) != 2:
        raise PrunescopeError(f"{module_name}:{function_name} returned a tuple of {len(result)}; return a model or (model, evaluator)")
    model, evaluator = (result if isinstance(result, tuple) else (result, None))
    if not isinstance(model, torch.nn.Module):
        raise PrunescopeError(f"{module_name}:{function_name} must return a torch.nn.Module or (model, evaluator)")
    real_module(model, f"the model of {module_name}:{function_name}")
    return model, evaluator
