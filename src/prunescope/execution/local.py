"""Workers on this machine: this process (a thread measuring on the caller's own model, restored
bit for bit after every cell) and ``workers - 1`` fresh interpreters, each holding its own copy.

This process is one of the workers because it is ready at once: a worker process spends seconds
importing torch, unpickling the model and recording its cache before its first cell (about 5 s
here), which on two cores would otherwise leave both idle for that long.

The parent hands each idle worker one :class:`Task` (a target with all its levels) and reads
what the workers send back as it arrives. A worker that dies (its pipe closes) or reports an
exception is replaced by a fresh process, which retries that target first, from the cells already
received; a target that fails twice becomes a :class:`TargetFailed` event and the others go on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import PrunescopeError, describe
from ..profile import Cell
from .events import CellFinished, Event, TargetFailed, TargetFinished, Task
from .worker import BROKEN, measure

if TYPE_CHECKING:
    from ..cell_runner import TargetRunner
    from ..target import Target

ATTEMPTS = 2
"""A target is measured at most this many times (the first try and one retry)."""


class _Seat:
    """What the parent knows of any worker: the pipe it sends tasks on, the pipe it reads results
    from, the task in hand and the cells received for it."""

    tasks: Connection
    results: Connection
    task: Task | None = None
    received: dict[str, Cell]

    def give(self, task: Task) -> None:
        self.task, self.received = task, dict(task.known)
        try:
            self.tasks.send(task)
        except OSError:  # already gone: its closed result pipe reports it
            pass


class _Worker(_Seat):
    """One worker process and the two pipes to it."""

    def __init__(self, payload: Path, threads: int) -> None:
        task_read, task_write = os.pipe()
        result_read, result_write = os.pipe()
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "prunescope.execution.worker", str(task_read), str(result_write), str(payload),
                   str(threads)]
        try:
            self.process = subprocess.Popen(command, pass_fds=(task_read, result_write), env=environment,
                                            stdin=subprocess.DEVNULL)
        finally:
            os.close(task_read)
            os.close(result_write)
        self.tasks = Connection(task_write, readable=False)
        self.results = Connection(result_read, writable=False)
        self.received = {}

    def death(self) -> str:
        """How the process ended, once its pipe has closed."""
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "the worker process stopped answering"
        if code < 0:
            try:
                return f"the worker process was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"the worker process was killed by signal {-code}"
        return f"the worker process died (exit code {code})"

    def stop(self) -> None:
        """Ask an idle worker to exit; kill a busy one (the scan is being abandoned)."""
        if self.task is not None and self.process.poll() is None:
            self.process.kill()
        try:
            self.tasks.send(None)
        except OSError:
            pass
        for connection in (self.tasks, self.results):
            connection.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _HomeWorker(_Seat):
    """This process as a worker: a thread measuring with a runner on the caller's model. Answers on
    a pipe like a worker process, so the parent waits on both alike; once a target fails here, the
    thread ends and a worker process takes its place."""

    def __init__(self, make_runner: Callable[[], TargetRunner], targets: list[Target]) -> None:
        task_read, self.tasks = Pipe(duplex=False)
        self.results, result_write = Pipe(duplex=False)
        self.received = {}
        self.error = "it ended without a reason"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(make_runner, targets, task_read, result_write),
                                        name="prunescope-scan", daemon=True)
        self._thread.start()

    def _serve(self, make_runner: Callable[[], TargetRunner], targets: list[Target], inbox: Connection,
               outbox: Connection) -> None:
        runner = None
        try:
            runner = make_runner()
            measure(inbox, outbox, targets, runner, self._stop)
        except Exception as error:  # the runner could not be built: the parent retries the target in a process
            self.error = describe(error)
        finally:
            if runner is not None:
                runner.close()  # removes its hooks from the caller's model
            inbox.close()
            outbox.close()

    def death(self) -> str:
        self._thread.join()
        return f"this process's scanning thread stopped: {self.error}"

    def stop(self) -> None:
        """Ask the thread to stop after its current cell and wait for it (the model is restored by then)."""
        self._stop.set()
        try:
            self.tasks.send(None)
        except OSError:
            pass
        self._thread.join()
        for connection in (self.tasks, self.results):
            connection.close()


def local_events(payload: bytes, tasks: list[Task], workers: int, threads: int,
                 home: Callable[[], TargetRunner] | None = None, targets: list[Target] | None = None) -> Iterator[Event]:
    """Measure ``tasks`` on ``workers`` workers of ``threads`` torch threads each; yield events as they come.
    With ``home`` (a factory of a runner on the caller's model) and ``targets``, this process is one of
    them and ``workers - 1`` are processes; without, all ``workers`` are processes."""
    if os.name != "posix":
        raise PrunescopeError("workers > 1 start worker processes with inherited pipes, which needs a POSIX system; "
                              "use workers=1 or executor='ray'")
    folder = Path(tempfile.mkdtemp(prefix="prunescope-workers-"))
    path = folder / "payload.pkl"
    path.write_bytes(payload)
    queue = deque(tasks)
    attempts: Counter[int] = Counter()
    pool: list[_Seat] = []
    threads_before = torch.get_num_threads()
    try:
        wanted = min(workers, len(queue))
        if home is not None and wanted:
            torch.set_num_threads(threads)
            pool.append(_HomeWorker(home, targets))
        pool.extend(_Worker(path, threads) for _ in range(wanted - len(pool)))
        while queue or any(w.task is not None for w in pool):
            for worker in pool:
                if worker.task is None and queue:
                    worker.give(queue.popleft())
            busy = {w.results: w for w in pool if w.task is not None}
            for connection in wait(list(busy)):
                worker = busy[connection]
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    message = TargetFailed(worker.task.index, worker.death(), 1)
                if isinstance(message, tuple) and message and message[0] == BROKEN:
                    raise PrunescopeError(f"a worker process could not load the model and evaluator: {message[1]}. "
                                          "Define the model's classes in an importable module, or use workers=1")
                if isinstance(message, CellFinished):
                    worker.received[message.cell.level] = message.cell
                    yield message
                elif isinstance(message, TargetFinished):
                    worker.task = None
                    yield message
                elif isinstance(message, TargetFailed):
                    task = Task(worker.task.index, dict(worker.received))
                    pool.remove(worker)
                    worker.task = None
                    worker.stop()
                    attempts[task.index] += 1
                    if attempts[task.index] < ATTEMPTS:
                        fresh = _Worker(path, threads)
                        pool.append(fresh)
                        fresh.give(task)
                    else:
                        yield TargetFailed(task.index, message.error, attempts[task.index])
                        if queue:
                            pool.append(_Worker(path, threads))
    finally:
        for worker in pool:
            worker.stop()
        torch.set_num_threads(threads_before)
        shutil.rmtree(folder, ignore_errors=True)
