"""Budget (what the user can afford) and Plan (a level per target)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import PrunescopeError
from .levels import Level, level_key, parse_level, removed_share

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """What the plan must remove, as one fraction in (0, 1). Give exactly one of:

    ``sparsity``: of the prunable parameters (the profile's targets), the classic pruning ratio;
    ``params``: of all the model's parameters; ``flops``: of the model's Conv/Linear FLOPs per
    sample. ``params`` and ``flops`` are computed from the shrunk shapes, so coupled channel groups
    (a conv losing input and output channels) are counted once and exactly.
    """

    sparsity: float | None = None
    params: float | None = None
    flops: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("sparsity", self.sparsity), ("params", self.params), ("flops", self.flops)) if v is not None}
        if len(given) != 1:
            raise PrunescopeError(f"a budget takes exactly one of sparsity, params, flops; got {', '.join(given) or 'none'}")
        (kind, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise PrunescopeError(f"budget {kind} {value!r} must be a fraction in (0, 1) removed")

    @property
    def kind(self) -> str:
        """Which quantity the budget limits: ``"sparsity"``, ``"params"`` or ``"flops"``."""
        return "sparsity" if self.sparsity is not None else "params" if self.params is not None else "flops"

    @property
    def fraction(self) -> float:
        """The fraction of that quantity to remove."""
        return float(getattr(self, self.kind))


@dataclass
class Plan:
    """The level to prune each target to, and how it was chosen.

    ``levels`` maps a target name to a fraction removed or an N:M string; ``params`` holds each
    target's parameter count so the plan's sparsity can be computed without the model.
    ``criterion``, ``seed``, ``round_to``, ``head_mode`` and ``options`` (a calibrated criterion's
    own settings: SparseGPT's ``block_size`` and ``damp``) decide which elements each level
    removes; a plan allocated from a profile carries the scan's, so ``apply`` removes what the
    scan measured.
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
    seed: int = 0
    round_to: int | None = None
    head_mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

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
        removed = sum(removed_share(lv) * self.params[n] for n, lv in self.levels.items())
        return removed / total if total else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["levels"] = {n: (lv if isinstance(lv, str) else float(lv)) for n, lv in self.levels.items()}
        return {"format": "prunescope.plan", "version": FORMAT_VERSION, **data, "sparsity": self.sparsity}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != "prunescope.plan":
            raise PrunescopeError("not a prunescope plan (missing format: prunescope.plan)")
        budget = Budget(**{k: v for k, v in data["budget"].items() if v is not None}) if data.get("budget") else None
        keys = ("levels", "params", "criterion", "granularity", "method", "predicted_drop", "metric", "details",
                "seed", "round_to", "head_mode", "options")
        values = {k: data[k] for k in keys if k in data}
        details = values.get("details") or {}
        for key in ("seed", "round_to", "head_mode"):  # plans written before these were fields kept them in details
            if key not in values and key in details:
                values[key] = details[key]
        return cls(**values, budget=budget)

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

    def uniform(self) -> Plan:
        """The plan removing this plan's sparsity from every one of its targets, with the same
        criterion and removal settings (the baseline a non-uniform plan is compared with)."""
        return replace(self, levels={n: self.sparsity for n in self.levels}, params=dict(self.params), method="uniform",
                       predicted_drop=None, details=dict(self.details))
