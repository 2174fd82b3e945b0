"""The command line's options checked before a model is loaded (a bad option costs no loading and
writes nothing), and the levels a scan or estimate uses when none are given."""

from __future__ import annotations

from pathlib import Path

from .checks import whole_number
from .errors import PrunescopeError
from .outputs import check_output_file

SPLITS = ("val", "test", "train")


def check_data_options(samples: int | None, batch_size: int | None, seq_len: int, first_window: int | None, split: str,
                       metric: str | None) -> None:
    """--samples, --batch-size, --seq-len, --first-window, --split and --metric."""
    from .data import check_data_arguments
    from .metrics import resolve_metric

    check_data_arguments(samples=samples, batch_size=batch_size, seq_len=seq_len, first_window=first_window)
    if split not in SPLITS:
        raise PrunescopeError(f"--split {split!r}; accepted: {', '.join(SPLITS)}")
    if metric is not None:
        resolve_metric(metric)


def check_data_spec(spec: str | None) -> None:
    """--data a known spec (digits, pydoc, text:FILE with the file there, random:C,H,W); None passes."""
    from .data import DATA_SPECS

    if spec is None or spec in ("digits", "pydoc"):
        return
    kind, _, rest = spec.partition(":")
    if kind == "text" and not Path(rest).is_file():
        raise PrunescopeError(f"text file {rest!r} does not exist (--data text:FILE)")
    if kind not in ("text", "random") or not rest:
        raise PrunescopeError(f"unknown data spec {spec!r}; accepted: {DATA_SPECS}")


def check_unit_options(granularity: str, criterion: str | None, head_mode: str, round_to: int | None) -> None:
    """--granularity with its --criterion, --head-mode and --round-to."""
    from .scan_checks import check_scan_criterion
    from .structure.transformer_find import check_head_mode

    check_scan_criterion(criterion or "magnitude", granularity)
    check_head_mode(head_mode)
    whole_number(round_to, "--round-to", optional=True)


def check_scan_options(mode: str, tolerance: float | None, min_batches: int, seed: int, cache_mb: int,
                       max_drop: float | None) -> None:
    """scan's --mode, --tolerance, --min-batches, --seed, --cache-mb and --max-drop."""
    from .scan import MODES

    if mode not in MODES:
        raise PrunescopeError(f"unknown --mode {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "adaptive" and not (tolerance is not None and tolerance > 0):
        raise PrunescopeError(f"--mode adaptive needs a positive --tolerance (half-width of the change's interval, metric units); got {tolerance}")
    whole_number(min_batches, "min_batches")
    whole_number(seed, "--seed", 0)
    whole_number(cache_mb, "--cache-mb", 0)
    if max_drop is not None and not max_drop > 0:
        raise PrunescopeError(f"--max-drop must be positive (metric units); got {max_drop}")


def check_estimate_score(score: str, granularity: str) -> None:
    """estimate's --score, known and applicable to --granularity."""
    from .estimate.api import check_score

    check_score(score, granularity)


def check_profile_out(out: Path) -> None:
    """--out of a profile and, beside a .json, its .csv twin."""
    check_output_file(out, "--out")
    if out.suffix == ".json":
        check_output_file(out.with_suffix(".csv"), "--out's CSV twin")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)``; the range itself is checked by the scan."""
    if text is None:
        return None
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise PrunescopeError(f"--shard must be I/N with whole numbers 0 <= I < N (e.g. 0/2); got {text!r}")
    return int(index), int(count)


def levels_for(granularity: str, targets: list, given: list | None, round_to: int | None) -> tuple[list, str | None]:
    """(levels, note): as given, refusing one a unit group cannot take before any evaluation; when none are
    given 0.1:0.9:0.1, and for unit groups the levels every group can take, with a note saying which."""
    from .levels import DEFAULT_LEVELS, level_key
    from .scan_checks import UNIT_GRANULARITIES, check_unit_levels, unit_levels

    if granularity not in UNIT_GRANULARITIES:
        return (list(DEFAULT_LEVELS) if given is None else given), None
    if given is not None:
        check_unit_levels(targets, given, round_to)
        return given, None
    chosen = unit_levels(targets, round_to)
    if chosen == list(DEFAULT_LEVELS):
        return chosen, None
    smallest = min(t.group.units for t in targets)
    return chosen, (f"levels: {', '.join(level_key(v) for v in chosen)} (the fractions every {granularity} group can lose; "
                    f"the smallest has {smallest} units; pass --levels to choose)")
