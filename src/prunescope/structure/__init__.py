"""Structured pruning units: coupled channel groups, attention heads, FFN neurons, whole blocks."""

from .channel_discovery import find_channel_groups, refused_channel_groups
from .channel_io import load_shrunk_channels, save_shrunk_channels
from .channel_mask import mask_channels
from .channel_plan import CHANNEL_CRITERIA, channel_unit_scores, plan_channel_removals
from .channel_shrink import count_flops, predicted_params, shrink_channels
from .groups import Slice, UnitGroup
from .residual_blocks import find_residual_blocks, shrink_residual_blocks
from .transformer_find import find_transformer_groups
from .transformer_io import load_shrunk, save_shrunk
from .transformer_layout import HEAD_MODES, TRANSFORMER_GRANULARITIES
from .transformer_mask import mask_units
from .transformer_shrink import shrink_transformer
from .unit_criteria import UNIT_CRITERIA, unit_scores, units_to_remove

__all__ = [
    "CHANNEL_CRITERIA", "channel_unit_scores", "count_flops", "find_channel_groups", "load_shrunk_channels",
    "mask_channels", "plan_channel_removals", "predicted_params", "refused_channel_groups", "save_shrunk_channels",
    "shrink_channels",
    "HEAD_MODES", "Slice", "TRANSFORMER_GRANULARITIES", "UNIT_CRITERIA", "UnitGroup", "find_transformer_groups",
    "load_shrunk", "mask_units", "save_shrunk", "shrink_transformer", "unit_scores", "units_to_remove",
    "find_residual_blocks", "shrink_residual_blocks",
]
