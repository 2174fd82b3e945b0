"""Targets: the prunable units of a model, with their cost in parameters and FLOPs."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .batches import run_model
from .errors import PrunescopeError, forward_failed
from .layer_kinds import CONVS, weight_input_dim
from .modes import eval_mode
from .target import GRANULARITIES, Target, prunable_modules


def default_excludes(model: nn.Module) -> dict[str, str]:
    """Targets left out unless asked for, each with its reason: the output layer (LM head/classifier)."""
    excluded: dict[str, str] = {}
    modules = prunable_modules(model)
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    if output_layer is not None:
        for name, module in modules:
            if module is output_layer:
                excluded[name] = "LM head / output embeddings"
    elif modules:
        excluded[modules[-1][0]] = "final classifier (the last prunable layer)"
    return excluded


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(patterns: list[str], names: list[str], which: str) -> None:
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            raise PrunescopeError(f"{which} pattern {pattern!r} matches no target; targets are named like: {sample}")


def _pattern_list(patterns: Iterable[str] | str | None, which: str) -> list[str]:
    """Glob patterns as a list of strings: one string, an iterable of them, or None (none)."""
    if patterns is None or isinstance(patterns, str):
        return [] if patterns is None else [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise PrunescopeError(f"{which} must be a glob pattern or a list of them; got {type(patterns).__name__}") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise PrunescopeError(f"{which} patterns must be strings such as 'layer1.*'; got {bad[0]!r}")
    return patterns


def measure_flops(model: nn.Module, example: Any, names: list[str]) -> dict[str, float]:
    """FLOPs per sample (2 x MACs) of each named module, from one forward pass on ``example``."""
    modules = dict(model.named_modules())
    flops: dict[str, float] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            batch = output.shape[0] if output.dim() > 1 else 1
            per_sample_outputs = output.numel() / batch
            if isinstance(module, nn.Linear):
                macs = per_sample_outputs * module.in_features
            elif isinstance(module, CONVS):
                kernel = 1
                for k in module.kernel_size:
                    kernel *= k
                macs = per_sample_outputs * (module.in_channels // module.groups) * kernel
            else:
                macs = per_sample_outputs * module.weight.shape[0]
            flops[name] = flops.get(name, 0.0) + 2.0 * macs

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            run_model(model, example)
    except PrunescopeError:
        raise
    except Exception as error:  # the user's model failed: say so briefly
        raise forward_failed(error, "the example batch") from error
    finally:
        for handle in handles:
            handle.remove()
    return flops


def find_targets(
    model: nn.Module,
    granularity: str = "weight",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    example: Any = None,
    head_mode: str = "kv_group",
) -> list[Target]:
    """Every prunable weight tensor of ``model`` as a :class:`Target`.

    Args:
        granularity: ``"weight"`` (elements of a weight tensor; unstructured or N:M), or a
            structured unit: ``"channel"`` (coupled channel groups derived from the traced graph;
            needs ``example``), ``"head"`` (attention heads; ``head_mode="kv_group"`` removes a KV
            group with its query heads, ``"query"`` one query head per KV group), ``"neuron"`` (FFN
            intermediate neurons) or ``"block"`` (whole transformer layers).
        include: glob patterns on module names (``"layer1.*"``); only matching targets are kept.
        exclude: glob patterns to leave out. ``None`` applies :func:`default_excludes` (the LM head
            or final classifier); ``[]`` keeps everything.
        example: one batch; when given, each target's FLOPs per sample are measured on it.
    """
    if not isinstance(model, nn.Module):
        raise PrunescopeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise PrunescopeError(f"granularity {granularity!r} is not supported; accepted: {', '.join(GRANULARITIES)}")
    include, exclude = _pattern_list(include, "include"), None if exclude is None else _pattern_list(exclude, "exclude")
    if granularity != "weight":
        from .structured import structured_targets

        found = structured_targets(model, granularity, example, head_mode)
        names = [t.name for t in found]
        exclude_patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
        _check_patterns(include, names, "include")
        _check_patterns(exclude_patterns, names, "exclude")
        chosen = [t for t in found if (not include or _matches(t.name, include)) and not _matches(t.name, exclude_patterns)]
        if not chosen:
            raise PrunescopeError("include/exclude leave no target; loosen the patterns")
        return chosen
    modules = prunable_modules(model)
    if not modules:
        raise PrunescopeError("the model has no prunable layer (Linear, Conv1d/2d/3d or HF Conv1D)")
    names = [name for name, _ in modules]
    exclude_patterns = list(default_excludes(model)) if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude))
    _check_patterns(include, names, "include")
    if exclude is not None:
        _check_patterns(exclude_patterns, names, "exclude")
    chosen = [(n, m) for n, m in modules if (not include or _matches(n, include)) and not _matches(n, exclude_patterns)]
    if not chosen:
        raise PrunescopeError("include/exclude leave no target; loosen the patterns")
    flops = measure_flops(model, example, [n for n, _ in chosen]) if example is not None else {}
    return [
        Target(
            name=name,
            kind=type(module).__name__,
            shape=tuple(module.weight.shape),
            params=module.weight.numel(),
            flops=flops.get(name),
            input_dim=weight_input_dim(module),
        )
        for name, module in chosen
    ]
