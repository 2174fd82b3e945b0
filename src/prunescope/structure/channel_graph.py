"""Trace a CNN/MLP with Torch-Pruning's DependencyGraph and check every op it would couple.

Torch-Pruning (``torch_pruning.DependencyGraph``) follows the autograd graph of one forward pass
and couples channels through it: a conv's output rows, its BatchNorm, every consumer's input
columns, residual partners, concat offsets, flatten into Linear. What it does not know it treats
as elementwise with only a warning. Here every op in the traced graph is checked against a list
of ops known to keep channels independent; a group that passes through anything else is not
offered (its reason names the op and the module it ran in), and :func:`trace_channels` refuses
outright what cannot be traced at all.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..batches import run_model
from ..errors import PrunescopeError
from ..modes import eval_mode

# Autograd ops (grad_fn names without the "Backward<n>" suffix) that never mix channels, so
# treating them as elementwise is right: activations, arithmetic with broadcasting, spatial
# pooling, dropout, copies.
ELEMENTWISE_OPS = frozenset({
    "Relu", "Hardtanh", "Hardswish", "Hardsigmoid", "Sigmoid", "Silu", "Gelu", "Tanh", "LeakyRelu", "Elu",
    "Selu", "Softplus", "Mish", "Add", "Sub", "Mul", "Div", "Neg", "Clone", "Clamp", "ClampMin", "ClampMax",
    "NativeDropout", "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool1D",
    "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "Permute", "ToCopy", "Pow", "Sqrt",
})
# Ops checked one by one: reductions must not reduce the channel axis, padding must not pad it.
REDUCTIONS = frozenset({"Mean", "Sum"})
# Modules whose channels prunescope can couple, mask and shrink (Torch-Pruning has handlers for more).
SUPPORTED_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU,
)
# Ops Torch-Pruning maps itself (concat/split offsets, flatten), and inputs.
_MAPPED_OPS = frozenset({"Cat", "Split", "SplitWithSizes", "Unbind", "View", "Reshape", "UnsafeView", "Slice", "Expand",
                         "Convolution", "Addmm", "NativeBatchNorm", "T"})
# Modules whose internal ops act on spatial axes only.
SPATIAL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)


@dataclass
class ChannelTrace:
    """A traced model: the Torch-Pruning graph, each autograd op's owning module, and the names
    of the model's modules and parameters (``names`` maps module or Parameter -> dotted name)."""

    model: nn.Module
    graph: Any  # torch_pruning.DependencyGraph
    owner: dict[Any, str]  # grad_fn -> innermost module running when the op was recorded
    names: dict[Any, str]
    modules: dict[str, nn.Module]
    outputs: set[Any]  # grad_fns of the tensors the model returns
    unmapped: set[Any] = field(default_factory=set)  # reshape nodes not mapped (not plain, or Torch-Pruning failed)
    shapes: dict[Any, tuple] = field(default_factory=dict)  # grad_fn -> shape of the tensor it made
    positions: dict[str, float] = field(default_factory=dict)  # Conv/Linear name -> output positions per sample


def op_name(grad_fn: Any) -> str:
    """``"AddBackward0"`` -> ``"Add"``."""
    name = grad_fn.name() if hasattr(grad_fn, "name") else str(grad_fn)
    return re.sub(r"Backward\d*$", "", name)


