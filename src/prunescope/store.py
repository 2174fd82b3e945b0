"""A JSONL store of finished cells: appended as each cell finishes, read back to resume a scan."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import write_text_atomic
from .errors import PrunescopeError
from .profile import Cell

HEADER_KEY = "prunescope_store"


class CellStore:
    """Append-only JSONL file whose first line records what the scan was run on.

    Opening a store written for a different model, data, metric, criterion, seed, levels or confidence is refused.
    A torn last line (a run killed mid-write) is dropped on open.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.cells: dict[tuple[str, str], Cell] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._read()
        else:
            write_text_atomic(self.path, json.dumps({HEADER_KEY: 1, "fingerprint": fingerprint}) + "\n")

    def _read(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        try:
            header = json.loads(lines[0])
            stored = header["fingerprint"]
            assert HEADER_KEY in header
        except (ValueError, KeyError, AssertionError):
            raise PrunescopeError(f"{self.path} is not a prunescope store; pass another store path") from None
        different = [k for k in sorted(set(stored) | set(self.fingerprint)) if stored.get(k) != self.fingerprint.get(k)]
        if different:
            raise PrunescopeError(
                f"store {self.path} was written for a different {', '.join(different)}; refusing to mix results. "
                "Delete the file or pass another store path to start fresh"
            )
        good = [lines[0]]
        for line in lines[1:]:
            if not line.strip():
                continue
            try:
                cell = Cell.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from a killed run
            self.cells[(cell.target, cell.level)] = cell
            good.append(line)
        if len(good) != len([ln for ln in lines if ln.strip()]) or not text.endswith("\n"):
            write_text_atomic(self.path, "\n".join(good) + "\n")

    def get(self, target: str, level: str) -> Cell | None:
        return self.cells.get((target, level))

    def append(self, cell: Cell) -> None:
        """Append one finished cell and flush it to disk before returning."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(cell.to_dict()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.cells[(cell.target, cell.level)] = cell
