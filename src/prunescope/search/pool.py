"""Candidates measured on several workers: local processes or Ray actors, like the cells of a scan.

Each worker holds its own copy of the dense model, the variant bank and the fitness batches (sent
once, when the pool starts) and measures whole candidates on the batches it is asked for; this
process measures its share too. A generation's candidates are dealt out in order (candidate ``i``
to worker ``i mod N``), so a search with the same seed and the same workers gives the same result.
Workers run every block of a candidate (the replay of the parent's blocks stays in this process).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import PrunescopeError, describe
from ..evaluator import Evaluator
from ..execution import check_execution, threads_per_worker
from ..oneshot.bank import VariantBank
from .measure import Measure, Working
from .space import LevelSpace


class WorkerMeasure:
    """What one worker runs: candidates assembled from the bank on its own model copy, KL on the batches."""

    def __init__(self, model: torch.nn.Module, bank: VariantBank, space: LevelSpace, batches: list, threads: int) -> None:
        torch.set_num_threads(threads)
        evaluator = Evaluator(model, batches, "kl")
        _ = evaluator.dense  # the reference outputs, from the dense weights, before any variant is swapped in
        self.measure = Measure(Working(model, bank, copy=False), space, evaluator)

    def __call__(self, states: Sequence[tuple[int, ...]], indices: Sequence[int]) -> list[float]:
        with torch.no_grad():
            return self.measure(states, indices)


def _serve(connection, payload: tuple) -> None:
    try:
        worker = WorkerMeasure(*payload)
        connection.send(("ready", None))
    except Exception as error:  # the parent raises it as a PrunescopeError
        connection.send(("error", describe(error)))
        return
    while True:
        message = connection.recv()
        if message is None:
            return
        try:
            connection.send(("values", worker(*message)))
        except Exception as error:
            connection.send(("error", describe(error)))


class CandidatePool:
    """``workers - 1`` helpers beside this process's ``home`` measure (local processes or Ray actors)."""

    def __init__(self, home, model: torch.nn.Module, bank: VariantBank, space: LevelSpace, batches: list,
                 workers: int, executor: str) -> None:
        check_execution(workers, executor)
        self.home, self.executor = home, executor
        self.threads = 1 if executor == "ray" else threads_per_worker(workers)
        self._previous_threads = torch.get_num_threads()
        payload = (copy.deepcopy(model).requires_grad_(False), bank, space, batches, self.threads)
        self._connections, self._processes, self._actors = [], [], []
        if executor == "ray":
            from ..execution.ray_tasks import ray_module

            ray = ray_module()
            if not ray.is_initialized():
                ray.init()
            remote = ray.remote(num_cpus=1)(WorkerMeasure)
            self._actors = [remote.remote(*payload) for _ in range(workers - 1)]
        else:
            context = torch.multiprocessing.get_context("spawn")
            for _ in range(workers - 1):
                mine, theirs = context.Pipe()
                process = context.Process(target=_serve, args=(theirs, payload), daemon=True)
                process.start()
                self._connections.append(mine)
                self._processes.append(process)
            for connection in self._connections:
                self._receive(connection)
        torch.set_num_threads(self.threads)

    @property
    def size(self) -> int:
        return 1 + len(self._connections) + len(self._actors)

    def __call__(self, states: Sequence[tuple[int, ...]], indices: Sequence[int], record: bool = False) -> list[float]:
        states, indices = list(states), list(indices)
        shares = [states[i :: self.size] for i in range(self.size)]
        helpers = shares[1:]
        if self._actors:
            pending = [actor.__call__.remote(share, indices) for actor, share in zip(self._actors, helpers, strict=True) if share]
        else:
            for connection, share in zip(self._connections, helpers, strict=True):
                if share:
                    connection.send((share, indices))
        results = [self.home(shares[0], indices, record=record) if shares[0] else []]
        if self._actors:
            import ray

            results += ray.get(pending)
        else:
            results += [self._receive(c) for c, share in zip(self._connections, helpers, strict=True) if share]
        values = [0.0] * len(states)
        for worker, share_values in enumerate(results):
            for offset, value in enumerate(share_values):
                values[worker + offset * self.size] = value
        return values

    def adopt(self, state: tuple[int, ...]) -> None:
        self.home.adopt(state)

    def _receive(self, connection) -> Any:
        try:
            kind, value = connection.recv()
        except (EOFError, ConnectionError):
            raise PrunescopeError("a search worker process died (out of memory?); run again with fewer workers") from None
        if kind == "error":
            raise PrunescopeError(f"a search worker failed: {value}")
        return value

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
        torch.set_num_threads(self._previous_threads)