class _OpOwners(TorchFunctionMode):
    """Records, for every autograd node created in a forward pass, the module that was running."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.owner: dict[Any, str] = {}
        self.shapes: dict[Any, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        where = self.stack[-1] if self.stack else "<top level forward>"
        made = [t for t in (result if isinstance(result, (tuple, list)) else (result,))
                if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        for t in made:
            self.shapes.setdefault(t.grad_fn, tuple(t.shape))
        pending = [t.grad_fn for t in made]
        while pending:  # the new node and any nodes created inside the same call
            grad_fn = pending.pop()
            if grad_fn in self.owner:
                continue
            self.owner[grad_fn] = where
            pending += [f for f, _ in grad_fn.next_functions if f is not None and f not in self.owner
                        and type(f).__name__ != "AccumulateGrad"]
        return result


@contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda *_, n=name or "<model>": stack.append(n)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop() and None))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad on every parameter during the trace; both restored after."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with eval_mode(model, frozen), torch.enable_grad():
        yield


class _Blocked:
    """Index mapping into a reshape prunescope does not trust: records that a group reached it
    and maps to no index, so Torch-Pruning stops there instead of expanding indices through it."""

    def __init__(self, node: Any, hits: list[Any]) -> None:
        self.node = node
        self.hits = hits

    def __call__(self, idxs: list) -> list:
        if idxs:
            self.hits.append(self.node)
        return []


def is_plain_reshape(trace_shapes: dict[Any, tuple], owner: dict[Any, str], modules: dict[str, nn.Module], node: Any) -> bool:
    """A reshape that keeps channels on axis 1: a flatten ``[N, C, *S] -> [N, C * prod(S)]``, or one
    that leaves axes 0 and 1 alone; or a Linear's own view of a channels-last input."""
    grad_fn = node.grad_fn
    if isinstance(modules.get(owner.get(grad_fn, "")), nn.Linear):
        return True
    before = getattr(grad_fn, "_saved_self_sym_sizes", None)
    after = trace_shapes.get(grad_fn)
    if before is None or after is None or len(before) < 2 or len(after) < 2 or before[0] != after[0]:
        return False
    flattened = 1
    for size in before[1:]:
        flattened *= int(size)
    return tuple(before[:2]) == tuple(after[:2]) or (len(after) == 2 and int(after[1]) == flattened)


