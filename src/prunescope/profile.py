"""Profile: the metric change per (target, level), with uncertainty and provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import PrunescopeError
from .jsonfile import parse_json, read_text, strict_json
from .levels import is_nm_key
from .profile_csv import from_csv, to_csv
from .schema import cell_arguments, profile_arguments
from .target import Target

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Cell:
    """One measured (or estimated) cell: ``target`` pruned at ``level``, everything else dense.

    ``value`` is the metric with the cell pruned; ``change`` is value minus dense, on the metric's
    own scale; ``ci_low``/``ci_high`` bound ``change`` (None with a single sample).
    """

    target: str
    level: str
    sparsity: float
    value: float
    change: float
    ci_low: float | None
    ci_high: float | None
    samples: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "cell") -> Cell:
        """A cell from its dict, checked: null ``value``/``change`` read as NaN (strict JSON has no NaN)."""
        return cls(**cell_arguments(data, source, "cell"))


@dataclass
class Profile:
    """Sensitivity of each target to removal by ``criterion``, measured at each level."""

    metric: str
    higher_is_better: bool
    dense_value: float
    criterion: str
    granularity: str
    levels: list[str]
    targets: list[Target]
    cells: list[Cell]
    kind: str = "measured"
    confidence: float = 0.95
    provenance: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] | None = None
    """``CostModel.to_dict()`` of the scanned model: parameter shapes and Conv/Linear FLOPs."""

    # ---- queries -------------------------------------------------------------------------
    def drop(self, cell: Cell) -> float:
        """How much worse the metric got (positive = worse), whatever its direction."""
        return -cell.change if self.higher_is_better else cell.change

    def cell(self, target: str, level: str) -> Cell | None:
        for cell in self.cells:
            if cell.target == target and cell.level == level:
                return cell
        return None

    def target(self, name: str) -> Target:
        for target in self.targets:
            if target.name == name:
                return target
        raise PrunescopeError(f"target {name!r} is not in this profile")

    def curve(self, target: str) -> list[tuple[float, float]]:
        """(fraction removed, drop) for the fractional levels measured on ``target``, ascending."""
        points = [
            (cell.sparsity, self.drop(cell))
            for cell in self.cells
            if cell.target == target and not is_nm_key(cell.level)
        ]
        return sorted(points)

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["targets"] = [t.to_dict() for t in self.targets]
        data["cells"] = [c.to_dict() for c in self.cells]
        return {"format": "prunescope.profile", "version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> Profile:
        """A profile from its dict, every field checked; a refusal names ``source`` and the field."""
        kwargs = profile_arguments(data, source, FORMAT_VERSION)
        kwargs["targets"] = [Target.from_dict(t) for t in kwargs["targets"]]
        kwargs["cells"] = [Cell(**c) for c in kwargs["cells"]]
        return cls(**kwargs)

    def to_json(self) -> str:
        """Strict JSON: a NaN is written as null, an infinity as 1e999 (see :func:`prunescope.jsonfile.strict_json`)."""
        return strict_json(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> Profile:
        return cls.from_dict(parse_json(text, source), source)

    def save(self, path: str | Path) -> Path:
        """Write JSON (or CSV when the path ends in .csv) atomically."""
        path = Path(path)
        return write_text_atomic(path, self.to_csv() if path.suffix == ".csv" else self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile file (.json, or .csv), refusing a damaged or hand-broken one with one line."""
        path = Path(path)
        source = f"profile file {path}"
        text = read_text(path, "profile file")
        return cls.from_csv(text, source) if path.suffix == ".csv" else cls.from_json(text, source)

    # ---- CSV: one row per cell that plain pandas.read_csv reads (see profile_csv) ------------
    def to_csv(self) -> str:
        return to_csv(self.to_dict())

    @classmethod
    def from_csv(cls, text: str, source: str = "profile CSV") -> Profile:
        try:
            data = from_csv(text)
        except PrunescopeError as error:
            raise PrunescopeError(f"{source}: {error}") from None
        return cls.from_dict(data, source)

    def to_dataframe(self):
        """The cells as a pandas DataFrame (needs pandas), with each target's params and FLOPs."""
        try:
            import pandas as pd
        except ImportError:
            raise PrunescopeError("to_dataframe needs pandas: pip install pandas") from None
        by_name = {t.name: t for t in self.targets}
        rows = [{**c.to_dict(), "drop": self.drop(c), "params": by_name[c.target].params, "flops": by_name[c.target].flops} for c in self.cells]
        return pd.DataFrame(rows)
