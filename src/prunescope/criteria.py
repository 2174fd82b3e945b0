"""The one registry of removal criteria: which elements (or units) of a target a level removes,
what each criterion applies to and what it needs. ``scan``, ``estimate``, ``apply`` and
``prune_oneshot`` all check a criterion here, so they accept and refuse the same names."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PrunescopeError

STRUCTURED = ("channel", "head", "neuron", "block")


@dataclass(frozen=True)
class Criterion:
    """What a criterion applies to and what it needs.

    ``calibration``: ranks from the statistics of each layer's inputs on calibration batches;
    ``gradients``: needs gradients of a loss; ``updates_weights``: changes the kept weights too;
    ``oneshot``: :func:`prunescope.prune_oneshot` applies it layer by layer.
    """

    name: str
    granularities: tuple[str, ...]
    meaning: str
    calibration: bool = False
    gradients: bool = False
    updates_weights: bool = False
    oneshot: bool = False


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("magnitude", ("weight", *STRUCTURED), "smallest |w| first (structured: group L2 norm, = l2)", oneshot=True),
    Criterion("random", ("weight", *STRUCTURED), "a seeded random choice (same seed, target and level: same mask)"),
    Criterion("wanda", ("weight",), "smallest |w| * ||x|| per output row (Sun et al. 2023)", calibration=True, oneshot=True),
    Criterion("sparsegpt", ("weight",), "OBS with weight updates (Frantar & Alistarh 2023)", calibration=True,
              updates_weights=True, oneshot=True),
    Criterion("l1", STRUCTURED, "smallest group L1 norm first"),
    Criterion("l2", STRUCTURED, "smallest group L2 norm first"),
    Criterion("bn_scale", ("channel",), "smallest |BatchNorm scale| first (Network Slimming)"),
)}

ALIASES = {("magnitude", g): "l2" for g in STRUCTURED}
"""Names that mean another criterion at a granularity: structured ``magnitude`` is the L2 norm."""

CALIBRATED = tuple(name for name, c in CRITERIA.items() if c.calibration)


def accepted(granularity: str, *, oneshot: bool = False, calibration: bool = True) -> list[str]:
    """The criterion names accepted for ``granularity`` (one-shot / data-free subsets on request)."""
    return [name for name, c in CRITERIA.items()
            if granularity in c.granularities and (c.oneshot or not oneshot) and (calibration or not c.calibration)]


def check_criterion(name: object, granularity: str = "weight", *, oneshot: bool = False, calibration: bool = True) -> str:
    """The canonical criterion name for ``granularity``, or a PrunescopeError naming the accepted ones.

    ``oneshot=True`` accepts only what :func:`prunescope.prune_oneshot` applies; ``calibration=False``
    refuses criteria that need calibration data (a mask from the weight alone).
    """
    names = accepted(granularity, oneshot=oneshot, calibration=calibration)
    if not isinstance(name, str) or name not in names:
        where = "one-shot pruning" if oneshot else f"{granularity} targets"
        extra = ""
        if isinstance(name, str) and name in CRITERIA and CRITERIA[name].calibration and not calibration:
            extra = (" (it needs the statistics of each layer's inputs on calibration data: use scan(..., calibration=), "
                     "apply(..., calibration=batches) or prune_oneshot)")
        known = CRITERIA.get(name) if isinstance(name, str) else None
        if known is not None and granularity not in known.granularities:
            raise PrunescopeError(f"criterion {name!r} applies to {', '.join(known.granularities)} targets, not {granularity} "
                                  f"targets; accepted: {', '.join(names)}")
        if known is not None and oneshot and not known.oneshot:
            raise PrunescopeError(f"criterion {name!r} is not applied by one-shot pruning; accepted: {', '.join(names)}")
        raise PrunescopeError(f"unknown criterion {name!r} for {where}{extra}; accepted: {', '.join(names)}")
    return ALIASES.get((name, granularity), name)


def is_calibrated(name: str) -> bool:
    """True for criteria that rank weights from calibration statistics (wanda, sparsegpt)."""
    return name in CALIBRATED
