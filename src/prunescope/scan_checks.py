"""Checks a scan (or estimate) makes before any work: the criterion for a granularity, and the levels
that every unit group can take, with the levels to use when none are given."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .checks import whole_number, whole_numbers
from .criteria import check_criterion
from .errors import PrunescopeError
from .levels import DEFAULT_LEVELS, NMPattern, level_key
from .structure.unit_criteria import units_to_remove
from .target import GRANULARITIES, Target

UNIT_GRANULARITIES = ("channel", "head", "neuron")
"""Granularities whose levels are fractions of a group's units (a block is removed whole)."""


def check_scan_criterion(criterion: str, granularity: str) -> str:
    """Refuse a criterion the granularity cannot take (needs no model, so it runs before one is loaded)."""
    if granularity not in GRANULARITIES:
        raise PrunescopeError(f"granularity {granularity!r} is not supported; accepted: {', '.join(GRANULARITIES)}")
    check_criterion(criterion, granularity)
    return criterion


def _real(value: Any, name: str, optional: bool = True) -> None:
    if (value is None and optional) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    raise PrunescopeError(f"{name} must be a number{' or None' if optional else ''}; got {value!r}")


def check_scan_arguments(*, targets: Any, seed: Any, cache_bytes: Any, confidence: Any, max_drop: Any, tolerance: Any,
                         round_to: Any) -> None:
    """The types of scan's arguments (their ranges are checked by scan): targets None or a list of Targets,
    ``seed`` and ``cache_bytes`` whole numbers >= 0, ``round_to`` None or >= 1, the rest numbers."""
    if targets is not None and (isinstance(targets, (str, Target)) or not isinstance(targets, Sequence)
                                or not all(isinstance(t, Target) for t in targets)):
        raise PrunescopeError("targets must be a list of Target (from find_targets) or None for the default")
    whole_numbers(seed=seed, cache_bytes=cache_bytes)
    whole_number(round_to, "round_to", optional=True)
    _real(confidence, "confidence", optional=False)
    _real(max_drop, "max_drop")
    _real(tolerance, "tolerance")


def units_kept(target: Target, level: float, round_to: int | None = None) -> int:
    """How many of ``target``'s units a level keeps (the scan's own count; refuses one that keeps too few)."""
    group = target.group
    return group.units - len(units_to_remove([0.0] * group.units, level, group.units, round_to, group.min_units))


def _problem(target: Target, level: float, round_to: int | None) -> str | None:
    """Why ``level`` cannot apply to ``target``'s group, or None when it removes some units and keeps enough."""
    group = target.group
    try:
        kept = units_kept(target, level, round_to)
    except PrunescopeError:
        kept = None
    rounding = f" with round_to={round_to}" if round_to else ""
    if kept is None or kept < group.min_units:
        return f"would keep too few of its {group.units} units{rounding} (at least {group.min_units} must remain)"
    if kept == group.units:
        return f"removes none of its {group.units} units{rounding}"
    return None


def unit_levels(targets: Sequence[Target], round_to: int | None = None) -> list[float]:
    """Levels every unit group of ``targets`` can take: the default levels when each removes a distinct,
    non-zero count from every group, else the fractions k/units of the smallest group that do."""
    whole_number(round_to, "round_to", optional=True)
    groups = [t for t in targets if t.granularity in UNIT_GRANULARITIES and t.group is not None]
    if not groups:
        return list(DEFAULT_LEVELS)
    smallest = min(t.group.units for t in groups)
    candidates = list(DEFAULT_LEVELS) if smallest > len(DEFAULT_LEVELS) else [round(k / smallest, 4) for k in range(1, smallest)]
    chosen, counts = [], set()
    for level in candidates:
        if all(_problem(t, level, round_to) is None for t in groups):
            kept = tuple(units_kept(t, level, round_to) for t in groups)
            if kept not in counts:  # a level that removes what an earlier one removed everywhere adds nothing
                chosen.append(level)
                counts.add(kept)
    if not chosen:
        sizes = sorted({t.group.units for t in groups})
        raise PrunescopeError(f"no level removes some units of every {groups[0].granularity} group and keeps enough: the "
                              f"groups have {', '.join(map(str, sizes[:6]))} units{f' (round_to={round_to})' if round_to else ''}; "
                              "exclude the smallest groups")
    return chosen


def check_unit_levels(targets: Sequence[Target], levels: Sequence[float | NMPattern], round_to: int | None = None) -> None:
    """Refuse a level that some unit group cannot take (it would keep too few units, or remove none),
    naming the level, the group and its unit count, and the levels every group can take."""
    whole_number(round_to, "round_to", optional=True)
    for level in levels:
        if isinstance(level, NMPattern):
            continue
        for target in targets:
            if target.granularity not in UNIT_GRANULARITIES or target.group is None:
                continue
            problem = _problem(target, float(level), round_to)
            if problem is not None:
                try:
                    fitting = ", ".join(level_key(v) for v in unit_levels(targets, round_to))
                    hint = f"levels every group can take: {fitting}"
                except PrunescopeError as error:
                    hint = str(error)
                raise PrunescopeError(f"level {level_key(level)} cannot apply to {target.granularity} group {target.name}: "
                                      f"it {problem}; {hint}")
