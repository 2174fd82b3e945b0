"""Cells as Ray tasks: one task per target, the pickled model and batches put in the object store once.

Each Ray worker process unpickles the payload on its first task and keeps the resulting
:class:`prunescope.scan.TargetRunner` (model copy, incremental cache) for the next tasks of the
same scan. A task returns all the cells of its target; the parent streams them into its store as
tasks finish (``ray.wait``). Retries: Ray re-runs a task whose worker process died once
(``max_retries=1``); a task that raised is resubmitted once by the parent; a target that still
fails becomes a :class:`TargetFailed` event.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

from ..errors import PrunescopeError, describe
from .events import CellFinished, Event, TargetFailed, TargetFinished, Task

_RUNNERS: dict[str, tuple[Any, list]] = {}
"""This Ray worker process's (runner, targets), by the object id of the payload it was built from (one scan at a time)."""


def ray_module():
    """``import ray``, or a PrunescopeError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PrunescopeError("executor 'ray' needs Ray: pip install 'prunescope[ray]'") from None
    return ray


def _run_target(boxed: list, index: int, known: dict, threads: int) -> tuple[list, list, dict | None]:
    """Ray task body: (new cells, all cells, replay status) of target ``index``.

    ``boxed`` holds the payload's ObjectRef inside a list so that Ray passes the reference rather
    than the bytes, and a worker that already holds the runner does not fetch them again.
    """
    import ray

    from .payload import runner_of, unpack

    reference = boxed[0]
    key = reference.hex()
    if key not in _RUNNERS:
        for runner, _ in _RUNNERS.values():
            runner.close()
        _RUNNERS.clear()
        context = unpack(ray.get(reference))
        _RUNNERS[key] = (runner_of(context, threads), context.targets)
    runner, targets = _RUNNERS[key]
    target = targets[index]
    fresh, cells = [], []
    for cell, new in runner.cells(target, known):
        cells.append(cell)
        if new:
            fresh.append(cell)
    return fresh, cells, runner.replay_status(target)


def ray_events(payload: bytes, tasks: list[Task], workers: int | None, threads: int) -> Iterator[Event]:
    """Run ``tasks`` as Ray tasks, at most ``workers`` at once (default: the cluster's CPUs / ``threads``)."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init()
    in_flight = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    remote = ray.remote(num_cpus=threads, max_retries=1)(_run_target)
    boxed = [ray.put(payload)]
    queue = deque(tasks)
    attempts: Counter[int] = Counter()
    running: dict[Any, Task] = {}
    try:
        while queue or running:
            while queue and len(running) < in_flight:
                task = queue.popleft()
                running[remote.remote(boxed, task.index, task.known, threads)] = task
            finished, _ = ray.wait(list(running), num_returns=1)
            for reference in finished:
                task = running.pop(reference)
                try:
                    fresh, cells, replay = ray.get(reference)
                except ray.exceptions.RayTaskError as error:  # the task raised: resubmit it once
                    attempts[task.index] += 1
                    cause = getattr(error, "cause", None)
                    reason = describe(cause) if isinstance(cause, BaseException) else describe(error)
                    if attempts[task.index] < 2:
                        queue.appendleft(task)
                    else:
                        yield TargetFailed(task.index, reason, attempts[task.index])
                    continue
                except ray.exceptions.RayError as error:  # the worker died twice (Ray retried once) or was lost
                    yield TargetFailed(task.index, f"the Ray worker failed (after Ray's own retry): {describe(error)}", 2)
                    continue
                for cell in fresh:
                    yield CellFinished(task.index, cell)
                yield TargetFinished(task.index, cells, replay)
    finally:
        for reference in running:  # abandoned (the parent failed or was interrupted)
            ray.cancel(reference, force=True)
