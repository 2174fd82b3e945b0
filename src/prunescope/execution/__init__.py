"""Where a scan's cells are measured: in this process, in worker processes, or as Ray tasks.

The unit of work is one target with all its levels, so ``max_drop`` stops a target's levels as in
the serial scan and each worker reuses its incremental cache across the target's cells. Whatever
the executor, this process alone appends cells to the store (each as soon as it arrives, flushed
to disk) and assembles the Profile in the serial order (targets as given, levels as given).

- ``local`` with ``workers=1``: the serial scan in this process (:func:`prunescope.scan.scan`).
- ``local`` with ``workers=N``: this process (a thread on the caller's model) and N - 1 fresh
  Python processes (:mod:`.local`, :mod:`.worker`) with a pickled copy of the model and evaluator,
  each of the N with ``torch.get_num_threads() // N`` threads.
- ``ray``: one Ray task per target (:mod:`.ray_tasks`).

A target whose worker dies or raises is retried once; one that fails twice is reported, with
its missing cells, by a PrunescopeError raised after every other target is done and stored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import closing
from typing import TYPE_CHECKING

import torch

from ..errors import PrunescopeError
from ..profile import Cell
from ..progress import progress_bar
from ..store import CellStore
from ..target import Target
from .events import CellFinished, TargetFailed, TargetFinished, Task

if TYPE_CHECKING:
    from ..cell_runner import TargetRunner

EXECUTORS = ("local", "ray")


def check_execution(workers: int | None, executor: str) -> None:
    """Refuse an unknown executor, a worker count that is not a positive integer, or Ray missing."""
    if executor not in EXECUTORS:
        raise PrunescopeError(f"unknown executor {executor!r}; accepted: {', '.join(EXECUTORS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise PrunescopeError(f"workers must be a positive integer (processes, or Ray tasks at once) or None; got {workers!r}")
    if executor == "ray":
        from .ray_tasks import ray_module

        ray_module()


def threads_per_worker(workers: int) -> int:
    """This process's torch threads split between ``workers`` processes (at least one each)."""
    return max(1, torch.get_num_threads() // workers)


def run_parallel(payload: bytes, targets: list[Target], tasks: list[Task], results: dict[int, list[Cell]],
                 level_keys: list[str], store: CellStore | None, executor: str, workers: int | None,
                 progress: bool = False, home: Callable[[], TargetRunner] | None = None) -> tuple[list[Cell], dict, dict | None]:
    """Measure ``tasks`` on ``executor``; return (the cells of every target in the serial order, execution
    provenance, incremental summary). ``results`` holds the cells of the targets finished before (from
    the store); new cells are appended to ``store`` as they arrive. ``home`` builds a runner on the
    caller's model, making this process one of the local workers. Raises a PrunescopeError naming
    the cells of targets that failed twice, once all the others are done."""
    results = dict(results)
    threads = 1 if executor == "ray" else threads_per_worker(workers)
    if not tasks:
        events = (event for event in ())
    elif executor == "ray":
        from .ray_tasks import ray_events

        events = ray_events(payload, tasks, workers, threads)
    else:
        from .local import local_events

        events = local_events(payload, tasks, workers, threads, home, targets)
    failures: dict[int, TargetFailed] = {}
    replays: list[dict] = []
    stored = {task.index: set(task.known) for task in tasks}
    with closing(events), progress_bar(len(targets) * len(level_keys), "scan", enabled=progress) as bar:
        bar.advance(len(level_keys) * len(results) + sum(len(levels) for levels in stored.values()))
        for event in events:
            name = targets[event.index].name
            if isinstance(event, CellFinished):
                if store is not None:
                    store.append(event.cell)
                stored[event.index].add(event.cell.level)
                bar.advance(1, f"{name} @ {event.cell.level}: {event.cell.value:.4g}")
            elif isinstance(event, TargetFinished):
                results[event.index] = event.cells
                bar.advance(len(level_keys) - len(stored[event.index]), f"{name} done")
                if event.replay is not None:
                    replays.append(event.replay)
            else:
                failures[event.index] = event
                bar.advance(len(level_keys) - len(stored[event.index]), f"{name} failed")
    if failures:
        raise PrunescopeError(_failure_message(failures, targets, level_keys, stored, results))
    cells = [cell for index in range(len(targets)) for cell in results[index]]
    execution = {"executor": executor, "workers": workers, "threads_per_worker": threads, "targets_run": len(tasks)}
    return cells, execution, _replay_summary(replays)


def _failure_message(failures: dict[int, TargetFailed], targets: list[Target], level_keys: list[str],
                     stored: dict[int, set[str]], results: dict[int, list[Cell]]) -> str:
    """Each failed target with the cells it is missing and the last error; then how many cells are safe."""
    parts = []
    for index, failure in sorted(failures.items()):
        missing = [k for k in level_keys if k not in stored[index]]
        parts.append(f"{targets[index].name} @ {', '.join(missing)} (tried {failure.attempts} times; {failure.error})")
    finished = sum(len(cells) for cells in results.values()) + sum(len(stored[i]) for i in failures)
    return (f"{len(failures)} of {len(targets)} targets failed on a worker and on the retry, cells not measured: "
            f"{'; '.join(parts)}. The {finished} other cells are finished (and in the store, if one was given): "
            "fix the failure and re-run with the same store to measure only what is missing")


def _replay_summary(replays: list[dict]) -> dict | None:
    """The serial scan's ``provenance["incremental"]`` over the targets measured in workers (cache sizes: the
    largest worker's); warns as the serial scan does about replays that were refused."""
    if not replays:
        return None
    refused = {tuple(r["refused"]) for r in replays if r["refused"]}
    if refused:
        from ..cell_measure import refused_replay_warning

        warnings.warn(refused_replay_warning(refused), stacklevel=4)
    return {"units": max(r["units"] for r in replays), "targets_replaying": sum(1 for r in replays if r["replaying"]),
            "refused_replays": len(refused),
            "cache_bytes_in_memory": max(r["cache_bytes_in_memory"] for r in replays),
            "cache_bytes_spilled": max(r["cache_bytes_spilled"] for r in replays)}
