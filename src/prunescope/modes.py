"""Run a model for analysis and leave it as it was: every module's training flag (and, on request,
parameters' ``requires_grad``) restored on exit, whatever happens inside."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(models: torch.nn.Module | Iterable[torch.nn.Module], grad_tensors: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Eval mode for every module of ``models`` (one model or several) and ``requires_grad`` on
    ``grad_tensors`` for the duration; each module's own training flag and each parameter's
    ``requires_grad`` are restored on exit."""
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    training = [(m, m.training) for model in models for m in model.modules()]
    grad_tensors = list(grad_tensors)
    flags = [(p, p.requires_grad) for model in models for p in model.parameters()] if grad_tensors else []
    try:
        for model in models:
            model.eval()
        for tensor in grad_tensors:
            tensor.requires_grad_(True)
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
