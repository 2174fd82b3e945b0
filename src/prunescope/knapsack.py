"""Multiple-choice knapsack: one column per row, the least summed drop whose summed amount reaches
a need, by dynamic programming over a discretised amount, with a lower bound on the optimum.

Rows are targets and columns their candidate levels: ``drops[i, j]`` is what choosing column ``j``
of row ``i`` costs (a predicted metric drop; ``inf`` marks a column that may not be chosen) and
``amounts[i, j] >= 0`` what it removes, in any additive quantity (a fraction of parameters, of
FLOPs, of latency ...). The amounts are counted in whole ``unit = most / bins``:

* rounded DOWN, a choice whose rounded amounts reach ``ceil(need / unit)`` units truly reaches
  ``need``: the dynamic programme's choice there is feasible (an upper bound on the optimum);
* rounded UP, every choice that truly reaches ``need`` still does, so the optimum of that
  relaxation is at most the true optimum (a lower bound).

Each row rounds down by less than one unit, so the feasible choice is at worst the optimum of a
need up to ``rows x unit`` larger. Two more candidates narrow that: the programme's choices at up
to ``rows`` fewer rounded units, checked against the true amounts, and the Lagrangian choice
(every row minimising drop - price x amount at the least price that reaches the need), whose dual
value is a second lower bound, tight when each row's (amount, drop) points are convex.
:meth:`MultipleChoiceKnapsack.best` returns the least-drop feasible candidate and
:meth:`MultipleChoiceKnapsack.lower_bound` the larger bound. One table answers every need up to
``most``: states count units exactly below ``bins`` and the last state holds "``bins`` or more".
"""

from __future__ import annotations

import numpy as np

from .errors import PrunescopeError

COST_BINS = 4096
"""Units the largest need is divided into (the resolution of the amounts)."""


class MultipleChoiceKnapsack:
    """Tables of the least summed drop per number of units removed, for amounts rounded down
    (feasible choices) and up (the relaxation), for needs up to ``most``."""

    def __init__(self, drops: np.ndarray, amounts: np.ndarray, most: float, *, bins: int = COST_BINS) -> None:
        drops, amounts = np.asarray(drops, dtype=np.float64), np.asarray(amounts, dtype=np.float64)
        if drops.ndim != 2 or drops.shape != amounts.shape or drops.size == 0:
            raise PrunescopeError(f"knapsack drops and amounts must be 2-D arrays of one shape (rows, columns); got {drops.shape} and {amounts.shape}")
        if np.isnan(drops).any() or np.isneginf(drops).any() or not np.isfinite(drops).any(axis=1).all():
            raise PrunescopeError("knapsack drops must be finite or +inf (not allowed), with a finite column in every row")
        if not np.isfinite(amounts).all() or (amounts < 0).any():
            raise PrunescopeError("knapsack amounts must be finite and >= 0")
        if not (np.isfinite(most) and most > 0) or isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 10**7:
            raise PrunescopeError(f"knapsack needs most > 0 and 1 <= bins <= 1e7; got most={most!r}, bins={bins!r}")
        if drops.shape[1] > np.iinfo(np.int16).max:
            raise PrunescopeError(f"knapsack takes at most {np.iinfo(np.int16).max} columns; got {drops.shape[1]}")
        self.drops, self.amounts, self.most, self.bins = drops, amounts, float(most), bins
        self.unit = self.most / bins
        """Amount per state (the resolution)."""
        self._down = np.minimum(np.floor(amounts / self.unit), bins).astype(np.int64)
        self._final, self._picks, self._cap_from = _solve(drops, self._down, bins, keep_picks=True)
        up = np.minimum(np.ceil(amounts / self.unit), bins).astype(np.int64)
        self._relaxed = _solve(drops, up, bins, keep_picks=False)[0]

    def _first_state(self, need: float) -> int:
        """The fewest units that guarantee ``need``: ceil(need / unit), at most the last state."""
        if not np.isfinite(need) or need > self.most * (1 + 1e-12):
            raise PrunescopeError(f"knapsack need {need!r} is above the table's most {self.most!r}")
        return min(self.bins, max(0, int(np.ceil(need / self.unit - 1e-9))))

    def best(self, need: float) -> np.ndarray | None:
        """Column per row of the least summed drop among the candidates whose true amounts reach
        ``need`` (see the module's text), or None when no choice does."""
        candidates = [picks for picks in (self._programmed(need), lagrangian(self.drops, self.amounts, need)[1]) if picks is not None]
        return min(candidates, key=self.drop_of) if candidates else None

    def lower_bound(self, need: float) -> float:
        """No choice whose true amounts reach ``need`` has a smaller summed drop: the larger of the
        up-rounded relaxation's optimum and the Lagrangian dual value (``inf`` when none can reach it)."""
        relaxed = float(self._relaxed[self._first_state(need):].min())
        return max(relaxed, lagrangian(self.drops, self.amounts, need)[0])

    def _programmed(self, need: float) -> np.ndarray | None:
        """The programme's choice at ``ceil(need / unit)`` rounded-down units or more (it reaches
        ``need``), or one of smaller drop at up to ``rows`` fewer units whose true amounts reach
        it too (each row rounds down by less than one unit), checked least drop first."""
        start = self._first_state(need)
        sure = start + int(np.argmin(self._final[start:]))
        if not np.isfinite(self._final[sure]):
            return None
        maybe = np.arange(max(0, start - len(self.drops)), start)
        maybe = maybe[self._final[maybe] < self._final[sure]]
        for state in maybe[np.argsort(self._final[maybe], kind="stable")]:
            picks = self._trace(int(state))
            if self.amounts[np.arange(len(picks)), picks].sum() >= need:
                return picks
        return self._trace(sure)

    def drop_of(self, picks: np.ndarray) -> float:
        """Summed drop of a choice (a column per row)."""
        return float(self.drops[np.arange(len(picks)), picks].sum())

    def _trace(self, state: int) -> np.ndarray:
        """The columns that reach ``state`` after the last row with its least drop."""
        picks = np.empty(len(self.drops), dtype=np.int64)
        for row in range(len(self.drops) - 1, -1, -1):
            column = int(self._picks[row, state])
            picks[row] = column
            state = int(self._cap_from[row]) if state == self.bins else state - int(self._down[row, column])
        return picks

