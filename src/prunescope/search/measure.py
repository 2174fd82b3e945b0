"""Candidates assembled from the variant bank on a working copy of the model, and their fitness."""

from __future__ import annotations

from copy import deepcopy

import torch

from ..evaluator import Evaluator
from ..oneshot.bank import VariantBank
from .replay import ParentReplay
from .space import LevelSpace


class Working:
    """A copy of the dense model whose searched layers hold bank variants; only changed layers are written.

    ``copy=False`` works on ``model`` itself (a worker's own copy), keeping its dense weights aside.
    """

    def __init__(self, model: torch.nn.Module, bank: VariantBank, *, copy: bool = True) -> None:
        self.model = deepcopy(model) if copy else model
        self.bank = bank
        weights = {n: model.get_submodule(n).weight.detach() for n in bank.names}
        self.dense = weights if copy else {n: w.clone() for n, w in weights.items()}
        self.current: dict[str, float] = {n: 0.0 for n in bank.names}

    @torch.no_grad()
    def set(self, levels: dict[str, float]) -> None:
        for name, level in levels.items():
            if self.current.get(name) != level:
                source = self.bank.weight(name, level) if level else self.dense[name]
                self.model.get_submodule(name).weight.copy_(source)
                self.current[name] = level


class Measure:
    """The fitness of states on fitness batches, each run from the first block where it differs from the parent."""

    def __init__(self, working: Working, space: LevelSpace, evaluator: Evaluator) -> None:
        self.working, self.space, self.evaluator = working, space, evaluator
        self.replay = ParentReplay(working.model, space.names)
        self.blocks_run = self.blocks_skipped = 0

    def __call__(self, states, indices, record: bool = False) -> list[float]:
        values = []
        indices = list(indices)
        for state in states:
            self.working.set(self.space.level_of(state))
            skip = self.replay.first_block(self.space.names, state) if self.replay.covers(indices) else 0
            self.blocks_skipped += skip * len(indices)
            self.blocks_run += (len(self.replay.blocks) - skip) * len(indices)
            with self.replay.running(state, skip, record):
                values.append(self.evaluator.evaluate(self.working.model, batch_indices=indices, on_batch=self.replay.window).value)
        return values

    def adopt(self, state: tuple[int, ...]) -> None:
        self.replay.adopt(state)