@contextmanager
def tolerant_reshapes(trace: ChannelTrace | None, unmapped: set[Any], hits: list[Any] | None = None,
                      plain: Any = None) -> Iterator[None]:
    """Torch-Pruning's reshape index mapping, made safe: a reshape that is not plain (see
    :func:`is_plain_reshape`; e.g. a channel shuffle's ``view(b, g, c/g, h, w)`` or a window
    partition) gets a :class:`_Blocked` mapping, and one Torch-Pruning fails on is skipped; both go
    into ``unmapped``, and every group reaching one of them is refused."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    plain = plain or (lambda node: is_plain_reshape(trace.shapes, trace.owner, trace.modules, node))

    def update(graph: Any, node: Any) -> None:
        if plain(node):
            try:
                original(graph, node)
                return
            except Exception:
                pass
        unmapped.add(node)
        blocker = _Blocked(node, hits if hits is not None else [])
        for neighbour in (*node.inputs, *node.outputs):
            for dep in neighbour.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = blocker

    index_mapping.update_reshape_index_mapping = update
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def _leaf_parameters(outputs: set[Any]) -> set[int]:
    """ids of the leaf tensors (parameters) the autograd graph of ``outputs`` reaches."""
    seen: set[Any] = set()
    leaves: set[int] = set()
    pending = [f for f in outputs if f is not None]
    while pending:
        grad_fn = pending.pop()
        if grad_fn in seen:
            continue
        seen.add(grad_fn)
        variable = getattr(grad_fn, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        pending += [f for f, _ in grad_fn.next_functions if f is not None]
    return leaves


def trace_channels(model: nn.Module, example_inputs: Any) -> ChannelTrace:
    """Build Torch-Pruning's dependency graph of ``model`` on one forward pass of ``example_inputs``
    (a tensor, an ``(inputs, labels)`` batch or a dict of keyword arguments; batch size >= 1).

    The model is left as it was (training flags, requires_grad, no hooks). Raises PrunescopeError
    when the forward fails, when Torch-Pruning cannot build the graph, or when a module with
    parameters never runs in the forward pass (its channels could not be coupled).
    """
    try:
        import torch_pruning as tp
    except ImportError:  # pragma: no cover - a declared dependency
        raise PrunescopeError("channel groups need Torch-Pruning: pip install torch-pruning") from None
    if not isinstance(model, nn.Module):
        raise PrunescopeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    positions: dict[str, float] = {}

    def count_positions(name: str):
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() >= 1:
                features = module.out_features if isinstance(module, nn.Linear) else module.out_channels
                batch = output.shape[0] if output.dim() > 1 else 1
                positions[name] = output.numel() / batch / features

        return hook

    with _traceable(model), _module_stack(model) as stack:
        recorder = _OpOwners(stack)
        handles = [
            m.register_forward_hook(count_positions(n))
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        ]

        outputs: set[Any] = set()

        def forward(module: nn.Module, inputs: Any) -> Any:
            with recorder:
                result = run_model(module, inputs)
            outputs.update(t.grad_fn for t in tp.utils.flatten_as_list(result) if isinstance(t, torch.Tensor))
            return result

        unmapped: set[Any] = set()
        modules = dict(model.named_modules())

        def plain(node: Any) -> bool:
            return is_plain_reshape(recorder.shapes, recorder.owner, modules, node)

        try:
            with warnings.catch_warnings(), tolerant_reshapes(None, unmapped, plain=plain):
                warnings.simplefilter("ignore")  # unknown ops are checked below, not warned about
                graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=forward, verbose=False)
        except PrunescopeError:
            raise
        except Exception as error:
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            if stack:
                raise PrunescopeError(
                    f"the forward pass of {type(model).__name__} failed in module {stack[-1]!r}: {type(error).__name__}: {first}"
                ) from error
            else:  # the forward ran; Torch-Pruning failed on the graph: name the ops it could not map
                modules = dict(model.named_modules())
                suspects = dict.fromkeys(
                    f"{op_name(f)} in module {w!r}" for f, w in recorder.owner.items()
                    if op_name(f) not in ELEMENTWISE_OPS | REDUCTIONS | _MAPPED_OPS
                    and not isinstance(modules.get(w), (*SUPPORTED_MODULES, *SPATIAL_MODULES))
                )
                where = "on the traced graph" + (f"; ops it cannot map: {', '.join(list(suspects)[:3])}" if suspects else "")
            raise PrunescopeError(
                f"cannot trace the channel graph of {type(model).__name__}: Torch-Pruning raised "
                f"{type(error).__name__} ({first}) {where}"
            ) from error
        finally:
            for handle in handles:
                handle.remove()
    names: dict[Any, str] = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    used = _leaf_parameters(outputs)
    untraced = [
        n for n, m in model.named_modules()
        if n and any(True for _ in m.parameters(recurse=False)) and not any(id(p) in used for p in m.parameters(recurse=False))
    ]
    if untraced:
        shown = ", ".join(untraced[:5]) + (" ..." if len(untraced) > 5 else "")
        raise PrunescopeError(
            f"modules with parameters did not run in the example forward pass, so their channel coupling is "
            f"unknown: {shown}. Remove them (e.g. torchvision inception_v3/googlenet with aux_logits=False) "
            "or pass inputs that run them"
        )
    return ChannelTrace(model=model, graph=graph, owner=recorder.owner, names=names, modules=dict(model.named_modules()),
                        outputs=outputs, positions=positions, unmapped=unmapped, shapes=recorder.shapes)


def unmapped_reason(trace: ChannelTrace, node: Any) -> str:
    where = trace.owner.get(node.grad_fn, "<unknown module>")
    return f"op {op_name(node.grad_fn)} in module {where!r} moves channels off axis 1 (e.g. a channel shuffle or window partition)"


def unsupported_op(trace: ChannelTrace, node: Any) -> str | None:
    """Why a traced non-module op is not known to keep channels independent, or None if it is."""
    import torch_pruning as tp

    module = node.module
    if node in trace.unmapped:
        return unmapped_reason(trace, node)
    if not isinstance(module, tp.ops._ElementWiseOp):
        return None  # concat/split/reshape/slice/expand/output: Torch-Pruning maps their indices
    grad_fn = node.grad_fn
    name = op_name(grad_fn) if grad_fn is not None else str(module._grad_fn)
    where = trace.owner.get(grad_fn, "<unknown module>")
    if name in ("T", "Transpose") and not node.inputs:
        return None  # a Linear weight transposed inside F.linear
    if isinstance(trace.modules.get(where), (*SUPPORTED_MODULES, *SPATIAL_MODULES)):
        return None  # internals of a module Torch-Pruning prunes as a whole (LayerNorm2d, Linear on 3-D input) or of a pooling

    if name in ELEMENTWISE_OPS:
        return None
    if name in REDUCTIONS:
        dims = getattr(grad_fn, "_saved_dim", None)
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if dims is not None and sizes is not None and len(sizes) >= 3:
            rank = len(sizes)
            reduced = {d % rank for d in dims}
            if 1 not in reduced and 0 not in reduced:
                return None  # a spatial mean/sum of an [N, C, ...] tensor
        return f"op {name} in module {where!r} may reduce over channels"
    if name == "ConstantPadNd":
        pad = getattr(grad_fn, "_saved_pad", None)
        if pad is not None and len(pad) <= 4:
            return None  # pads only the last two (spatial) axes
        return f"op {name} in module {where!r} may pad the channel axis"
    return f"op {name} in module {where!r} is not known to keep channels independent"
