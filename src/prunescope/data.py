"""Data specs the CLI understands: digits, pydoc, text:FILE, random:C,H,W."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checks import whole_number
from .errors import PrunescopeError
from .models import LoadedModel

DATA_SPECS = "digits, pydoc, text:FILE, random:C,H,W"


@dataclass
class Data:
    """Fixed batches and the metric that suits them."""

    batches: list[Any]
    metric: str
    description: str


def pydoc_text() -> str:
    """The Python documentation topics shipped with every Python, joined in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """The text's token ids, without special tokens, as a 1-D long tensor."""
    if tokenizer is None:
        raise PrunescopeError("text data needs a model with a tokenizer (hf:PATH, smollm2, minilm)")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def token_windows(
    text: str, tokenizer: Any, seq_len: int, windows: int, first_window: int = 0, batch_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows of ``seq_len`` tokens, starting at window ``first_window``."""
    return windows_of(token_ids(text, tokenizer), seq_len, windows, first_window, batch_size)


def windows_of(ids: torch.Tensor, seq_len: int, windows: int, first_window: int = 0, batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Windows ``first_window`` .. ``first_window + windows - 1`` of ``seq_len`` tokens of ``ids``, batched."""
    seq_len, batch_size = whole_number(seq_len, "seq_len"), whole_number(batch_size, "batch_size")
    available = ids.numel() // seq_len
    if windows < 1 or first_window < 0 or first_window + windows > available:
        raise PrunescopeError(
            f"the text has {available} windows of {seq_len} tokens; asked for windows {first_window}..{first_window + windows - 1}"
        )
    chunk = ids[first_window * seq_len : (first_window + windows) * seq_len].view(windows, seq_len)
    return [{"input_ids": chunk[i : i + batch_size]} for i in range(0, windows, batch_size)]


def split_windows(
    text: str, tokenizer: Any, seq_len: int, calibration: int, evaluation: int, first_window: int | None = None, batch_size: int = 1
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], int]:
    """Calibration windows from the start of the text's first half, evaluation windows from its second.

    The text is cut into whole windows of ``seq_len`` tokens and the windows into two halves;
    ``first_window`` moves the evaluation windows (default: the first window of the second half)
    but may not overlap the calibration windows. Returns (calibration, evaluation, first evaluation window).
    """
    ids = token_ids(text, tokenizer)
    half = (ids.numel() // seq_len) // 2
    if calibration > half:
        raise PrunescopeError(f"the text's first half has {half} windows of {seq_len} tokens; asked for {calibration} calibration windows")
    start = half if first_window is None else first_window
    if start < calibration:
        raise PrunescopeError(f"evaluation windows from {start} would overlap the calibration windows 0..{calibration - 1}")
    return (windows_of(ids, seq_len, calibration, 0, batch_size), windows_of(ids, seq_len, evaluation, start, batch_size), start)


def random_inputs(shape: tuple[int, ...], samples: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Standard-normal inputs of ``shape`` per sample, seeded."""
    whole_number(samples, "samples"), whole_number(batch_size, "batch_size")
    if not shape or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise PrunescopeError(f"random input shape {tuple(shape)} must be whole numbers >= 1, e.g. random:3,32,32")
    gigabytes = samples * math.prod(shape) * 4 / 1e9
    if gigabytes > 8:
        raise PrunescopeError(f"{samples} random inputs of shape {tuple(shape)} would take {gigabytes:.0f} GB; use fewer or smaller")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, *shape), generator=generator)
    return [x[i : i + batch_size] for i in range(0, samples, batch_size)]


def load_data(
    spec: str,
    loaded: LoadedModel,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    seq_len: int = 512,
    first_window: int = 0,
    split: str = "val",
) -> Data:
    """Batches for ``loaded`` from a data spec (see ``DATA_SPECS``).

    ``samples`` counts images or token windows (default: every image, 4 windows, 16 random inputs);
    ``batch_size`` samples per batch (default 120 images, 1 window, 8 random inputs); ``split`` picks
    the digits split (val or test).
    """
    check_data_arguments(samples=samples, batch_size=batch_size, seq_len=seq_len, first_window=first_window)
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        from .digits import batches_of, digits_splits

        splits = digits_splits()
        if split not in ("val", "test", "train"):
            raise PrunescopeError(f"digits split {split!r}; accepted: train, val, test")
        x, y = getattr(splits, split)
        if samples is not None:
            if samples > len(y):
                raise PrunescopeError(f"the digits {split} split has {len(y)} images; asked for {samples} samples")
            x, y = x[:samples], y[:samples]
        return Data(batches_of((x, y), batch_size or 120), "accuracy", f"sklearn digits {split} split, {len(y)} images")
    if is_text_spec(spec):
        text = pydoc_text() if spec == "pydoc" else _read_text(rest)
        windows = samples or 4
        batches = token_windows(text, loaded.tokenizer, seq_len, windows, first_window, batch_size or 1)
        metric = "perplexity" if loaded.kind == "causal_lm" else "cosine"
        source = "pydoc_data.topics" if spec == "pydoc" else rest
        return Data(batches, metric, f"{source}: windows {first_window}..{first_window + windows - 1} of {seq_len} tokens")
    if kind == "random" and rest:
        try:
            shape = tuple(int(v) for v in rest.split(","))
        except ValueError:
            raise PrunescopeError(f"random data spec {spec!r} must be random:C,H,W with integers") from None
        count = samples or 16
        return Data(random_inputs(shape, count, batch_size or 8), "kl", f"{count} random normal inputs of shape {shape}")
    raise PrunescopeError(f"unknown data spec {spec!r}; accepted: {DATA_SPECS}")


def check_data_arguments(*, samples: int | None = None, batch_size: int | None = None, seq_len: int = 512,
                         first_window: int | None = 0, calibration_samples: int | None = None) -> None:
    """Refuse counts a data spec cannot take: ``samples`` and ``batch_size`` None or >= 1, ``seq_len`` >= 1,
    ``first_window`` None or >= 0 (a negative count would silently slice from the end)."""
    whole_number(samples, "samples", optional=True)
    whole_number(batch_size, "batch_size", optional=True)
    whole_number(seq_len, "seq_len")
    whole_number(first_window, "first_window", 0, optional=True)
    whole_number(calibration_samples, "calibration samples", optional=True)


def _read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise PrunescopeError(f"text file {path!r} does not exist")
    return file.read_text(encoding="utf-8", errors="replace")


def oneshot_data(
    spec: str,
    loaded: LoadedModel,
    *,
    calibration_samples: int,
    samples: int | None = None,
    batch_size: int | None = None,
    seq_len: int = 512,
    first_window: int | None = None,
    split: str = "test",
) -> tuple[Data, Data]:
    """(calibration, evaluation) data for one-shot pruning, kept apart.

    Text (pydoc, text:FILE): ``calibration_samples`` windows from the start of the first half,
    ``samples`` (default 4) evaluation windows from the second half (see :func:`split_windows`).
    digits: the first ``calibration_samples`` training images, evaluation on ``split``.
    random:C,H,W: ``calibration_samples`` inputs of seed 1 (evaluation inputs use seed 0).
    """
    whole_number(calibration_samples, "calibration samples")
    check_data_arguments(samples=samples, batch_size=batch_size, seq_len=seq_len, first_window=first_window)
    kind, _, rest = spec.partition(":")
    if is_text_spec(spec):
        text = pydoc_text() if spec == "pydoc" else _read_text(rest)
        windows = samples or 4
        calibration, evaluation, start = split_windows(text, loaded.tokenizer, seq_len, calibration_samples, windows,
                                                       first_window, batch_size or 1)
        metric = "perplexity" if loaded.kind == "causal_lm" else "cosine"
        source = "pydoc_data.topics" if spec == "pydoc" else rest
        return (Data(calibration, metric, f"{source}: windows 0..{calibration_samples - 1} of {seq_len} tokens (first half)"),
                Data(evaluation, metric, f"{source}: windows {start}..{start + windows - 1} of {seq_len} tokens"))
    evaluation = load_data(spec, loaded, samples=samples, batch_size=batch_size, seq_len=seq_len,
                           first_window=first_window or 0, split=split)
    if spec == "digits":
        from .digits import batches_of, digits_splits

        x, y = digits_splits().train
        if calibration_samples > len(y):
            raise PrunescopeError(f"the digits train split has {len(y)} images; asked for {calibration_samples} calibration samples")
        x, y = x[:calibration_samples], y[:calibration_samples]
        return Data(batches_of((x, y), batch_size or 120), "accuracy", f"sklearn digits train split, {len(y)} images"), evaluation
    shape = tuple(evaluation.batches[0].shape[1:])  # random:C,H,W, the one spec left
    inputs = random_inputs(shape, calibration_samples, batch_size or 8, seed=1)
    return Data(inputs, "kl", f"{calibration_samples} random normal inputs of shape {shape}, seed 1"), evaluation


def is_text_spec(spec: str) -> bool:
    """Whether ``spec`` names text (``pydoc`` or ``text:FILE``), which is cut into token windows."""
    return spec == "pydoc" or spec.partition(":")[0] == "text"


def search_data(
    spec: str,
    loaded: LoadedModel,
    *,
    calibration_samples: int,
    fitness_samples: int,
    samples: int | None = None,
    batch_size: int | None = None,
    seq_len: int = 512,
    first_window: int | None = None,
) -> tuple[Data, Data, Data]:
    """(calibration, fitness, evaluation) windows of a text for a search, kept apart.

    The text's whole windows of ``seq_len`` tokens are cut into two halves: calibration is windows
    ``0 .. calibration_samples - 1`` of the first half and fitness the ``fitness_samples`` windows after
    them (both within the first half); ``samples`` (default 4) evaluation windows start at
    ``first_window`` (default: the first window of the second half), never before the fitness windows end.
    """
    whole_number(calibration_samples, "calibration samples")
    whole_number(fitness_samples, "fitness samples")
    check_data_arguments(samples=samples, batch_size=batch_size, seq_len=seq_len, first_window=first_window)
    if not is_text_spec(spec):
        raise PrunescopeError(f"a search measures a language model on text; data spec {spec!r} is not text (accepted: pydoc, text:FILE)")
    text = pydoc_text() if spec == "pydoc" else _read_text(spec.partition(":")[2])
    ids = token_ids(text, loaded.tokenizer)
    half = (ids.numel() // seq_len) // 2
    used = calibration_samples + fitness_samples
    if used > half:
        raise PrunescopeError(f"the text's first half has {half} windows of {seq_len} tokens; {calibration_samples} calibration and "
                              f"{fitness_samples} fitness windows need {used}")
    start = half if first_window is None else first_window
    if start < used:
        raise PrunescopeError(f"evaluation windows from {start} would overlap the calibration and fitness windows 0..{used - 1}")
    windows, size = samples or 4, batch_size or 1
    source = "pydoc_data.topics" if spec == "pydoc" else spec.partition(":")[2]
    metric = "perplexity" if loaded.kind == "causal_lm" else "cosine"

    def part(count: int, first: int, what: str) -> Data:
        return Data(windows_of(ids, seq_len, count, first, size), metric,
                    f"{source}: windows {first}..{first + count - 1} of {seq_len} tokens{what}")

    return (part(calibration_samples, 0, " (first half)"), part(fitness_samples, calibration_samples, " (first half)"),
            part(windows, start, ""))
