"""The search's state after each finished generation, in one JSON file written atomically.

A re-run with the same file resumes from the last finished generation: the parent, its fitness,
the random generator's state, the evaluations spent and the history. The file also records the
search's identity (model, data, criterion, levels, budget, seed, settings); a file made by another
search is refused, naming the field that differs, so a resumed search gives the result an
uninterrupted one of the same seed would have.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import PrunescopeError
from ..jsonfile import parse_json, read_text, strict_json

FORMAT = "prunescope.search"
VERSION = 1


@dataclass
class SearchState:
    """Where a search stands.

    ``parent``: grid indices of the best plan so far; ``fitness``: its fitness on the full fitness
    data; ``evaluations``: candidate evaluations spent (each candidate at each selection stage counts
    once); ``seconds``: wall time spent in all runs; ``history``: one row per generation
    (``generation``, ``evaluations``, ``seconds``, ``fitness``).
    """

    identity: dict[str, Any]
    parent: list[int]
    fitness: float
    rng: list = field(default_factory=list)
    generation: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def random(self) -> random.Random:
        """The generator, at the state saved with this generation."""
        rng = random.Random()
        version, internal, gauss = self.rng
        rng.setstate((version, tuple(internal), gauss))
        return rng

    def keep_random(self, rng: random.Random) -> None:
        version, internal, gauss = rng.getstate()
        self.rng = [version, list(internal), gauss]

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, strict_json({"format": FORMAT, "version": VERSION, **asdict(self)}))

    @classmethod
    def load(cls, path: str | Path, identity: dict[str, Any]) -> SearchState:
        """The state in ``path``, refused unless it is a search state of ``identity``."""
        data = parse_json(read_text(path, "search state"), f"search state {path}")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PrunescopeError(f"{path} is not a prunescope search state (no 'format': {FORMAT!r}); give another --state file")
        if data.get("version") != VERSION:
            raise PrunescopeError(f"{path}: search state version {data.get('version')!r}; this prunescope reads version {VERSION}")
        saved = data.get("identity")
        if not isinstance(saved, dict):
            raise PrunescopeError(f"{path}: the search state has no identity")
        for key in sorted(set(saved) | set(identity)):
            if saved.get(key) != identity.get(key):
                raise PrunescopeError(f"{path} holds another search: its {key} is {_short(saved.get(key))}, this search's is "
                                      f"{_short(identity.get(key))}; give a new state file or the same settings")
        try:
            state = cls(identity=saved, parent=[int(k) for k in data["parent"]], fitness=float(data["fitness"]),
                        rng=list(data["rng"]), generation=int(data["generation"]), evaluations=int(data["evaluations"]),
                        seconds=float(data["seconds"]), history=list(data["history"]))
            state.random()
        except (KeyError, TypeError, ValueError) as error:
            raise PrunescopeError(f"{path}: the search state is damaged ({error}); delete it to start again") from None
        return state


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
