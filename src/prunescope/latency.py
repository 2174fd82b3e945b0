"""Wall-clock latency of models on the same inputs, measured alternately so that machine noise
falls on both alike; speed is reported as a ratio of medians."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from .batches import run_model
from .modes import eval_mode


def compare_latency(
    models: dict[str, nn.Module], batch: Any, repeats: int = 15, warmup: int = 2, threads: int | None = None
) -> dict[str, float]:
    """Median seconds per forward of each model on ``batch``, the models taking turns in each round;
    ``threads`` sets torch's intra-op threads for the measurement (restored afterwards)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with eval_mode(models.values()), torch.inference_mode():
            for round_index in range(warmup + repeats):
                for name, model in models.items():
                    started = time.perf_counter()
                    run_model(model, batch)
                    if round_index >= warmup:
                        times[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous_threads)
    return {name: statistics.median(values) for name, values in times.items()}
