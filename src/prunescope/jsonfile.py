"""Strict JSON out, checked JSON in: every file prunescope writes parses anywhere, every file it reads
is refused with one line naming the file and the field when it is not what it should be."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, NoReturn

from .errors import PrunescopeError

POSITIVE_INFINITY = "1e999"
"""How +inf is written: a number too large for a double, which JSON parsers (Python, JavaScript) read as infinity."""


def strict_json(value: Any, indent: int | None = None) -> str:
    """``json.dumps`` without the non-standard ``NaN`` / ``Infinity`` tokens: NaN is written as null and
    +-inf as +-1e999, so the text is valid JSON (RFC 8259) and Python's json reads the infinities back."""
    marker = uuid.uuid4().hex

    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None if math.isnan(item) else f"{marker}{'+' if item > 0 else '-'}"
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    text = json.dumps(clean(value), indent=indent, allow_nan=False)
    return text.replace(f'"{marker}+"', POSITIVE_INFINITY).replace(f'"{marker}-"', "-" + POSITIVE_INFINITY)


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of the file ``what`` (e.g. "profile file") at ``path``, or a one-line refusal."""
    path = Path(path)
    if not path.exists():
        raise PrunescopeError(f"{what} {path} does not exist")
    if path.is_dir():
        raise PrunescopeError(f"{what} {path} is a folder, not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PrunescopeError(f"cannot read {what} {path}: {error.strerror or error}") from None
    return decode_utf8(data, f"{what} {path}")


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` decoded as UTF-8, or a refusal naming ``source`` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PrunescopeError(
            f"{source} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); is it the right file?"
        ) from None


def parse_json(text: str, source: str) -> Any:
    """The JSON value in ``text``, or a refusal naming ``source``, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        cut = error.pos >= len(text.rstrip()) or (error.msg.startswith("Unterminated") and "\n" not in text[error.pos:])
        raise PrunescopeError(
            f"{source} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
            + ("; it looks truncated" if cut and text.strip() else "")
        ) from None
    except RecursionError:
        raise PrunescopeError(f"{source} is not valid JSON: nested too deeply") from None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = object()


class Fields:
    """The fields of one JSON object, each read with a check; a refusal names the source and the field path."""

    def __init__(self, data: Any, source: str, where: str = "") -> None:
        self.data, self.source, self.where = data, source, where
        if not isinstance(data, dict):
            raise PrunescopeError(f"{source}: {where or 'the content'} must be a JSON object; got {_kind(data)}")

    def path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.where}[{key}]"
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str | int, problem: str) -> NoReturn:
        raise PrunescopeError(f"{self.source}: {self.path(key)} {problem}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            self.fail(key, "is missing")
        return default

    def string(self, key: str, choices: tuple[str, ...] | None = None, *, default: Any = _MISSING,
               nullable: bool = False) -> str | None:
        value = self.get(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string; got {_shown(value)}")
        if choices is not None and value not in choices:
            self.fail(key, f"is {value!r}; accepted: {', '.join(choices)}")
        return value

    def boolean(self, key: str, *, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false; got {_shown(value)}")
        return value

    def number(self, key: str, low: float | None = None, high: float | None = None, *, default: Any = _MISSING,
               nullable: bool = False, finite: bool = True, open_low: bool = False, open_high: bool = False) -> float | None:
        """A number in [low, high] (open ends as asked); null is None when ``nullable``, NaN when not ``finite``."""
        value = self.get(key, default)
        if value is None and (nullable or not finite):
            return None if nullable else math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number; got {_shown(value)}")
        value = float(value)
        if not math.isfinite(value):
            if finite:
                self.fail(key, f"is {value}; must be a finite number")
            return value
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above:
            interval = f"{'(' if open_low else '['}{_end(low, '-inf')}, {_end(high, 'inf')}{')' if open_high else ']'}"
            self.fail(key, f"is {_shown(value)}; must be a number in {interval}")
        return value

    def integer(self, key: str, low: int | None = None, *, default: Any = _MISSING, nullable: bool = False) -> int | None:
        value = self.get(key, default)
        if value is None and nullable:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be a whole number; got {_shown(value)}")
        if low is not None and value < low:
            self.fail(key, f"is {value}; must be a whole number >= {low}")
        return value

    def mapping(self, key: str, *, default: Any = _MISSING, nullable: bool = False) -> dict | None:
        value = self.get(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, dict):
            self.fail(key, f"must be an object; got {_kind(value)}")
        return value

    def array(self, key: str, *, default: Any = _MISSING) -> list:
        """A JSON array (a list or tuple when the dict was built in Python), as a list."""
        value = self.get(key, default)
        if not isinstance(value, (list, tuple)):
            self.fail(key, f"must be an array; got {_kind(value)}")
        return list(value)

    def child(self, key: str | int, value: Any = _MISSING) -> Fields:
        """The object at ``key`` (or ``value``, an item of an array at index ``key``) as Fields."""
        return Fields(self.data[key] if value is _MISSING else value, self.source, self.path(key))


def _end(value: float | None, infinite: str) -> str:
    return infinite if value is None else f"{value:g}"
