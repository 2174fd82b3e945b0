"""Incremental re-evaluation: a cell cannot change what the model computes before its target runs,
so the dense outputs of those modules are recorded once and replayed instead of recomputed.

Units are the model's top-level children and the children of every ``nn.Sequential`` /
``nn.ModuleList`` (ResNet stages and blocks, HF decoder layers, ViT encoder blocks), each called
exactly once per forward pass. On the first batch the execution order of every module is
recorded; a cell may skip every unit that finished before the first module owning one of the
cell's tensors started and that holds none of them (outermost units only). A skipped unit's
forward returns a copy of its recorded dense output, with whatever arguments it gets.

Every distinct skip set is verified before use: the model's output on the last batch with the
skips must equal the full forward's (up to 1e-6 of its scale), after a full pass on another batch; a skip set that fails is not used
and its cells run the full forward. Recorded outputs live in memory up to ``memory_bytes``; the
rest is spilled to files in a temporary folder and memory-mapped back.
"""

from __future__ import annotations

import shutil
import tempfile
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batches import logits_of, run_model
from .evaluator import Evaluator
from .modes import eval_mode

DEFAULT_MEMORY_BYTES = 2 * 1024**3
VERIFY_TOLERANCE = 1e-6


def _units(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level children and children of Sequential/ModuleList containers, by name."""
    units = {name: child for name, child in model.named_children()}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            units.update({f"{name}.{child_name}" if name else child_name: child for child_name, child in module.named_children()})
    return units


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def copy_output(value: Any) -> Any:
    """A fresh copy of a recorded output (downstream in-place ops must not touch the record)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(copy_output(v) for v in value)
    if isinstance(value, list):
        return [copy_output(v) for v in value]
    return value


def _storable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return all(v is None or _storable(v) for v in value)
    return False


class PrefixCache:
    """Dense outputs of a model's units on an evaluator's batches, and the skip sets cells may use.

    Construction runs batch 0 once to learn the execution order; :meth:`record` then keeps the
    outputs of the units cells will skip (a unit no cell skips, such as an LM head, costs nothing).

    Args:
        model: the dense model (only read; its forwards are patched only inside :meth:`skipping`).
        evaluator: supplies the batches.
        memory_bytes: recorded outputs kept in memory; beyond it they are spilled to disk.
    """

    def __init__(self, model: nn.Module, evaluator: Evaluator, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.model = model
        self.evaluator = evaluator
        self.memory_bytes = memory_bytes
        self.units = _units(model)
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._memory: dict[tuple[str, int], Any] = {}
        self._spilled: dict[tuple[str, int], Path] = {}
        self._folder: Path | None = None
        self.held_bytes = 0
        self.spilled_bytes = 0
        self._verified: dict[tuple[str, ...], bool] = {}
        self._full_last: torch.Tensor | None = None
        self._record_order()

    # ---- recording -------------------------------------------------------------------------
    def _record_order(self) -> None:
        """Execution order on batch 0 (every module); units called other than once are dropped."""
        names = {id(m): n for n, m in self.model.named_modules()}
        counter = iter(range(10**12))
        handles = []

        def pre(module: nn.Module, _args: Any) -> None:
            name = names[id(module)]
            self.calls[name] = self.calls.get(name, 0) + 1
            self.start.setdefault(name, next(counter))

        def post(module: nn.Module, _args: Any, _output: Any) -> None:
            self.end[names[id(module)]] = next(counter)

        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        try:
            with eval_mode(self.model), torch.no_grad():
                run_model(self.model, self.evaluator.batches[0])
        finally:
            for handle in handles:
                handle.remove()
        self.units = {n: u for n, u in self.units.items() if self.calls.get(n) == 1}

    def record(self, names: set[str]) -> None:
        """Keep the dense output of each unit in ``names`` on every batch (one full pass)."""
        self.units = {n: u for n, u in self.units.items() if n in names}
        if not self.units:
            return
        current = {"batch": 0}
        unstorable: set[str] = set()

        def hook_for(name: str):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                if not _storable(output):
                    unstorable.add(name)
                    return
                self._keep((name, current["batch"]), copy_output(output))

            return hook

        handles = [unit.register_forward_hook(hook_for(name)) for name, unit in self.units.items()]
        try:
            with eval_mode(self.model), torch.no_grad():
                for index, batch in enumerate(self.evaluator.batches):
                    current["batch"] = index
                    run_model(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        for name in unstorable:
            self.units.pop(name, None)

    def _keep(self, key: tuple[str, int], value: Any) -> None:
        size = _nbytes(value)
        if self.held_bytes + size <= self.memory_bytes:
            self._memory[key] = value
            self.held_bytes += size
            return
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="prunescope-cache-"))
        path = self._folder / f"{len(self._spilled)}.pt"
        torch.save(value, path)
        self._spilled[key] = path
        self.spilled_bytes += size

    def _recorded(self, name: str, batch: int) -> Any:
        key = (name, batch)
        if key in self._memory:
            return copy_output(self._memory[key])
        return torch.load(self._spilled[key], weights_only=True, mmap=True)

    def close(self) -> None:
        """Drop the records and delete spilled files."""
        self._memory.clear()
        self._full_last = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    # ---- which units a cell may skip -------------------------------------------------------
    def skip_set(self, tensors: Sequence[torch.Tensor]) -> tuple[str, ...]:
        """Outermost units that finish before any module owning ``tensors`` starts and hold none of them."""
        wanted = {id(t) for t in tensors}
        owners = [
            name for name, module in self.model.named_modules()
            if any(id(t) in wanted for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
        ]
        started = [self.start[n] for n in owners if n in self.start]
        if not started:
            return ()
        first = min(started)
        chosen: list[str] = []
        for name, unit in self.units.items():
            if self.end.get(name, first) >= first:
                continue
            if any(id(t) in wanted for t in [*unit.parameters(), *unit.buffers()]):
                continue
            chosen.append(name)
        return tuple(n for n in chosen if not any(n.startswith(f"{other}.") for other in chosen if other != n))

    def verified(self, skips: tuple[str, ...]) -> bool:
        """Whether the model's output on the last batch with ``skips`` replayed equals the full
        forward's. A full pass on batch 0 runs in between, so a skipped module whose side effects
        (state kept between calls) matter is caught."""
        if not skips:
            return True
        if skips not in self._verified:
            last = len(self.evaluator.batches) - 1
            with eval_mode(self.model), torch.no_grad():
                if self._full_last is None:  # the same for every skip set: computed once
                    self._full_last = logits_of(run_model(self.model, self.evaluator.batches[last]))
                full = self._full_last
                run_model(self.model, self.evaluator.batches[0])
                with self.skipping(skips, last):
                    replayed = logits_of(run_model(self.model, self.evaluator.batches[last]))
            scale = float(full.abs().max()) or 1.0
            same = full.shape == replayed.shape and float((full - replayed).abs().max()) <= VERIFY_TOLERANCE * scale
            self._verified[skips] = same
        return self._verified[skips]

    @contextmanager
    def skipping(self, skips: tuple[str, ...], batch: int) -> Iterator[None]:
        """Inside, each unit in ``skips`` returns its recorded dense output for ``batch``."""
        patched = []
        try:
            for name in skips:
                unit = self.units[name]
                value = self._recorded(name, batch)
                unit.forward = types.MethodType(lambda _self, *_a, _v=value, **_k: _v, unit)
                patched.append(unit)
            yield
        finally:
            for unit in patched:
                del unit.forward
