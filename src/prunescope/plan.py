"""Budget (what the user can afford) and Plan (a level per target)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import write_text_atomic
from .errors import PrunescopeError
from .jsonfile import parse_json, read_text, strict_json
from .levels import Level, level_key, parse_level, removed_share
from .schema import plan_arguments
from .target import prunable_modules

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
        if not isinstance(self.levels, Mapping) or not isinstance(self.params, Mapping):
            raise PrunescopeError("a plan takes levels and params as mappings from target name to level and to parameter count")
        self.levels, self.params = dict(self.levels), dict(self.params)
        for name, count in self.params.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise PrunescopeError(f"plan parameter count of {name!r} must be a whole number >= 0; got {count!r}")
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
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        """A plan from its dict, every field checked; a refusal names ``source`` and the field."""
        kwargs = plan_arguments(data, source, FORMAT_VERSION)
        budget = kwargs.pop("budget")
        try:
            budget = Budget(**budget) if budget else None
        except PrunescopeError as error:
            raise PrunescopeError(f"{source}: budget: {error}") from None
        return cls(**kwargs, budget=budget)

    def to_json(self) -> str:
        """Strict JSON: a NaN is written as null (see :func:`prunescope.jsonfile.strict_json`)."""
        return strict_json(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        return cls.from_dict(parse_json(text, source), source)

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file, refusing a damaged or hand-broken one with one line."""
        return cls.from_json(read_text(path, "plan file"), f"plan file {path}")

    # ---- the model or profile a plan is used with ---------------------------------------------
    @staticmethod
    def check_for(plan: Any, model: Any) -> Plan:
        """``plan`` checked to be a Plan made for ``model`` (a torch.nn.Module): see :meth:`check_model`."""
        if not isinstance(plan, Plan):
            raise PrunescopeError(f"plan must be a prunescope.Plan (see allocate, Plan.load); got {type(plan).__name__}")
        if not isinstance(model, nn.Module):
            raise PrunescopeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        plan.check_model(model)
        return plan

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose layers or sizes are not those this plan was made for.

        A weight plan's names must be prunable layers with as many weights as ``params`` says; a
        structured plan's unit groups must fit the model's tensors (each slice within its axis).
        """
        if self.granularity == "weight":
            modules = dict(prunable_modules(model))
            missing = [name for name in self.levels if name not in modules]
            if missing:
                sample = ", ".join(list(modules)[:6]) + (" ..." if len(modules) > 6 else "")
                raise PrunescopeError(f"plan names layers this model does not have: {', '.join(missing[:5])}"
                                      f"{' ...' if len(missing) > 5 else ''}; the model's layers: {sample or 'none'}")
            for name in self.levels:
                count = modules[name].weight.numel()
                if count != self.params[name]:
                    raise PrunescopeError(f"plan gives layer {name} {self.params[name]:,} weights; this model's has {count:,}: "
                                          "the plan was made for another model")
            return
        groups = self.details.get("groups") or {}
        parameters = dict(model.named_parameters(remove_duplicate=False))
        tensors = {**dict(model.named_buffers(remove_duplicate=False)), **parameters}
        for name in self.levels:
            group = groups.get(name)
            if group is None:
                continue  # apply() refuses a structured plan without its groups
            per_unit = 0
            for piece in group["slices"]:
                tensor = tensors.get(piece["tensor"])
                end = piece.get("offset", 0) + group["units"] * piece.get("width", 1)
                if tensor is None or piece["dim"] >= tensor.dim() or tensor.shape[piece["dim"]] < end:
                    found = "no such tensor" if tensor is None else f"shape {tuple(tensor.shape)}"
                    raise PrunescopeError(f"plan group {name} ({group['units']} units) needs {piece['tensor']} to reach "
                                          f"{end} along axis {piece['dim']}; this model has {found}: the plan was made for another model")
                if piece["tensor"] in parameters:
                    per_unit += piece.get("width", 1) * tensor.numel() // tensor.shape[piece["dim"]]
            if self.granularity != "block" and per_unit != group["params_per_unit"]:
                raise PrunescopeError(f"plan group {name} removes {group['params_per_unit']:,} parameters per unit; in this model "
                                      f"its tensors hold {per_unit:,} per unit: the plan was made for another model")

    def check_profile(self, profile: Any) -> None:
        """Refuse a plan whose targets are not the ``profile``'s (names, granularity, parameter counts)."""
        targets = {t.name: t for t in profile.targets}
        missing = [name for name in self.levels if name not in targets]
        if missing:
            raise PrunescopeError(f"the plan names {len(missing)} layer(s) not in the profile: {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''}; give the plan made from this profile")
        if self.granularity != profile.granularity:
            raise PrunescopeError(f"the plan is for {self.granularity} targets, the profile for {profile.granularity} targets")
        wrong = [name for name in self.levels if self.params[name] != targets[name].params]
        if wrong:
            name = wrong[0]
            raise PrunescopeError(f"the plan gives {name} {self.params[name]:,} parameters, the profile {targets[name].params:,}: "
                                  "the plan was made from another profile")

    def level_key(self, name: str) -> str:
        return level_key(self.levels[name])

    def uniform(self) -> Plan:
        """The plan removing this plan's sparsity from every one of its targets, with the same
        criterion and removal settings (the baseline a non-uniform plan is compared with)."""
        return replace(self, levels={n: self.sparsity for n in self.levels}, params=dict(self.params), method="uniform",
                       predicted_drop=None, details=dict(self.details))
