"""A bank of pruned layer variants: every (layer, level) pruned once, swapped into the model on demand.

A search over per-layer levels (EvoPress, Sieberling et al. 2025) evaluates whole plans; if each
candidate re-ran SparseGPT it would cost a calibration pass, so, as EvoPress does, every layer is
pruned once at every level from the **dense** model's inputs and a candidate is put together by
copying weights in. Building the bank costs one dense pass over the calibration batches, block by
block (each block's Linear inputs are gathered while it produces the next block's inputs), plus one
criterion call per layer: SparseGPT factorizes each layer's Hessian once for all its levels.

Memory: the bank holds ``len(levels)`` copies of every chosen weight in the model's dtype
(``nbytes``); ``max_bytes`` refuses a bank larger than that before any work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..criteria import check_criterion, is_calibrated
from ..errors import PrunescopeError
from ..layer_kinds import weight_input_dim
from ..levels import Level, level_key, parse_level
from ..masks import keep_mask
from ..progress import progress_bar
from .blocks import capture_inputs, find_block_stack, run_block, with_stream
from .hessian import StatsCollector
from .layers import check_linear_like, rows_to_layout, weight_rows
from .prune_layer import needs_hessian, prune_rows
from .sequential import block_containing, calibration_batches, guarded_call
from .sparsegpt import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, check_sparsegpt_options, sparsegpt_prune_levels

DEFAULT_MAX_BYTES = 8 * 2**30


@dataclass
class VariantBank:
    """Pruned weights ``variants[name][level_key]`` (module layout and dtype, on the weight's device).

    ``seconds`` is the build's wall time; ``errors[name][level_key]`` the criterion's reconstruction
    error estimate of each variant (see :class:`~.layers.LayerResult`).
    """

    criterion: str
    levels: list[Level]
    variants: dict[str, dict[str, torch.Tensor]]
    options: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, dict[str, float | None]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return list(self.variants)

    @property
    def nbytes(self) -> int:
        """Bytes held by the variants."""
        return sum(t.numel() * t.element_size() for per_level in self.variants.values() for t in per_level.values())

    def weight(self, name: str, level: Level) -> torch.Tensor:
        """Layer ``name``'s weight pruned to ``level``; refuses a layer or level the bank does not hold."""
        if name not in self.variants:
            raise PrunescopeError(f"the variant bank has no layer {name!r}; it holds {len(self.variants)} layers like {self.names[:2]}")
        key = level_key(parse_level(level))
        if key not in self.variants[name]:
            raise PrunescopeError(f"the variant bank holds levels {', '.join(self.variants[name])} of {name}; not {key}")
        return self.variants[name][key]


def bank_bytes(model: nn.Module, names: Sequence[str], levels: Sequence[Level]) -> int:
    """Bytes a bank of ``levels`` variants of each named layer's weight will hold."""
    return sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in names) * len(levels)


