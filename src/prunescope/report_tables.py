"""Terminal tables of a profile and a plan that fit the console's width (80 columns in a pipe or a CI
log): compact numbers on one common scale, long target names cut to their distinguishing tail, and
levels left out, with a caption saying so, when even that does not fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from .plan import Plan
from .profile import Profile
from .report_text import (
    Scale,
    compact_count,
    dense_text,
    estimate_note,
    names_note,
    noise_level,
    quantity,
    scale_for,
    shared_prefix,
    short_names,
    tail_width,
    unit_noun,
)
from .target import Target

_GAP = 2  # characters between two columns
_MIN_NAME = 12  # a target column is at least this wide, or as wide as the names' distinguishing tails


class FitToWidth:
    """A rich renderable that builds its table for the width it is printed at."""

    def __init__(self, build: Callable[[int], Table]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width)


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                 title_justify="left", caption_justify="left")


def _fill(table: Table, headers: list[str], rows: list[list[str]], room: int) -> None:
    """Right-aligned number columns exactly as wide as their widest entry (never wrapped or cut), and
    a target column at most ``room`` wide that takes the slack a longer title leaves, then the rows."""
    widths = [max([len(header), *(len(r[j]) for r in rows)]) for j, header in enumerate(headers)]
    slack = len(str(table.title or "")) - sum(widths[1:]) - _GAP * (len(headers) - 1)
    table.add_column(headers[0], no_wrap=True, overflow="ellipsis", max_width=room, min_width=min(room, max(widths[0], slack)))
    for header, width in zip(headers[1:], widths[1:], strict=True):
        table.add_column(header, justify="right", no_wrap=True, width=width)
    for row in rows:
        table.add_row(*row)


def _spread(count: int, keep: int) -> list[int]:
    """``keep`` indices of ``count`` items, evenly spread, first and last included."""
    if keep >= count:
        return list(range(count))
    if keep <= 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def _layout(targets: list[Target], levels: list[str], text: dict[tuple[str, str], str], params: dict[str, str],
            halves: dict[str, float], scale: Scale, ci: str, width: int, wanted: int) -> tuple[list[int], int]:
    """Which levels fit beside a target column of at least ``wanted`` characters, and that column's width."""

    def column(header: str, values: list[str]) -> int:
        return max([len(header), *map(len, values)])

    level_widths = [column(lv, [text.get((t.name, lv), "-") for t in targets]) for lv in levels]
    fixed = column("params", list(params.values())) + (column(ci, [scale(h) for h in halves.values()]) + _GAP if halves else 0)
    keep = list(range(len(levels)))
    while True:
        room = width - fixed - _GAP - sum(level_widths[i] + _GAP for i in keep)
        if room >= wanted or len(keep) == 1:
            return keep, room
        keep = _spread(len(levels), len(keep) - 1)


def _profile_table(profile: Profile, max_rows: int, width: int) -> Table:
    shown = quantity(profile)
    targets = profile.targets[:max_rows]
    levels = list(profile.levels)
    grid = {(c.target, c.level): shown.of(profile, c) for c in profile.cells}
    halves = {}
    for cell in profile.cells:
        interval = shown.interval(profile, cell)
        if interval is not None:
            halves[cell.target] = max(halves.get(cell.target, 0.0), (interval[1] - interval[0]) / 2)
    ci = f"±{profile.confidence:.0%}"
    params = {t.name: compact_count(t.params) for t in targets}
    names = [t.name for t in targets]
    prefix = shared_prefix(names)
    wanted = min(max((len(n) - len(prefix) for n in names), default=6), max(tail_width(names), _MIN_NAME))
    best = scale_for([*grid.values(), *halves.values()], noise_level(profile))
    for scale in (best, replace(best, decimals=max(best.decimals - 1, 0))):
        keep, room = _layout(targets, levels, {k: scale(v) for k, v in grid.items()}, params, halves, scale, ci, width, wanted)
        if len(keep) == len(levels):
            break
    text = {key: scale(v) for key, v in grid.items()}
    names = short_names([t.name for t in targets], max(room, 8))

    dense = f", dense {dense_text(profile)}" if dense_text(profile) else ""
    table = _table(f"{shown.label} when one {unit_noun(profile)} is pruned{dense}")
    rows = []
    for target in targets:
        row = [names[target.name], params[target.name], *(text.get((target.name, levels[i]), "-") for i in keep)]
        rows.append(row + ([scale(halves[target.name]) if target.name in halves else ""] if halves else []))
    _fill(table, ["target", "params", *(levels[i] for i in keep), *([ci] if halves else [])], rows, max(room, 8))
    captions = [estimate_note(profile)] if profile.kind == "estimated" else []
    captions.append(scale.suffix)
    if halves:
        captions.append(f"{ci}: the widest interval half-width of the row")
    if len(keep) < len(levels):
        captions.append(f"{len(levels) - len(keep)} of {len(levels)} levels left out at this width")
    if len(profile.targets) > max_rows:
        captions.append(f"{len(profile.targets) - max_rows} more targets in the profile file")
    captions.append(names_note([t.name for t in targets], names))
    table.caption = "; ".join(c for c in captions if c) or None
    return table


def profile_table(profile: Profile, max_rows: int = 40, width: int | None = None) -> Table | FitToWidth:
    """Per-target rows: parameters, the shown drop (see ``report_text.quantity``) at each level, and the
    widest interval half-width; at most ``max_rows`` targets. With ``width`` a Table of at most that
    many characters; without, a renderable that fits the console it is printed on."""
    if width is not None:
        return _profile_table(profile, max_rows, width)
    return FitToWidth(lambda w: _profile_table(profile, max_rows, w))


def _plan_table(plan: Plan, max_rows: int, width: int) -> Table:
    rows = list(plan.levels.items())[:max_rows]
    levels = {name: level if isinstance(level, str) else f"{float(level):.3f}" for name, level in rows}
    params = {name: compact_count(plan.params[name]) for name, _ in rows}
    room = width - _GAP * 2 - max(map(len, ["params", *params.values()])) - max(map(len, ["level", *levels.values()]))
    names = short_names([name for name, _ in rows], max(room, 8))
    title = f"plan ({plan.method}): {plan.sparsity:.1%} of {compact_count(sum(plan.params.values()))} prunable parameters removed"
    table = _table(title)
    _fill(table, ["target", "params", "level"], [[names[n], params[n], levels[n]] for n, _ in rows], max(room, 8))
    captions = []
    if len(plan.levels) > max_rows:
        captions.append(f"{len(plan.levels) - max_rows} more targets in the plan file")
    captions.append(names_note([name for name, _ in rows], names))
    table.caption = "; ".join(c for c in captions if c) or None
    return table


def plan_table(plan: Plan, max_rows: int = 40, width: int | None = None) -> Table | FitToWidth:
    """Per-target planned level and parameters; at most ``max_rows`` targets, fitted to ``width``
    characters (or, without, to the console it is printed on)."""
    if width is not None:
        return _plan_table(plan, max_rows, width)
    return FitToWidth(lambda w: _plan_table(plan, max_rows, w))
