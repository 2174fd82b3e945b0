"""UnitGroup: a set of removable units (channels, heads, neurons, blocks) and every tensor slice
that goes with each unit, so that masking and physical removal touch exactly the same weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Slice:
    """Unit ``u`` of a group owns ``tensor[..., offset + u * width : offset + (u + 1) * width, ...]``
    along ``dim`` of the parameter or buffer ``tensor`` (a state_dict key).

    ``role`` says why: ``"out"`` (a producer's output rows), ``"in"`` (a consumer's input
    columns), ``"norm"`` (a norm's per-channel entries), ``"bias"``.
    """

    tensor: str
    dim: int
    offset: int = 0
    width: int = 1
    role: str = "out"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class UnitGroup:
    """Units that are removed together along coupled tensors.

    Attributes:
        name: stable id, e.g. ``"layer1.0.conv1"`` or ``"model.layers.3.self_attn"``.
        granularity: ``"channel"``, ``"head"``, ``"neuron"`` or ``"block"``.
        units: how many units the group has (channels, heads or KV groups, neurons; 1 for a block).
        params_per_unit: parameters removed with one unit, summed over every slice.
        slices: every tensor slice a unit owns.
        flops_per_unit: FLOPs per sample removed with one unit, or None if unmeasured.
        min_units: units that must remain (a group is never emptied unless it is a block).
    """

    name: str
    granularity: str
    units: int
    params_per_unit: int
    slices: tuple[Slice, ...]
    flops_per_unit: float | None = None
    min_units: int = 1

    @property
    def params(self) -> int:
        return self.units * self.params_per_unit

    def to_dict(self) -> dict:
        data = asdict(self)
        data["slices"] = [s.to_dict() for s in self.slices]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> UnitGroup:
        return cls(**{**data, "slices": tuple(Slice(**s) for s in data["slices"])})
