"""Cheap sensitivity estimates (magnitude, SNIP, Taylor, Fisher, OBS, Wanda, activation statistics,
block influence, head importance) returned as the same Profile as ``scan``, and their agreement
with a measured scan."""

from .agreement import Agreement, agreement
from .api import SCORES, describe_scores, estimate

__all__ = ["SCORES", "Agreement", "agreement", "describe_scores", "estimate"]
