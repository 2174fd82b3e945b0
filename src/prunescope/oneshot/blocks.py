"""A model as a stack of blocks: find the stack, capture what its first block receives, run a block.

Sequential calibration feeds block ``i + 1`` the outputs of the pruned block ``i``. For that the
first block's inputs are captured once per calibration batch (a forward pre-hook records every
positional and keyword argument, then stops the forward), and each block is run alone on them.
The hidden states are the first positional argument (or the ``hidden_states`` keyword); all other
arguments (attention mask, position embeddings ...) are passed unchanged to every block, which is
checked on the first batch: a model whose blocks get different keyword arguments (per-layer
attention masks, as Gemma-2's sliding windows) is refused. Caches are switched off.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import split_batch
from ..errors import PrunescopeError, forward_failed

_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past")


@dataclass
class BlockStack:
    """The blocks run in order; ``path`` is their container's module name ("" for the whole model,
    used as one block when no stack is found)."""

    path: str
    blocks: list[tuple[str, nn.Module]]


@dataclass
class BlockInput:
    """The arguments one block receives for one calibration batch."""

    args: tuple
    kwargs: dict[str, Any]


def find_block_stack(model: nn.Module, blocks: str | None = None) -> BlockStack:
    """The stack of blocks to calibrate through.

    ``blocks`` names an ``nn.ModuleList`` or ``nn.Sequential`` whose children the model runs in
    order. ``None`` finds the transformer layer list (``model.layers``, ``transformer.h`` ...) and,
    when the model has none, treats the whole model as one block.
    """
    if blocks is not None:
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            raise PrunescopeError(f"blocks={blocks!r} is not a module of this model") from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            raise PrunescopeError(f"blocks={blocks!r} must name a non-empty nn.ModuleList or nn.Sequential; it is a {type(container).__name__}")
        return BlockStack(blocks, [(f"{blocks}.{i}", block) for i, block in enumerate(container)])
    from ..structure.transformer_layout import find_layer_lists

    try:
        lists = find_layer_lists(model)
    except PrunescopeError:
        return BlockStack("", [("", model)])
    if len(lists) > 1:
        raise PrunescopeError(
            f"the model has {len(lists)} stacks of blocks ({', '.join(x.path for x in lists)}); pass blocks= one of them"
        )
    return find_block_stack(model, lists[0].path)


class _Captured(Exception):
    """Raised by the pre-hook to stop the forward once the first block's inputs are recorded."""


def _call_kwargs(model: nn.Module, batch: Any) -> tuple[tuple, dict]:
    args, kwargs, _ = split_batch(batch)
    try:
        accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts_cache = False
    if accepts_cache and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return args, kwargs


def _scrub(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    for key in _CACHE_KEYS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _check_stream(args: tuple, kwargs: dict[str, Any], name: str) -> None:
    if not (args and isinstance(args[0], torch.Tensor)) and not isinstance(kwargs.get("hidden_states"), torch.Tensor):
        raise PrunescopeError(
            f"block {name!r} gets no tensor as its first positional argument nor as hidden_states=; "
            "cannot tell which input carries the hidden states"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and (a is b or bool(torch.equal(a, b))))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return a is b


def capture_inputs(model: nn.Module, stack: BlockStack, batches: Iterable[Any]) -> list[BlockInput]:
    """Run the model on each batch up to its first block and record that block's arguments.

    On the first batch the forward runs on to the last block and every block's keyword arguments
    are compared with the first block's; a difference is refused (see the module docstring).
    """
    first_name, first = stack.blocks[0]
    captured: list[BlockInput] = []
    seen: dict[int, dict[str, Any]] = {}
    checking = len(stack.blocks) > 1

    last = stack.blocks[-1][1]

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if checking:
            seen[id(module)] = dict(kwargs)
            if module is last:
                raise _Captured  # every block's arguments are known: spare the last block and the head
            if module is not first:
                return
        captured.append(BlockInput(tuple(args), _scrub(kwargs)))
        if not checking:
            raise _Captured

    hooked = [first] if not checking else [block for _, block in stack.blocks]
    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in hooked]
    try:
        for index, batch in enumerate(batches):
            args, kwargs = _call_kwargs(model, batch)
            before = len(captured)
            try:
                model(*args, **kwargs)
            except _Captured:
                pass
            except PrunescopeError:
                raise
            except Exception as error:
                raise forward_failed(error, f"calibration batch {index}") from error
            if len(captured) != before + 1:
                raise PrunescopeError(f"the model's forward called {first_name or 'the model'} {len(captured) - before} times "
                                      f"on calibration batch {index}; it must run each block once")
            if checking:
                _check_same_kwargs(stack, seen)
                checking = False
                for handle in handles[1:]:
                    handle.remove()
                handles = handles[:1]
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise PrunescopeError("calibration batches are empty: give at least one batch")
    _check_stream(captured[0].args, captured[0].kwargs, first_name)
    return captured


def _check_same_kwargs(stack: BlockStack, seen: dict[int, dict[str, Any]]) -> None:
    first_name, first = stack.blocks[0]
    reference = _scrub(seen.get(id(first), {}))
    for name, block in stack.blocks[1:]:
        if id(block) not in seen:
            raise PrunescopeError(f"the model's forward never called block {name!r}; blocks must all run, in order")
        kwargs = _scrub(seen[id(block)])
        different = sorted(k for k in set(kwargs) | set(reference)
                           if k != "hidden_states" and not _same(kwargs.get(k), reference.get(k)))
        if different:
            raise PrunescopeError(
                f"block {name!r} gets other keyword arguments than {first_name!r} ({', '.join(different)}); "
                "sequential calibration replays the first block's arguments, so this model is not supported"
            )


def run_block(block: nn.Module, inputs: BlockInput) -> torch.Tensor:
    """Run one block on captured arguments and return its hidden-state output."""
    output = block(*inputs.args, **inputs.kwargs)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise PrunescopeError(f"a block returned {type(output).__name__}; expected a tensor or a tuple starting with one")
    return output


def with_stream(inputs: BlockInput, hidden: torch.Tensor) -> BlockInput:
    """The same arguments with the hidden states replaced (the next block's input)."""
    if inputs.args and isinstance(inputs.args[0], torch.Tensor):
        return BlockInput((hidden, *inputs.args[1:]), inputs.kwargs)
    return BlockInput(inputs.args, {**inputs.kwargs, "hidden_states": hidden})