def lagrangian(drops: np.ndarray, amounts: np.ndarray, need: float) -> tuple[float, np.ndarray | None]:
    """(dual value, choice) at the least price >= 0 whose choice reaches ``need``, every row taking
    its column of least drop - price x amount. Every price's dual value, the sum of those minima plus
    price x need, is a lower bound on the least summed drop reaching ``need`` (weak duality); the
    least reaching price maximises it. (inf, None) when even the largest amounts fall short."""
    usable = np.isfinite(drops)
    rows = np.arange(len(drops))
    if np.where(usable, amounts, -np.inf).max(axis=1).sum() < need:
        return float("inf"), None

    def choice(price: float) -> np.ndarray:
        return np.argmin(np.where(usable, drops - price * amounts, np.inf), axis=1)

    def reached(picks: np.ndarray) -> float:
        return float(amounts[rows, picks].sum())

    def dual(price: float) -> float:
        picks = choice(price)
        return float((drops[rows, picks] - price * amounts[rows, picks]).sum() + price * need)

    low, high = 0.0, _steepest_slope(drops, amounts, usable)
    if reached(choice(low)) >= need:
        return dual(low), choice(low)
    for _ in range(200):  # bisection: the amount the choice reaches grows with the price
        middle = (low + high) / 2
        if reached(choice(middle)) >= need:
            high = middle
        else:
            low = middle
        if high - low <= 1e-15 * high:
            break
    return max(dual(low), dual(high)), choice(high)


def _steepest_slope(drops: np.ndarray, amounts: np.ndarray, usable: np.ndarray) -> float:
    """A price above every drop-per-amount slope between two columns of a row: there each row
    takes its largest amount."""
    finite = drops[usable]
    gaps = np.diff(np.sort(np.where(usable, amounts, 0.0), axis=1), axis=1)
    smallest_gap = float(gaps[gaps > 0].min()) if (gaps > 0).any() else 1.0
    return 2.0 * (float(finite.max() - finite.min()) + 1.0) / smallest_gap


def _cheapest_per_weight(weights: np.ndarray, drops: np.ndarray) -> np.ndarray:
    """Columns with a finite drop, one per distinct weight: the one of least drop (then lowest index)."""
    usable = np.flatnonzero(np.isfinite(drops))
    order = usable[np.lexsort((usable, drops[usable], weights[usable]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = weights[order[1:]] != weights[order[:-1]]
    return order[first]


def _solve(drops: np.ndarray, units: np.ndarray, bins: int, *, keep_picks: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Forward pass over the rows: the least drop per state after the last row, and (with
    ``keep_picks``) the column chosen per (row, state) and where each row's last state came from."""
    rows = len(drops)
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((rows, bins + 1), dtype=np.int16) if keep_picks else None
    cap_from = np.zeros(rows, dtype=np.int64) if keep_picks else None
    columns = np.arange(bins)
    padded = np.full(2 * bins, np.inf)
    for row in range(rows):
        usable = _cheapest_per_weight(units[row], drops[row])
        weight, drop = units[row, usable], drops[row, usable]
        # states below the last: exactly (state - weight) units before this row
        padded[bins:] = best[:bins]
        shifted = np.lib.stride_tricks.sliding_window_view(padded, bins)[bins - weight]
        candidates = shifted + drop[:, None]
        new = np.empty_like(best)
        if keep_picks:
            choice = np.argmin(candidates, axis=0)
            new[:bins] = candidates[choice, columns]
        else:
            new[:bins] = candidates.min(axis=0)
        # the last state ("bins or more"): any state at or above (bins - weight) before this row
        suffix_min = np.minimum.accumulate(best[::-1])[::-1]
        last = np.maximum(bins - weight, 0)
        capped = suffix_min[last] + drop
        top = int(np.argmin(capped))
        new[bins] = capped[top]
        if keep_picks:
            picks[row, :bins] = usable[choice]
            picks[row, bins] = usable[top]
            cap_from[row] = last[top] + int(np.argmin(best[last[top]:]))
        best = new
    return best, picks, cap_from
