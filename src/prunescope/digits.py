"""The built-in default: a small CNN trained on scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .progress import progress_bar

SPLIT_SEED = 0


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU stages and a two-layer classifier for 1x8x8 digit images (10 classes)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * w, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class DigitsSplits:
    """Train / validation / test tensors: images [N, 1, 8, 8] scaled to [0, 1], labels [N]."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def digits_splits() -> DigitsSplits:
    """sklearn's 1797 digits, shuffled with a fixed seed: 1077 train, 360 validation, 360 test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    images, labels = images[order], labels[order]
    return DigitsSplits((images[:1077], labels[:1077]), (images[1077:1437], labels[1077:1437]), (images[1437:], labels[1437:]))


def batches_of(split: tuple[torch.Tensor, torch.Tensor], batch_size: int = 120) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, ordered (images, labels) batches of a split."""
    x, y = split
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def train_digits_cnn(epochs: int = 30, width: int = 32, seed: int = 0, progress: bool = False) -> DigitsCNN:
    """Train :class:`DigitsCNN` with Adam on the train split; deterministic for a given seed."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    x, y = digits_splits().train
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with progress_bar(epochs, "train digits CNN", enabled=progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for i in range(0, len(y), 64):
                index = order[i : i + 64]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                loss.backward()
                optimizer.step()
            scheduler.step()
            bar.advance(1, f"epoch {epoch + 1} loss {loss.item():.3f}")
    model.zero_grad(set_to_none=True)
    model.eval()
    return model


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNESCOPE_CACHE", Path.home() / ".cache" / "prunescope"))


def pretrained_digits_cnn(epochs: int = 30, width: int = 32, seed: int = 0, progress: bool = False) -> DigitsCNN:
    """A trained :class:`DigitsCNN`, trained once and cached as safetensors in ``cache_dir()``."""
    from safetensors.torch import load_file, save

    from .atomic import write_bytes_atomic

    tag = hashlib.sha256(f"{epochs}|{width}|{seed}|{torch.__version__}".encode()).hexdigest()[:12]
    path = cache_dir() / f"digits_cnn_{tag}.safetensors"
    if path.exists():
        model = DigitsCNN(width)
        model.load_state_dict(load_file(path))
        return model.eval()
    model = train_digits_cnn(epochs, width, seed, progress)

    write_bytes_atomic(path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    return model
