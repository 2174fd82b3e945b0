"""What a valid profile, cell, target and plan holds: each read from decoded JSON with a check per field.

Every function takes the decoded object and ``source`` (e.g. "profile file p.json"), and returns
clean constructor arguments or raises one PrunescopeError naming the source and the field.
"""

from __future__ import annotations

from typing import Any

from .errors import PrunescopeError
from .jsonfile import Fields
from .levels import level_key, parse_level
from .target import GRANULARITIES

PROFILE_KINDS = ("measured", "estimated")
BLOCK_KEY = "1"


def check_format(fields: Fields, name: str, version: int) -> None:
    """The ``format`` marker and a ``version`` this prunescope reads."""
    if fields.data.get("format") != name:
        raise PrunescopeError(f"{fields.source} is not a {name.replace('.', ' ')} (missing format: {name})")
    found = fields.integer("version", 1)
    if found > version:
        fields.fail("version", f"is {found}, written by a newer prunescope (this one reads version {version}); upgrade prunescope")


def level_of(fields: Fields, key: str | int, value: Any, granularity: str) -> str:
    """The canonical key of one level (``"0.5"``, ``"2:4"``; a block's ``"1"``)."""
    if granularity == "block":
        if str(value) not in (BLOCK_KEY, "1.0"):
            fields.fail(key, f"is {value!r}; a block profile has the one level '1' (the block removed)")
        return BLOCK_KEY
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        fields.fail(key, f"must be a level string such as '0.5' or '2:4'; got {value!r}")
    try:
        return level_key(parse_level(value))
    except PrunescopeError as error:
        fields.fail(key, f"{value!r} is not a level: {error}")


def cell_arguments(data: Any, source: str, where: str = "cell") -> dict:
    """Constructor arguments of a :class:`~prunescope.Cell`; ``value``/``change`` may be null (NaN) or infinite."""
    f = Fields(data, source, where)
    return {
        "target": f.string("target"),
        "level": f.string("level"),
        "sparsity": f.number("sparsity", 0.0, 1.0),
        "value": f.number("value", finite=False),
        "change": f.number("change", finite=False),
        "ci_low": f.number("ci_low", nullable=True, finite=False),
        "ci_high": f.number("ci_high", nullable=True, finite=False),
        "samples": f.integer("samples", 0),
        "seconds": f.number("seconds", 0.0),
    }


def group_arguments(f: Fields) -> dict:
    """The fields of a :class:`~prunescope.structure.UnitGroup` dict, checked."""
    slices = []
    for index, item in enumerate(f.array("slices")):
        s = Fields(item, f.source, f"{f.path('slices')}[{index}]")
        slices.append({"tensor": s.string("tensor"), "dim": s.integer("dim", 0), "offset": s.integer("offset", 0, default=0),
                       "width": s.integer("width", 1, default=1), "role": s.string("role", default="out")})
    return {
        "name": f.string("name"),
        "granularity": f.string("granularity", GRANULARITIES[1:]),
        "units": f.integer("units", 1),
        "params_per_unit": f.integer("params_per_unit", 0),
        "slices": slices,
        "flops_per_unit": f.number("flops_per_unit", 0.0, nullable=True, default=None),
        "min_units": f.integer("min_units", 0, default=1),
    }


def target_arguments(data: Any, source: str, where: str, granularity: str) -> dict:
    """A checked dict for :meth:`Target.from_dict`; the target's granularity must be the profile's."""
    f = Fields(data, source, where)
    shape = f.array("shape")
    for index, size in enumerate(shape):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            f.fail("shape", f"must hold whole numbers >= 0; item {index} is {size!r}")
    checked = {
        "name": f.string("name"),
        "kind": f.string("kind"),
        "shape": shape,
        "params": f.integer("params", 0),
        "flops": f.number("flops", 0.0, nullable=True, default=None),
        "input_dim": f.integer("input_dim", 0, default=1),
        "granularity": f.string("granularity", GRANULARITIES, default="weight"),
        "parameter": f.string("parameter", default="weight"),
    }
    if checked["granularity"] != granularity:
        f.fail("granularity", f"is {checked['granularity']!r}, but the profile's granularity is {granularity!r}")
    group = f.mapping("group", nullable=True, default=None)
    if group is None and granularity != "weight":
        f.fail("group", f"is missing: a {granularity} target needs its unit group")
    checked["group"] = None if group is None else group_arguments(f.child("group"))
    return checked


