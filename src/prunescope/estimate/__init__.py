"""Cheap sensitivity estimates (magnitude, SNIP, Taylor, Fisher, OBS, Wanda, activation statistics,
block influence, head importance) returned as the same Profile as ``scan``, and their agreement
with a measured scan."""

from .agreement import Agreement, agreement
from .api import METHODS, describe_methods, estimate

__all__ = ["METHODS", "Agreement", "agreement", "describe_methods", "estimate"]
