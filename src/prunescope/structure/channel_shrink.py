"""Physically smaller models: remove channel groups from a copy and check it against the masks.

Each removal is applied through the Torch-Pruning handlers of the group's dependencies, but all
positions are computed first, on the unpruned graph, and each (module, axis) is pruned once with
the union of its positions: Torch-Pruning caches concat sizes, so pruning group after group on
one graph would map later groups to stale offsets (DenseNet). The result is then verified: the
input model, masked with the same removals (:func:`mask_channels`, restored after), and the
shrunk copy must give the same output on the example inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..batches import logits_of, run_model, split_batch
from ..errors import PrunescopeError, forward_failed
from ..modes import eval_mode
from .channel_graph import trace_channels
from .channel_mask import mask_channels
from .channels import CoupledGroup, coupled_groups
from .transformer_mask import check_removal

SPEC_ATTRIBUTE = "_prunescope_channel_steps"
TOLERANCE = 1e-4  # max |shrunk - masked| over max |masked|


def _resolve(
    groups: list[CoupledGroup], refused: dict[str, str], removals: Mapping[str, Sequence[int]]
) -> dict[str, tuple[CoupledGroup, list[int]]]:
    if not isinstance(removals, Mapping):
        raise PrunescopeError(f"removals must map group names to unit indices; got {type(removals).__name__}")
    by_name = {g.group.name: g for g in groups}
    chosen = {}
    for name, units in removals.items():
        if name in refused:
            raise PrunescopeError(f"group {name} cannot be pruned: {refused[name]}")
        if name not in by_name:
            sample = ", ".join(list(by_name)[:6]) + (" ..." if len(by_name) > 6 else "")
            raise PrunescopeError(f"no channel group named {name!r}; groups are named like: {sample}")
        if isinstance(units, (str, bytes)) or not isinstance(units, Sequence | torch.Tensor):
            raise PrunescopeError(f"the units to remove from {name} must be a sequence of indices; got {units!r}")
        indices = check_removal(by_name[name].group, [int(u) if isinstance(u, torch.Tensor) else u for u in units])
        if indices:
            chosen[name] = (by_name[name], indices)
    return chosen


def prune_traced(trace: Any, chosen: dict[str, tuple[CoupledGroup, list[int]]]) -> None:
    """Remove the chosen units (group name -> (group, unit indices)) from the traced model in
    place, through the groups' Torch-Pruning dependencies (all positions computed first)."""
    work: dict[tuple[int, Any], tuple[Any, set[int]]] = {}
    for coupled, units in chosen.values():
        roots = coupled.root_channels(units)
        for dep, idxs, root_idxs in coupled.items:
            positions = {i for i, r in zip(idxs, root_idxs, strict=True) if r in roots}
            if positions:
                work.setdefault((id(dep.target), dep.handler), (dep, set()))[1].update(positions)
    for dep, positions in work.values():
        target = dep.target.module
        if isinstance(target, nn.Parameter):
            name = trace.names[target]
            owner = trace.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else trace.model
            setattr(owner, name.rsplit(".", 1)[-1], dep(sorted(positions)))
        else:
            dep(sorted(positions))


def _output(model: nn.Module, example: Any) -> torch.Tensor:
    try:
        with eval_mode(model), torch.no_grad():
            return logits_of(run_model(model, example)).detach().float()
    except PrunescopeError:
        raise
    except Exception as error:
        raise forward_failed(error, "the example inputs") from error


def masked_output(model: nn.Module, groups: Sequence, removals: Mapping[str, Sequence[int]], example: Any) -> torch.Tensor:
    """Output of ``model`` on ``example`` (eval mode) with ``removals`` applied as masks; the model is restored after."""
    by_name = {g.name: g for g in groups}
    restores = []
    try:
        for name, units in removals.items():
            restores.append(mask_channels(model, by_name[name], units))
        return _output(model, example)
    finally:
        for restore in reversed(restores):
            restore()


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |reference - other| / max |reference| (1 if the reference is all zeros)."""
    if reference.shape != other.shape:
        raise PrunescopeError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)}")
    scale = float(reference.abs().max()) or 1.0
    return float((reference - other).abs().max()) / scale


def shrink_channels(
    model: nn.Module, removals: Mapping[str, Sequence[int]], example_inputs: Any, *, verify: bool = True
) -> nn.Module:
    """A new, physically smaller model with the units ``removals`` names taken out; ``model`` is untouched.

    Args:
        model: the dense model.
        removals: group name (from :func:`find_channel_groups`) -> unit indices to remove.
        example_inputs: one batch, as for :func:`find_channel_groups`.
        verify: run both models and refuse (PrunescopeError) unless the shrunk model's output equals
            the masked model's within ``TOLERANCE`` relative to the output scale.

    The returned model is in the input model's train/eval mode and remembers its removals, so
    :func:`save_shrunk_channels` can write a spec that rebuilds it.
    """
    result = copy.deepcopy(model)
    trace = trace_channels(result, example_inputs)
    groups, refused = coupled_groups(trace)
    chosen = _resolve(groups, refused, removals)
    prune_traced(trace, chosen)
    del trace
    args, kwargs, _ = split_batch(example_inputs)
    tensor_example = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
    step = {
        "example": None if tensor_example is None else {"shape": list(tensor_example.shape), "dtype": str(tensor_example.dtype).removeprefix("torch.")},
        "units": {name: coupled.group.units for name, (coupled, _) in chosen.items()},
        "removed": {name: indices for name, (_, indices) in chosen.items()},
    }
    setattr(result, SPEC_ATTRIBUTE, [*getattr(model, SPEC_ATTRIBUTE, []), step])
    try:
        shrunk = _output(result, example_inputs)
    except PrunescopeError as error:
        raise PrunescopeError(f"the shrunk model does not run: {error}") from error
    if verify and chosen:
        masked = masked_output(model, [g.group for g in groups], step["removed"], example_inputs)
        difference = relative_difference(masked, shrunk)
        if not difference <= TOLERANCE:
            raise PrunescopeError(
                f"the shrunk model's output differs from the masked model's by {difference:.3g} of the output scale "
                f"(tolerance {TOLERANCE}); the channel coupling of groups {', '.join(list(chosen)[:5])} is wrong for "
                "this model. Exclude those groups"
            )
    return result


def predicted_params(model: nn.Module, groups: Sequence, removals: Mapping[str, Sequence[int]]) -> int:
    """Parameters left after ``removals``, counted from the groups' slices alone (no shrinking):
    each tensor keeps, along every axis, the positions no removed unit owns."""
    by_name = {g.name: g for g in groups}
    removed: dict[tuple[str, int], set[int]] = {}
    for name, units in removals.items():
        group = by_name[name]
        for s in group.slices:
            positions = removed.setdefault((s.tensor, s.dim), set())
            positions.update(p for u in units for p in range(s.offset + u * s.width, s.offset + (u + 1) * s.width))
    total = 0
    for name, tensor in model.named_parameters():
        kept = 1
        for dim, size in enumerate(tensor.shape):
            kept *= size - len(removed.get((name, dim), ()))
        total += kept
    return total


def count_flops(model: nn.Module, example_inputs: Any) -> float:
    """FLOPs per sample (2 x multiply-accumulates) of every Conv and Linear weight on ``example_inputs``."""
    total = [0.0]

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        features = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        batch = output.shape[0] if output.dim() > 1 else 1
        total[0] += 2.0 * module.weight.numel() * output.numel() / batch / features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    try:
        _output(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]
