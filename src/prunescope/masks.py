"""Criteria that choose which elements of a weight tensor to remove, as boolean keep-masks."""

from __future__ import annotations

import hashlib

import torch

from .criteria import check_criterion
from .errors import PrunescopeError
from .levels import Level, NMPattern, level_key, parse_level


def _generator(seed: int, key: str, level: Level) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{key}|{level_key(level)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def check_nm_compatible(shape: tuple[int, ...], input_dim: int, pattern: NMPattern, name: str = "") -> None:
    """Refuse an N:M pattern when the input dimension is not a multiple of M."""
    size = shape[input_dim]
    if size % pattern.m:
        raise PrunescopeError(
            f"level '{pattern}' needs the input dimension of {name or 'the target'} to be a multiple of "
            f"{pattern.m}; it is {size}. Exclude that target or use a fractional level"
        )


def magnitude_order(weight: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``weight`` from the smallest |w| up (ties: earlier position first)."""
    with torch.no_grad():
        return torch.argsort(weight.detach().reshape(-1).abs().float().cpu(), stable=True)


def keep_mask(
    weight: torch.Tensor,
    level: Level,
    criterion: str = "magnitude",
    input_dim: int = 1,
    seed: int = 0,
    key: str = "",
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of the weights to keep (True) under ``level`` and ``criterion``.

    A fraction removes exactly round(level * numel) elements, the smallest |w| for ``"magnitude"``
    (ties broken by position) or a seeded random choice for ``"random"`` (same seed, key and level,
    same mask). An :class:`NMPattern` keeps N of every M consecutive weights along ``input_dim``.
    ``order`` is :func:`magnitude_order` of ``weight``, when the caller already has it (a scan
    sorts each target once for all its levels).
    """
    check_criterion(criterion, "weight", calibration=False)
    parsed = parse_level(level)
    with torch.no_grad():
        if isinstance(parsed, NMPattern):
            return _nm_mask(weight, parsed, criterion, input_dim, _generator(seed, key, parsed), name=key)
        flat = weight.detach().reshape(-1)
        remove = int(round(parsed * flat.numel()))
        mask = torch.ones(flat.numel(), dtype=torch.bool)
        if remove:
            if criterion == "magnitude":
                order = magnitude_order(weight) if order is None else order
            else:
                order = torch.randperm(flat.numel(), generator=_generator(seed, key, parsed))
            mask[order[:remove]] = False
        return mask.view(weight.shape).to(weight.device)


def _nm_mask(
    weight: torch.Tensor, pattern: NMPattern, criterion: str, input_dim: int, gen: torch.Generator, name: str = ""
) -> torch.Tensor:
    check_nm_compatible(tuple(weight.shape), input_dim, pattern, name)
    moved = weight.detach().movedim(input_dim, -1)
    groups = moved.reshape(-1, pattern.m)
    if criterion == "magnitude":
        scores = groups.abs().float().cpu()
        # stable: equal magnitudes keep the earlier position
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
    else:
        order = torch.argsort(torch.rand(groups.shape, generator=gen), dim=1)
    mask = torch.zeros(groups.shape, dtype=torch.bool)
    mask.scatter_(1, order[:, : pattern.n], True)
    return mask.view(moved.shape).movedim(-1, input_dim).contiguous().to(weight.device)