def costs_of(f: Fields) -> dict | None:
    """The profile's ``costs`` (``CostModel.to_dict()``): parameter shapes and FLOPs per tensor, or null."""
    costs = f.mapping("costs", nullable=True, default=None)
    if costs is None:
        return None
    c = f.child("costs")
    for name, shape in c.mapping("shapes").items():
        if not isinstance(shape, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
            c.fail("shapes", f"entry {name!r} must be an array of whole numbers >= 0; got {shape!r}")
    flops = c.child("flops", c.mapping("flops"))
    for name in flops.data:
        flops.number(name, 0.0)
    return costs


def profile_arguments(data: Any, source: str, version: int) -> dict:
    """Constructor arguments of a :class:`~prunescope.Profile` (targets and cells as checked dicts)."""
    f = Fields(data, source)
    check_format(f, "prunescope.profile", version)
    granularity = f.string("granularity", GRANULARITIES)
    keys = [level_of(f, f"levels[{i}]", v, granularity) for i, v in enumerate(f.array("levels"))]
    if len(set(keys)) != len(keys):
        f.fail("levels", f"repeat a level: {keys}")
    targets = [target_arguments(t, source, f"targets[{i}]", granularity) for i, t in enumerate(f.array("targets"))]
    names = [t["name"] for t in targets]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        f.fail("targets", f"repeat a name: {', '.join(repeated[:5])}")
    cells, seen = [], set()
    known_names, known_keys = set(names), set(keys)
    for index, item in enumerate(f.array("cells")):
        cell = cell_arguments(item, source, f"cells[{index}]")
        cell_fields = Fields(item, source, f"cells[{index}]")
        cell["level"] = level_of(cell_fields, "level", cell["level"], granularity)
        if cell["target"] not in known_names:
            cell_fields.fail("target", f"{cell['target']!r} is not one of the profile's targets")
        if cell["level"] not in known_keys:
            cell_fields.fail("level", f"{cell['level']!r} is not one of the profile's levels ({', '.join(keys)})")
        if (cell["target"], cell["level"]) in seen:
            cell_fields.fail("level", f"repeats the cell of {cell['target']!r} at level {cell['level']}")
        seen.add((cell["target"], cell["level"]))
        cells.append(cell)
    return {
        "metric": f.string("metric"),
        "higher_is_better": f.boolean("higher_is_better"),
        "dense_value": f.number("dense_value"),
        "criterion": f.string("criterion"),
        "granularity": granularity,
        "levels": keys,
        "targets": targets,
        "cells": cells,
        "kind": f.string("kind", PROFILE_KINDS, default="measured"),
        "confidence": f.number("confidence", 0.0, 1.0, default=0.95, open_low=True, open_high=True),
        "provenance": f.mapping("provenance", default={}),
        "costs": costs_of(f),
    }


def plan_arguments(data: Any, source: str, version: int) -> dict:
    """Constructor arguments of a :class:`~prunescope.Plan` (budget as a dict or None)."""
    f = Fields(data, source)
    check_format(f, "prunescope.plan", version)
    granularity = f.string("granularity", GRANULARITIES, default="weight")
    params = f.child("params", f.mapping("params"))
    counts = {name: params.integer(name, 0) for name in params.data}
    levels = f.child("levels", f.mapping("levels"))
    checked_levels = {}
    for name, value in levels.data.items():
        if name not in counts:
            levels.fail(name, "has no parameter count in params")
        if granularity == "block" or value == 0:
            if isinstance(value, bool) or value not in ((0, 1) if granularity == "block" else (0,)):
                levels.fail(name, f"is {value!r}; a block is kept (0) or removed (1)")
            checked_levels[name] = float(value)
            continue
        key = level_of(levels, name, value, granularity)
        checked_levels[name] = key if ":" in key else float(key)
    budget = f.mapping("budget", nullable=True, default=None)
    if budget is not None:
        b = f.child("budget")
        unknown = sorted(set(budget) - {"sparsity", "params", "flops"})
        if unknown:
            b.fail(unknown[0], "is not a budget kind; accepted: sparsity, params, flops")
        budget = {k: b.number(k, 0.0, 1.0, open_low=True, open_high=True) for k in budget if budget[k] is not None}
    details = f.mapping("details", default={})
    if details.get("groups") is not None:
        d = f.child("details")
        groups = d.child("groups", d.mapping("groups"))
        for name in groups.data:
            group_arguments(groups.child(name))
    return {
        "levels": checked_levels,
        "params": counts,
        "criterion": f.string("criterion", default="magnitude"),
        "granularity": granularity,
        "method": f.string("method", default="manual"),
        "budget": budget,
        "predicted_drop": f.number("predicted_drop", nullable=True, finite=False, default=None),
        "metric": f.string("metric", nullable=True, default=None),
        "details": details,
        **removal_arguments(f, details),
    }


def removal_arguments(f: Fields, details: dict) -> dict:
    """A plan's removal settings (seed, round_to, head_mode, options); plans written before these
    were fields kept the structured ones in ``details``."""
    old = Fields(details, f.source, f.path("details"))
    pick = (lambda key: f if key in f.data else old)  # noqa: E731
    return {
        "seed": pick("seed").integer("seed", default=0),
        "round_to": pick("round_to").integer("round_to", 1, nullable=True, default=None),
        "head_mode": pick("head_mode").string("head_mode", ("kv_group", "query"), nullable=True, default=None),
        "options": options_arguments(f),
    }


def options_arguments(f: Fields) -> dict:
    """A calibrated criterion's own settings: SparseGPT's ``block_size`` (columns) and ``damp``."""
    options = f.mapping("options", default={})
    o = f.child("options", options)
    unknown = sorted(set(options) - {"block_size", "damp"})
    if unknown:
        o.fail(unknown[0], "is not a criterion option; accepted: block_size, damp")
    return {**({"block_size": o.integer("block_size", 1)} if "block_size" in options else {}),
            **({"damp": o.number("damp", 0.0, open_low=True)} if "damp" in options else {})}
