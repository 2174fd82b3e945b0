"""Whole residual blocks of CNNs (ResNet, MobileNetV2, ConvNeXt, EfficientNet ...): found from each
block's own graph, removed by making the block the identity.

A block qualifies when it is a child of an ``nn.Sequential`` (so it can be taken out of it), its
output has its input's shape on the example batch, and its ``torch.fx`` graph returns the input
through an identity shortcut: the output is an addition (possibly followed by elementwise
activations) one of whose operands is the block input itself, or another such addition. A block
with a projection shortcut (a downsample conv) fails the test and is not offered.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..batches import run_model
from ..errors import PrunescopeError, forward_failed
from ..modes import eval_mode
from .groups import UnitGroup
from .transformer_find import block_group
from .transformer_mask import check_removal

REMOVED_STEP = "removed_blocks"
"""Key of a shrink step (in the channel spec's step list) that records removed residual blocks."""

_ADDS = {operator.add, operator.iadd, torch.add}
_ELEMENTWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu}
_ELEMENTWISE_METHODS = {"relu", "relu_", "add", "add_"}
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Identity, nn.Dropout)


def _returns_input(graph: fx.Graph, module: fx.GraphModule) -> bool:
    """Whether the traced block's output is its input plus something, through adds and activations."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    source = placeholders[0]
    modules = dict(module.named_modules())

    def on_identity_path(node: Any, through_add: bool) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node is source:
            return through_add
        is_add = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in ("add", "add_"))
        if is_add:
            return any(on_identity_path(arg, True) for arg in node.args[:2])
        elementwise = (
            (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)
            or (node.op == "call_module" and isinstance(modules.get(node.target), _ELEMENTWISE_MODULES))
        )
        return elementwise and bool(node.args) and on_identity_path(node.args[0], through_add)

    (output,) = [n for n in graph.nodes if n.op == "output"]
    return on_identity_path(output.args[0], False)


def has_identity_shortcut(block: nn.Module) -> bool:
    """True when ``torch.fx`` can trace ``block`` and its output is its input plus a residual branch."""
    try:
        traced = fx.symbolic_trace(block)
    except Exception:  # noqa: BLE001 - a block fx cannot trace is simply not offered
        return False
    return _returns_input(traced.graph, traced)


def _sequential_children(model: nn.Module) -> dict[str, nn.Module]:
    return {
        f"{name}.{child_name}" if name else child_name: child
        for name, container in model.named_modules()
        if isinstance(container, nn.Sequential)
        for child_name, child in container.named_children()
    }


def _shape_preserving(model: nn.Module, example: Any, candidates: Mapping[str, nn.Module]) -> set[str]:
    """Candidates whose single tensor input and output have the same shape on ``example``."""
    same: set[str] = set()

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, output: Any) -> None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor) \
                    and output.shape == args[0].shape:
                same.add(name)

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in candidates.items()]
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
    return same


def find_residual_blocks(model: nn.Module, example: Any) -> list[UnitGroup]:
    """One single-unit ``"block"`` group per removable residual block (innermost ones), in model order.

    Args:
        model: any model; only read (one forward pass on ``example`` checks the shapes).
        example: one batch, as the model takes it.
    """
    candidates = _sequential_children(model)
    same_shape = _shape_preserving(model, example, candidates)
    qualifying = [name for name in candidates if name in same_shape and has_identity_shortcut(candidates[name])]
    # innermost: a ConvNeXt or Swin stage is itself input + residual, but its blocks are the units
    chosen = [name for name in qualifying if not any(other.startswith(f"{name}.") for other in qualifying)]
    if not chosen:
        raise PrunescopeError(
            f"found no removable blocks in {type(model).__name__}: block granularity needs transformer layer lists or "
            "residual blocks with an identity shortcut (children of nn.Sequential whose output is input + branch, same shape)"
        )
    return [block_group(name, candidates[name]) for name in chosen]


def remove_blocks(model: nn.Module, names: Sequence[str]) -> None:
    """Delete the named blocks from their ``nn.Sequential`` parents, in place; the other children
    keep their names, so state_dict keys of the kept blocks are unchanged."""
    for name in names:
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if not isinstance(parent, nn.Sequential) or child not in parent._modules:
            raise PrunescopeError(f"block {name!r} is not a child of an nn.Sequential in {type(model).__name__}")
        delattr(parent, child)


def shrink_residual_blocks(model: nn.Module, groups: Sequence[UnitGroup], removals: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` without the residual blocks ``removals`` names (``{block: [0]}``).

    The copy remembers the removal in its shrink steps, so ``save_shrunk_channels`` can save it.
    """
    from .channel_shrink import SPEC_ATTRIBUTE

    by_name = {g.name: g for g in groups}
    unknown = [name for name in removals if name not in by_name]
    if unknown:
        raise PrunescopeError(f"removals name blocks that are not residual blocks of this model: {', '.join(unknown[:5])}")
    removed = [name for name, indices in removals.items() if check_removal(by_name[name], indices)]
    result = copy.deepcopy(model)
    remove_blocks(result, removed)
    setattr(result, SPEC_ATTRIBUTE, [*getattr(model, SPEC_ATTRIBUTE, []), {REMOVED_STEP: removed}])
    return result
