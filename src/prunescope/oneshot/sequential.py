"""One-shot pruning of a whole model, calibrated block by block.

For each block of the stack (transformer layers, or the whole model when it has none): run the
block on every calibration batch with hooks gathering its Linear layers' input statistics, prune
those layers from them (all from the same inputs, as SparseGPT and Wanda do), then run the pruned
block again to produce the next block's inputs. Each block therefore sees the outputs of the
already pruned blocks before it, and memory holds one block's inputs for all calibration batches,
one batch's activations and one block's statistics.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..criteria import check_criterion, is_calibrated
from ..errors import PrunescopeError, forward_failed
from ..layer_kinds import is_conv1d, is_linear_like
from ..levels import Level, NMPattern, level_key, parse_level
from ..masks import check_nm_compatible
from ..plan import Plan
from ..progress import progress_bar
from .blocks import BlockStack, capture_inputs, find_block_stack, run_block, with_stream
from .hessian import StatsCollector
from .layers import in_features, weight_rows, write_rows
from .prune_layer import needs_hessian, prune_rows
from .sparsegpt import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, check_sparsegpt_options


@dataclass
class LayerReport:
    """What happened to one layer.

    ``sparsity`` is the fraction of its weights removed; ``error`` the criterion's estimate of the
    squared reconstruction error on its calibration inputs (see :class:`~.layers.LayerResult`);
    ``tokens`` the calibration rows it saw; ``seconds`` the time spent choosing and updating weights.
    """

    name: str
    level: str
    sparsity: float
    error: float | None
    damp: float | None
    dead_inputs: int
    tokens: int
    seconds: float
    params: int = 0
    """Elements of the layer's weight."""


@dataclass
class OneShotReport:
    """Per-layer results and the total wall time (seconds) of one :func:`prune_oneshot` call."""

    criterion: str
    blocks: str
    calibration_batches: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    """SparseGPT's ``block_size`` and ``damp`` when the criterion is sparsegpt."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_plan(self, **details: Any) -> Plan:
        """The plan this pruning amounts to (method ``"oneshot"``): each layer's level, its
        parameter count and the criterion's options; ``details`` are recorded with it."""
        return Plan({layer.name: layer.level for layer in self.layers}, {layer.name: layer.params for layer in self.layers},
                    self.criterion, method="oneshot", options=dict(self.options), details=details)


def calibration_batches(criterion: str, batches: Iterable[Any] | None) -> list[Any]:
    """``batches`` as a non-empty list when ``criterion`` calibrates on data (else []), or a one-line refusal."""
    if not is_calibrated(criterion):
        return []
    if batches is None or isinstance(batches, (torch.Tensor, Mapping)):
        raise PrunescopeError(f"criterion {criterion!r} calibrates on data: give batches as a list of batches")
    calibration = list(batches)
    if not calibration:
        raise PrunescopeError("calibration batches are empty: give at least one batch")
    return calibration


def block_containing(name: str, stack: BlockStack) -> str | None:
    """The block containing module ``name``, or None."""
    for block_name, _ in stack.blocks:
        if block_name == "" or name.startswith(f"{block_name}."):
            return block_name
    return None


def candidate_layers(model: nn.Module, stack: BlockStack) -> dict[str, nn.Module]:
    """Linear and Conv1D layers inside the blocks (for the whole model as one block: all of them)."""
    return {name: m for name, m in model.named_modules() if name and is_linear_like(m) and block_containing(name, stack) is not None}


