"""Structured pruning units: coupled channel groups, attention heads, FFN neurons, whole blocks."""

from .groups import Slice, UnitGroup

__all__ = ["Slice", "UnitGroup"]