def build_variant_bank(
    model: nn.Module,
    batches: Iterable[Any] | None,
    names: Sequence[str],
    levels: Sequence[Level],
    *,
    criterion: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> VariantBank:
    """Prune each named Linear layer at each level from the dense model's inputs on ``batches``.

    ``criterion``: ``"sparsegpt"``, ``"wanda"`` (Linear layers of the model's blocks, calibrated:
    ``batches`` needed) or ``"magnitude"`` (any prunable weight, masked exactly as :func:`prunescope.apply` masks it).
    The model is left bit-identical (it is only run, in eval mode without gradients).
    """
    criterion = check_criterion(criterion, "weight", oneshot=True)
    check_sparsegpt_options(block_size, damp)
    parsed = [parse_level(level) for level in levels]
    if not parsed or len({level_key(lv) for lv in parsed}) != len(parsed):
        raise PrunescopeError(f"the variant bank needs distinct levels (fractions in (0, 1) or N:M); got {list(levels)!r}")
    modules = {}
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise PrunescopeError(f"layer {name!r} is not a module of this model") from None
        if criterion != "magnitude":
            check_linear_like(name, modules[name], criterion)
    if not modules:
        raise PrunescopeError("the variant bank needs at least one layer")
    needed = bank_bytes(model, names, parsed)
    if needed > max_bytes:
        raise PrunescopeError(f"the variant bank needs {needed / 2**30:.2f} GiB ({len(names)} layers x {len(parsed)} levels), "
                              f"above max_bytes {max_bytes / 2**30:.2f} GiB: use fewer levels or layers, or raise max_bytes")
    calibration = calibration_batches(criterion, batches)
    options = {"block_size": block_size, "damp": damp} if criterion == "sparsegpt" else {}
    bank = VariantBank(criterion, [lv if isinstance(lv, float) else str(lv) for lv in parsed], {n: {} for n in names}, options)
    started = time.perf_counter()
    from ..modes import eval_mode

    with eval_mode(model), torch.no_grad():
        if is_calibrated(criterion):
            _calibrated(model, calibration, modules, parsed, bank, progress)
        else:
            with progress_bar(len(modules), "variant bank", progress) as bar:
                for name, module in modules.items():
                    _store(bank, name, module, parsed, None)
                    bar.advance(1, name)
    bank.seconds = time.perf_counter() - started
    return bank


def _calibrated(model: nn.Module, calibration: list, modules: dict[str, nn.Module], levels: list, bank: VariantBank,
                progress: bool) -> None:
    stack = find_block_stack(model)
    per_block = {block: [n for n in modules if block_containing(n, stack) == block] for block, _ in stack.blocks}
    missing = [n for n in modules if block_containing(n, stack) is None]
    if missing:
        raise PrunescopeError(f"{missing[0]} is outside the model's blocks ({stack.path}); the variant bank covers block layers")
    last = max(i for i, (block, _) in enumerate(stack.blocks) if per_block[block])
    inputs = capture_inputs(model, stack, calibration)
    with progress_bar(last + 1, "variant bank", progress) as bar:
        for index, (block_name, block) in enumerate(stack.blocks[: last + 1]):
            chosen = {n: modules[n] for n in per_block[block_name]}
            with StatsCollector(chosen, needs_hessian(bank.criterion)) as collector:
                outputs = []
                for i, item in enumerate(inputs):
                    hidden = guarded_call(block_name, i, run_block, block, item)
                    collector.forget_last()
                    if index < last:
                        outputs.append(with_stream(item, hidden))
            for name, module in chosen.items():
                _store(bank, name, module, levels, collector.stats[name])
            del collector
            inputs = outputs
            bar.advance(1, block_name or "model")


def _store(bank: VariantBank, name: str, module: nn.Module, levels: list, stats) -> None:
    if bank.criterion == "magnitude":  # any weight (convolutions too), masked exactly as apply masks it
        weight = module.weight.detach()
        masks = [keep_mask(weight, level, "magnitude", weight_input_dim(module), key=name) for level in levels]
        bank.variants[name] = {level_key(lv): weight * keep for lv, keep in zip(levels, masks, strict=True)}
        bank.errors[name] = {level_key(lv): None for lv in levels}
        return
    rows = weight_rows(module)
    if bank.criterion == "sparsegpt":
        if stats.tokens == 0:
            raise PrunescopeError(f"{name} never ran on the calibration data, so criterion 'sparsegpt' cannot rank its weights")
        results = sparsegpt_prune_levels(rows, stats.hessian, levels, name=name, **bank.options)
    else:
        results = [prune_rows(rows, level, bank.criterion, stats, name=name) for level in levels]
    bank.variants[name] = {level_key(lv): rows_to_layout(module, r.weight) for lv, r in zip(levels, results, strict=True)}
    bank.errors[name] = {level_key(lv): r.error for lv, r in zip(levels, results, strict=True)}