def select_layers(
    model: nn.Module,
    stack: BlockStack,
    level: Level | Mapping[str, Level],
    include: Iterable[str] | str | None,
    exclude: Iterable[str] | str | None,
) -> dict[str, float | NMPattern]:
    """The layers to prune with their parsed level; refuses names and patterns that match nothing.

    ``exclude=None`` leaves out the output layer when the whole model is the block (as
    ``find_targets`` does; inside a stack of blocks there is none); ``[]`` keeps every layer.
    """
    from ..targets import default_excludes

    candidates = candidate_layers(model, stack)
    where = f"inside {stack.path}" if stack.path else "in the model"
    if not candidates:
        raise PrunescopeError(f"no Linear layer {where} to prune")
    if isinstance(level, Mapping):
        if include is not None or exclude is not None:
            raise PrunescopeError("levels given per layer choose the layers; do not pass include/exclude with them")
        unknown = [n for n in level if n not in candidates]
        if unknown:
            raise PrunescopeError(f"one-shot pruning covers the Linear layers {where}; not: {', '.join(unknown[:5])}")
        chosen = {n: lv for n, lv in level.items() if lv != 0}
    else:
        include = [include] if isinstance(include, str) else list(include or [])
        given = [exclude] if isinstance(exclude, str) else list(exclude or [])
        names = list(candidates)
        for pattern in include + given:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise PrunescopeError(f"pattern {pattern!r} matches no Linear layer {where}; they are named like: "
                                      + ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
        excluded = given if exclude is not None else list(default_excludes(model)) if stack.path == "" else []
        chosen = {n: level for n in names
                  if (not include or any(fnmatch.fnmatchcase(n, p) for p in include))
                  and not any(fnmatch.fnmatchcase(n, p) for p in excluded)}
        if not chosen:
            raise PrunescopeError("include/exclude leave no layer to prune; loosen the patterns")
    parsed = {n: parse_level(lv) for n, lv in chosen.items()}
    for name, lv in parsed.items():
        if isinstance(lv, NMPattern):
            check_nm_compatible((0, in_features(candidates[name])), 1, lv, name)
    return parsed


def prune_oneshot(
    model: nn.Module,
    batches: Iterable[Any] | None,
    *,
    criterion: str,
    level: Level | Mapping[str, Level],
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    blocks: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    inplace: bool = False,
    mask: bool = False,
    progress: bool = False,
) -> nn.Module:
    """Prune every Linear layer of a model's blocks in one shot and return the pruned model, whose
    ``prunescope_report`` attribute is the :class:`OneShotReport` (per-layer results, seconds).

    Args:
        model: a model made of a stack of blocks (Hugging Face transformers are found automatically).
        batches: calibration batches, fed like an Evaluator's (tensor, ``(inputs, labels)`` or a
            dict of keyword arguments); not needed by ``"magnitude"``.
        criterion: ``"magnitude"`` (smallest ``|w|`` per layer, no data), ``"wanda"`` (``|w| ||x||``
            per output row) or ``"sparsegpt"`` (OBS with weight updates); see :mod:`prunescope.oneshot`.
        level: one level for every chosen layer (fraction in (0, 1) or ``"2:4"``-style N:M), or a
            mapping of layer name to level (a plan's ``levels``; 0 leaves a layer dense).
        include, exclude: glob patterns on layer names. Only Linear (and GPT-2 Conv1D) layers inside
            the blocks are candidates, so the output head and the embeddings are never pruned; when
            the whole model is the block, ``exclude=None`` leaves out its output layer, ``[]`` keeps it.
        blocks: module name of the stack (an ``nn.ModuleList``/``nn.Sequential`` run in order); by
            default the transformer layer list, or the whole model as one block when there is none
            (then every layer is calibrated on the dense model's inputs, all statistics at once).
        block_size, damp: SparseGPT's lazy-update width (columns) and dampening (fraction of the
            mean diagonal of H).
        inplace: prune ``model`` itself (saves one copy of a large model); by default a deep copy is
            pruned and ``model`` is left unchanged.
        mask: also register a ``WeightMask`` parametrization with each layer's keep-mask, as
            ``apply`` does, so the zeros stay zeros in fine-tuning and the masks are saved.

    Train/eval flags are restored; calibration runs in eval mode without gradients.
    """
    check_criterion(criterion, "weight", oneshot=True)
    check_sparsegpt_options(block_size, damp)
    if not isinstance(model, nn.Module):
        raise PrunescopeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    stack = find_block_stack(model, blocks)
    levels = select_layers(model, stack, level, include, exclude)
    calibration = calibration_batches(criterion, batches)
    result = model if inplace else copy.deepcopy(model)
    modules = dict(result.named_modules())
    masked = [n for n in levels if parametrize.is_parametrized(modules[n], "weight")]
    if masked:
        raise PrunescopeError(f"{masked[0]}.weight is already masked; call make_permanent first")
    stack = BlockStack(stack.path, [(n, modules[n] if n else result) for n, _ in stack.blocks])
    report = OneShotReport(criterion, stack.path, len(calibration),
                           options={"block_size": block_size, "damp": damp} if criterion == "sparsegpt" else {})
    started = time.perf_counter()
    from ..modes import eval_mode

    with eval_mode(result), torch.no_grad():
        if not is_calibrated(criterion):
            with progress_bar(len(levels), "prune", progress) as bar:
                for name, lv in levels.items():
                    report.layers.append(_prune_layer(modules[name], name, lv, criterion, None, block_size, damp, mask))
                    bar.advance(1, name)
        elif levels:  # a plan may leave every layer dense (level 0): then nothing runs
            _calibrated(result, stack, calibration, levels, modules, criterion, block_size, damp, mask, report, progress)
    report.seconds = time.perf_counter() - started
    if mask:
        from ..weight_masks import guard_save_pretrained

        guard_save_pretrained(result)
    result.prunescope_report = report
    return result


def _calibrated(model, stack, calibration, levels, modules, criterion, block_size, damp, mask, report, progress) -> None:
    per_block = {block: [n for n in levels if block_containing(n, stack) == block] for block, _ in stack.blocks}
    last = max(i for i, (block, _) in enumerate(stack.blocks) if per_block[block])
    inputs = capture_inputs(model, stack, calibration)
    with progress_bar(last + 1, "one-shot", progress) as bar:
        for index, (block_name, block) in enumerate(stack.blocks[: last + 1]):
            names = per_block[block_name]
            if names:
                with StatsCollector({n: modules[n] for n in names}, needs_hessian(criterion)) as collector:
                    for i, item in enumerate(inputs):
                        guarded_call(block_name, i, block, *item.args, **item.kwargs)
                        collector.forget_last()
                for name in names:
                    report.layers.append(_prune_layer(modules[name], name, levels[name], criterion, collector.stats[name],
                                                      block_size, damp, mask))
                del collector
            if index < last:
                inputs = [with_stream(item, guarded_call(block_name, i, run_block, block, item))
                          for i, item in enumerate(inputs)]
            bar.advance(1, block_name or "model")


def guarded_call(block_name: str, index: int, call, *args, **kwargs):
    """``call(*args, **kwargs)``, a failure reported with the block and batch it happened on."""
    try:
        return call(*args, **kwargs)
    except PrunescopeError:
        raise
    except Exception as error:
        raise forward_failed(error, f"block {block_name or 'model'} with calibration batch {index}") from error


def _prune_layer(module, name, level, criterion, stats, block_size, damp, mask) -> LayerReport:
    started = time.perf_counter()
    result = prune_rows(weight_rows(module), level, criterion, stats, block_size=block_size, damp=damp, name=name)
    write_rows(module, result.weight)
    if mask:
        from ..weight_masks import WeightMask

        keep = result.keep.t().contiguous() if is_conv1d(module) else result.keep
        parametrize.register_parametrization(module, "weight", WeightMask(keep))
    return LayerReport(
        name=name, level=level_key(level), sparsity=1.0 - float(result.keep.float().mean()), error=result.error,
        damp=result.damp, dead_inputs=result.dead_inputs, tokens=0 if stats is None else stats.tokens,
        seconds=time.perf_counter() - started, params=module.weight.numel(),
    )
