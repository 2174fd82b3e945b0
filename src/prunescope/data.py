"""Data specs the CLI understands: digits, pydoc, text:FILE, random:C,H,W."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def token_windows(
    text: str, tokenizer: Any, seq_len: int, windows: int, first_window: int = 0, batch_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows of ``seq_len`` tokens, starting at window ``first_window``."""
    if tokenizer is None:
        raise PrunescopeError("text data needs a model with a tokenizer (hf:PATH, smollm2, minilm)")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // seq_len
    if first_window + windows > available:
        raise PrunescopeError(
            f"the text has {available} windows of {seq_len} tokens; asked for windows {first_window}..{first_window + windows - 1}"
        )
    chunk = ids[first_window * seq_len : (first_window + windows) * seq_len].view(windows, seq_len)
    return [{"input_ids": chunk[i : i + batch_size]} for i in range(0, windows, batch_size)]


def random_inputs(shape: tuple[int, ...], samples: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Standard-normal inputs of ``shape`` per sample, seeded."""
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

    ``samples`` counts images or token windows; ``split`` picks the digits split (val or test).
    """
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        from .digits import batches_of, digits_splits

        splits = digits_splits()
        if split not in ("val", "test", "train"):
            raise PrunescopeError(f"digits split {split!r}; accepted: train, val, test")
        x, y = getattr(splits, split)
        if samples:
            x, y = x[:samples], y[:samples]
        return Data(batches_of((x, y), batch_size or 120), "accuracy", f"sklearn digits {split} split, {len(y)} images")
    if spec in ("pydoc",) or kind == "text":
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


def _read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise PrunescopeError(f"text file {path!r} does not exist")
    return file.read_text(encoding="utf-8", errors="replace")
