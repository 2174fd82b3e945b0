"""A profile as a CSV table that plain ``pandas.read_csv`` reads: one header row, one row per cell.

Each row holds the cell, its ``drop`` (positive = worse), its target's fields and the profile's
scalar fields, so rows can be filtered or concatenated across profiles. What a flat table cannot
hold (provenance, costs, level and target order, unmeasured targets, unit groups) is one JSON
object in the ``profile`` column of the first row; that column is empty on every other row.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from .errors import PrunescopeError

CELL = ("target", "level", "sparsity", "value", "change", "drop", "ci_low", "ci_high", "samples", "seconds")
TARGET = ("params", "flops", "target_kind", "target_shape", "target_input_dim", "target_granularity", "target_parameter")
PROFILE = ("metric", "higher_is_better", "dense_value", "criterion", "kind", "confidence")
COLUMNS = (*CELL, *TARGET, *PROFILE, "profile")
_TARGET_FIELDS = {"params": "params", "flops": "flops", "target_kind": "kind", "target_shape": "shape",
                  "target_input_dim": "input_dim", "target_granularity": "granularity", "target_parameter": "parameter"}
_FLOATS = ("sparsity", "value", "change", "ci_low", "ci_high", "seconds", "flops", "dense_value", "confidence")
_INTS = ("samples", "params", "target_input_dim")
_META = ("version", "granularity", "levels", "target_names", "unmeasured_targets", "groups", "provenance", "costs")


def _text(value: Any) -> str:
    """A CSV field: floats in their shortest exact form (inf, nan included), None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def to_csv(data: dict) -> str:
    """CSV text of ``Profile.to_dict()`` output ``data``."""
    if not data["cells"]:
        raise PrunescopeError("a profile without cells has no CSV rows; save it as .json")
    targets = {t["name"]: t for t in data["targets"]}
    measured = {c["target"] for c in data["cells"]}
    meta = {
        "format": data["format"], "version": data["version"], "granularity": data["granularity"],
        "levels": data["levels"], "target_names": list(targets),
        "unmeasured_targets": [t for name, t in targets.items() if name not in measured],
        "groups": {name: t["group"] for name, t in targets.items() if name in measured and t["group"] is not None},
        "provenance": data["provenance"], "costs": data["costs"],
    }
    sign = -1.0 if data["higher_is_better"] else 1.0
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for i, cell in enumerate(data["cells"]):
        target = targets[cell["target"]]
        row = {**cell, "drop": sign * cell["change"] + 0.0, **{col: target[key] for col, key in _TARGET_FIELDS.items()},
               **{key: data[key] for key in PROFILE}, "profile": json.dumps(meta, ensure_ascii=False) if i == 0 else None}
        writer.writerow([_text(row[col]) for col in COLUMNS])
    return out.getvalue()


def _parse(row: dict[str, str], line: int) -> dict[str, Any]:
    """Typed fields of one CSV row; a bad field is a PrunescopeError naming the line and column."""
    parsed: dict[str, Any] = {}
    for column in COLUMNS:
        text = row.get(column)
        if text is None:
            raise PrunescopeError(f"profile CSV line {line} has no {column!r} field")
        try:
            if column in _FLOATS:
                parsed[column] = float(text) if text else None
            elif column in _INTS:
                parsed[column] = int(text)
            elif column == "higher_is_better":
                parsed[column] = {"True": True, "False": False}[text]
            elif column == "target_shape":
                parsed[column] = tuple(int(n) for n in text.split("x")) if text else ()
            else:
                parsed[column] = text
        except (ValueError, KeyError):
            raise PrunescopeError(f"profile CSV line {line}, column {column!r}: {text!r} is not a valid value") from None
    return parsed


def from_csv(text: str) -> dict:
    """``Profile.from_dict`` input from CSV text written by :func:`to_csv`."""
    if text.startswith("# prunescope-profile "):
        raise PrunescopeError("this profile CSV is in the old format (a '# prunescope-profile' first line): load its .json twin")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise PrunescopeError(f"not a prunescope profile CSV: the header lacks {', '.join(missing)}")
    rows = [_parse(row, line) for line, row in enumerate(reader, start=2)]
    if not rows:
        raise PrunescopeError("profile CSV has a header but no cell rows")
    try:
        meta = json.loads(rows[0]["profile"])
    except json.JSONDecodeError:
        raise PrunescopeError("profile CSV: the first row's 'profile' field is not the JSON this library writes") from None
    if not isinstance(meta, dict) or meta.get("format") != "prunescope.profile":
        raise PrunescopeError("not a prunescope profile CSV (its first row's 'profile' field lacks format: prunescope.profile)")
    absent = [key for key in _META if key not in meta]
    if absent:
        raise PrunescopeError(f"profile CSV: the first row's 'profile' record lacks {', '.join(absent)}")
    targets: dict[str, dict] = {}
    cells = []
    for row in rows:
        cells.append({k: row[k] for k in CELL if k != "drop"})
        fields = {key: row[col] for col, key in _TARGET_FIELDS.items()}
        targets.setdefault(row["target"], {"name": row["target"], **fields, "group": meta["groups"].get(row["target"])})
    for target in meta["unmeasured_targets"]:
        targets[target["name"]] = target
    unknown = [name for name in meta["target_names"] if name not in targets]
    if unknown:
        raise PrunescopeError(f"profile CSV lists targets without rows or records: {', '.join(unknown[:5])}")
    first = rows[0]
    return {
        "format": meta["format"], "version": meta["version"], **{key: first[key] for key in PROFILE},
        "granularity": meta["granularity"], "levels": meta["levels"], "provenance": meta["provenance"],
        "costs": meta["costs"], "targets": [targets[name] for name in meta["target_names"]], "cells": cells,
    }
