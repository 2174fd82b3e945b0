"""Pruning levels: a fraction of a target's elements in (0, 1), or an N:M pattern such as "2:4"."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

from .errors import PrunescopeError

Level = Union[float, str]
"""A fraction in (0, 1) of elements removed, or an "N:M" string (keep N of every M)."""

DEFAULT_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

MAX_LEVELS = 1000
"""The most levels a start:stop:step range may give (each is a cell per target)."""

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` non-zeros in every group of ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        """Fraction of elements removed."""
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_level(level: Level) -> float | NMPattern:
    """Validate one level; return a float fraction or an :class:`NMPattern`."""
    if isinstance(level, NMPattern):
        return level
    if isinstance(level, str):
        match = _NM.match(level)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise PrunescopeError(
                    f"N:M level {level!r} is malformed: need 0 < N < M (kept N of every M), e.g. '2:4'"
                )
            return NMPattern(n, m)
        try:
            level = float(level)
        except ValueError:
            raise PrunescopeError(
                f"level {level!r} is not a fraction in (0, 1) nor an N:M pattern such as '2:4'"
            ) from None
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise PrunescopeError(f"level {level!r} must be a fraction in (0, 1) or an N:M string such as '2:4'")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise PrunescopeError(f"level {level} is outside (0, 1); levels are fractions of elements removed")
    return level


def level_key(level: Level) -> str:
    """Canonical text of a level, used as a key in stores and JSON ("0.5", "2:4")."""
    parsed = parse_level(level)
    return str(parsed) if isinstance(parsed, NMPattern) else repr(parsed)


def level_sparsity(level: Level) -> float:
    """Fraction of elements a level removes."""
    parsed = parse_level(level)
    return parsed.sparsity if isinstance(parsed, NMPattern) else parsed


def parse_levels(levels: Iterable[Level]) -> list[float | NMPattern]:
    """Validate levels, drop duplicates, order fractions ascending then N:M patterns."""
    if levels is None:
        raise PrunescopeError("levels is None: give fractions in (0, 1) or N:M patterns, e.g. [0.25, 0.5, '2:4']")
    if isinstance(levels, (str, float, int, NMPattern)):
        levels = [levels]
    try:
        levels = list(levels)
    except TypeError:
        raise PrunescopeError(f"levels must be a list of fractions in (0, 1) or N:M patterns; got {type(levels).__name__}") from None
    parsed = [parse_level(level) for level in levels]
    if not parsed:
        raise PrunescopeError("levels is empty: give at least one fraction in (0, 1) or an N:M pattern")
    fractions = sorted({p for p in parsed if isinstance(p, float)})
    patterns = sorted({p for p in parsed if isinstance(p, NMPattern)}, key=lambda p: (p.sparsity, p.m))
    return [*fractions, *patterns]


def parse_levels_text(text: str) -> list[float | NMPattern]:
    """Parse a comma-separated list such as "0.1,0.5,2:4" or a range "0.1:0.9:0.1"."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and parts[0].count(":") == 2:
        try:
            start, stop, step = (float(x) for x in parts[0].split(":"))
        except ValueError:
            raise PrunescopeError(f"level range {text!r} must be start:stop:step with numbers, e.g. 0.1:0.9:0.1") from None
        if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0 or stop < start:
            raise PrunescopeError(f"level range {text!r} needs finite numbers, start <= stop and a positive step, e.g. 0.1:0.9:0.1")
        count = int(round((stop - start) / step)) + 1
        if count > MAX_LEVELS:
            raise PrunescopeError(f"level range {text!r} gives {count} levels; at most {MAX_LEVELS}: use a larger step")
        return parse_levels(round(start + i * step, 10) for i in range(count))
    return parse_levels(parts)


def is_nm_key(key: str) -> bool:
    """True for the key of an N:M level ("2:4"), False for a fraction ("0.5") or a whole block ("1")."""
    return ":" in key


def removed_share(level: Level) -> float:
    """Fraction a planned level removes: a fraction as is (0 and a whole block's 1 included), N:M parsed."""
    return float(level) if isinstance(level, (int, float)) else level_sparsity(level)
