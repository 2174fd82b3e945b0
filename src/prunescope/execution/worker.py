"""A local worker process: ``python -m prunescope.execution.worker IN_FD OUT_FD PAYLOAD THREADS``.

Started by :mod:`prunescope.execution.local` as a fresh interpreter (never forked from the
scanning process: a fork after torch has started its OpenMP threads can hang, and a fork copies
whatever locks other threads hold). It loads the pickled :class:`WorkerContext` from the
``PAYLOAD`` file, then reads :class:`Task` messages from ``IN_FD`` and answers on ``OUT_FD``: a
:class:`CellFinished` per newly measured cell, then :class:`TargetFinished`, or
:class:`TargetFailed` and exit after an exception (the parent retries on a fresh worker).
``None`` or the end of ``IN_FD`` (the parent is gone) stops it. Ctrl-C is left to the parent.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from ..errors import describe
from .events import CellFinished, TargetFailed, TargetFinished, Task

if TYPE_CHECKING:
    from ..cell_runner import TargetRunner
    from ..target import Target

BROKEN = "broken"
"""First element of the message a worker sends when it cannot load the payload."""


def serve(inbox: Connection, outbox: Connection, payload_path: str, threads: int) -> int:
    """Load the payload, then measure tasks until told to stop; the process exit code."""
    from .payload import runner_of, unpack

    try:
        with open(payload_path, "rb") as handle:
            context = unpack(handle.read())
        runner = runner_of(context, threads)
    except Exception as error:  # the parent reports it: nothing here can be retried
        outbox.send((BROKEN, describe(error)))
        return 1
    try:
        return measure(inbox, outbox, context.targets, runner)
    except (BrokenPipeError, EOFError):  # the parent is gone
        return 0
    finally:
        runner.close()


def measure(inbox: Connection, outbox: Connection, targets: list[Target], runner: TargetRunner, stop: threading.Event | None = None) -> int:
    """Measure the tasks read from ``inbox`` with ``runner`` until told to stop (``None``, the end of
    ``inbox``, or ``stop`` set, checked after each cell); 1 after a target failed (reported), else 0."""
    while True:
        try:
            task = inbox.recv()
        except EOFError:
            return 0
        if not isinstance(task, Task):
            return 0
        try:
            cells = []
            for cell, fresh in runner.cells(targets[task.index], task.known):
                if fresh:
                    outbox.send(CellFinished(task.index, cell))
                cells.append(cell)
                if stop is not None and stop.is_set():
                    return 0
        except Exception as error:
            outbox.send(TargetFailed(task.index, describe(error), 1))
            return 1
        outbox.send(TargetFinished(task.index, cells, runner.replay_status(targets[task.index])))


def main(argv: list[str]) -> None:
    """Serve, then leave at once: a full interpreter teardown (torch's) takes seconds and does nothing useful."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    in_fd, out_fd, payload_path, threads = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    inbox, outbox = Connection(in_fd, writable=False), Connection(out_fd, readable=False)
    code = 1
    try:
        code = serve(inbox, outbox, payload_path, threads)
    except BaseException:  # a bug here: show it before leaving (the parent reports the lost target)
        traceback.print_exc()
    finally:
        inbox.close()
        outbox.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
