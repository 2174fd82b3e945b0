"""How far to trust an estimate: rank agreement of its predicted drops with a measured scan's."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import PrunescopeError
from ..profile import Profile


@dataclass(frozen=True)
class Agreement:
    """Spearman rank correlation of estimated vs measured drop over the cells both profiles hold.

    ``spearman`` ranks every common (target, level) cell together, so it also credits the obvious
    "higher levels hurt more"; ``per_level`` ranks the targets within each level (what an
    allocation needs: which layers to prune harder), and ``mean_per_level`` averages those.
    NaN where a ranking is undefined (fewer than 3 targets, or all drops equal).
    """

    score: str
    spearman: float
    mean_per_level: float
    per_level: dict[str, float]
    cells: int
    measured_metric: str
    measured_criterion: str

    def to_dict(self) -> dict:
        return asdict(self)


def _spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return math.nan
    from scipy import stats as scipy_stats  # imported here: worker processes never need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: the correlation is undefined (NaN)
        value = scipy_stats.spearmanr(x, y).statistic
    return float(value)


def agreement(estimated: Profile, measured: Profile) -> Agreement:
    """Rank agreement of ``estimated`` (an ``estimate`` profile) with ``measured`` (a ``scan``
    profile of the same targets), on the cells both hold with finite drops (positive = worse)."""
    if measured.kind != "measured":
        raise PrunescopeError(f"the reference profile must be a measured scan; it is {measured.kind!r}")
    if estimated.granularity != measured.granularity:
        raise PrunescopeError(f"granularities differ: estimated {estimated.granularity}, measured {measured.granularity}")
    pairs: dict[str, list[tuple[float, float]]] = {}
    for cell in estimated.cells:
        reference = measured.cell(cell.target, cell.level)
        if reference is None:
            continue
        predicted, observed = estimated.drop(cell), measured.drop(reference)
        if math.isfinite(predicted) and math.isfinite(observed):
            pairs.setdefault(cell.level, []).append((predicted, observed))
    everything = [pair for level_pairs in pairs.values() for pair in level_pairs]
    if len(everything) < 3:
        raise PrunescopeError(
            f"the profiles share {len(everything)} cells with finite drops; a rank correlation needs at least 3 "
            "(estimate the same targets and levels as the scan)"
        )
    per_level = {level: _spearman(*map(list, zip(*p, strict=True))) for level, p in pairs.items()}
    defined = [v for v in per_level.values() if not math.isnan(v)]
    return Agreement(
        score=str(estimated.provenance.get("score", estimated.kind)),
        spearman=_spearman(*map(list, zip(*everything, strict=True))),
        mean_per_level=float(np.mean(defined)) if defined else math.nan,
        per_level=per_level,
        cells=len(everything),
        measured_metric=measured.metric,
        measured_criterion=measured.criterion,
    )
