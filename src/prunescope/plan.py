"""Budget (what the user can afford) and Plan (a level per target)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import PrunescopeError
from .levels import Level, level_key, level_sparsity, parse_level

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """A pruning budget: ``sparsity`` is the fraction in (0, 1) of prunable parameters to remove."""

    sparsity: float

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0.0 < self.sparsity < 1.0:
            raise PrunescopeError(f"budget sparsity {self.sparsity!r} must be a fraction in (0, 1) of prunable parameters removed")


@dataclass
class Plan:
    """The level to prune each target to, and how it was chosen.

    ``levels`` maps a target name to a fraction removed or an N:M string; ``params`` holds each
    target's parameter count so the plan's sparsity can be computed without the model.
    """

    levels: dict[str, Level]
    params: dict[str, int]
    criterion: str = "magnitude"
    granularity: str = "weight"
    method: str = "manual"
    budget: Budget | None = None
    predicted_drop: float | None = None
    metric: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.levels, self.params = dict(self.levels), dict(self.params)
        for name, level in self.levels.items():
            if name not in self.params:
                raise PrunescopeError(f"plan level for {name!r} has no parameter count")
            if self.granularity == "block":
                if level not in (0, 1):
                    raise PrunescopeError(f"a block is kept (0) or removed (1); plan gives {name!r} level {level!r}")
                self.levels[name] = float(level)
                continue
            parsed = parse_level(level) if level != 0 else 0.0
            self.levels[name] = parsed if isinstance(parsed, float) else str(parsed)

    @property
    def sparsity(self) -> float:
        """Fraction of the planned targets' parameters removed."""
        total = sum(self.params.values())
        removed = sum((lv if isinstance(lv, float) else level_sparsity(lv)) * self.params[n] for n, lv in self.levels.items())
        return removed / total if total else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["levels"] = {n: (lv if isinstance(lv, str) else float(lv)) for n, lv in self.levels.items()}
        return {"format": "prunescope.plan", "version": FORMAT_VERSION, **data, "sparsity": self.sparsity}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != "prunescope.plan":
            raise PrunescopeError("not a prunescope plan (missing format: prunescope.plan)")
        budget = Budget(**data["budget"]) if data.get("budget") else None
        keys = ("levels", "params", "criterion", "granularity", "method", "predicted_drop", "metric", "details")
        return cls(**{k: data[k] for k in keys if k in data}, budget=budget)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.exists():
            raise PrunescopeError(f"plan file {path} does not exist")
        return cls.from_json(path.read_text())

    def level_key(self, name: str) -> str:
        return level_key(self.levels[name])
