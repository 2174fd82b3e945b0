"""What a worker needs to measure targets, pickled once: the model, the evaluator (with its dense
outputs), the targets, the scan settings and the calibration batches.

The bytes hold the parent's ``sys.path`` beside the cloudpickled context, so a worker (a fresh
interpreter, or a Ray worker) can import the modules that define the model's classes before it
unpickles them (classes defined in ``__main__`` travel by value), and the parent's hook-id counter,
so the worker's own hooks never collide with the model's.
"""

from __future__ import annotations

import copy
import pickle
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from ..errors import PrunescopeError

if TYPE_CHECKING:
    from ..cell_runner import ScanSettings, TargetRunner
    from ..evaluator import Evaluator
    from ..target import Target


@dataclass
class WorkerContext:
    """The inputs of :class:`prunescope.scan.TargetRunner`, as one picklable object."""

    model: torch.nn.Module
    evaluator: Evaluator
    targets: list[Target]
    settings: ScanSettings
    calibration: list[Any] | None = None


def pack(context: WorkerContext) -> bytes:
    """Pickle ``context`` for the workers; a model or evaluator that cannot be pickled is refused."""
    import cloudpickle

    evaluator = copy.copy(context.evaluator)
    evaluator.batches = _compact(evaluator.batches)
    context = replace(context, evaluator=evaluator, calibration=_compact(context.calibration))
    try:
        blob = cloudpickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # any pickling failure means the same thing here
        raise PrunescopeError(
            f"workers get a pickled copy of the model and evaluator, and pickling failed: {type(error).__name__}: "
            f"{str(error)[:300]}; pass workers=1 (in this process) or make the model picklable") from error
    header = {"sys_path": list(sys.path), "hook_ids": RemovableHandle.next_id, "context": blob}
    return pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)


def _compact(batches: Any) -> Any:
    """``batches`` with every tensor that views a larger storage copied into its own.

    A tensor pickles with its whole storage, so 16 batches sliced from one 64-image tensor would
    carry the 64 images 16 times (50 MB instead of 3 MB for the resnet18 bench).
    """
    from torch.utils._pytree import tree_map

    def own_storage(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().nbytes() > leaf.nbytes:
            return leaf.clone()
        return leaf

    return tree_map(own_storage, batches)


def unpack(data: bytes) -> WorkerContext:
    """The context pickled by :func:`pack`, after adding the parent's import paths to ``sys.path``."""
    header = pickle.loads(data)
    for entry in header["sys_path"]:
        if entry not in sys.path:
            sys.path.append(entry)
    # A module's hooks are kept in dicts keyed by a per-process counter; a fresh process counts from 0,
    # so a hook this process registers (the incremental cache's) would overwrite and then remove a
    # hook of the unpickled model that has the same id. Count on from the parent's counter.
    RemovableHandle.next_id = max(RemovableHandle.next_id, header["hook_ids"])
    return pickle.loads(header["context"])


def runner_of(context: WorkerContext, threads: int) -> TargetRunner:
    """A TargetRunner on the context's own model copy, running torch on ``threads`` threads."""
    from ..cell_runner import TargetRunner

    torch.set_num_threads(threads)
    return TargetRunner(context.model, context.evaluator, context.targets, context.settings,
                        calibration=context.calibration, eager=False)
