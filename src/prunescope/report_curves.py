"""Sensitivity curves: the shown drop against the fraction removed, one line per target.

Up to ``HIGHLIGHT`` targets each get a colour and a marker, an interval band and a legend entry;
beyond that the ``HIGHLIGHT`` most sensitive ones do and the rest are thin grey lines, so 20 or 200
layers still read as "these few are fragile, the bulk is not". The legend sits outside the axes.
A profile with a single level (whole blocks) is drawn as bars instead.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .levels import is_nm_key, removed_share  # noqa: E402
from .plan import Plan  # noqa: E402
from .profile import Cell, Profile  # noqa: E402
from .report_text import (  # noqa: E402
    Quantity,
    context,
    level_axis,
    log_threshold,
    noise_level,
    quantity,
    scale_for,
    short_names,
    symlog_ticks,
    unit_noun,
)

HIGHLIGHT = 8
_COLORS = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # tab10 without its grey
_MARKERS = "osD^vPXh"
_GREY = "#9a9a9a"


def _curves(profile: Profile) -> dict[str, list[Cell]]:
    """Each target's fractional-level cells, by ascending fraction (N:M levels have no place on a line)."""
    curves: dict[str, list[Cell]] = {t.name: [] for t in profile.targets}
    for cell in profile.cells:
        if not is_nm_key(cell.level):
            curves[cell.target].append(cell)
    return {name: sorted(cells, key=lambda c: c.sparsity) for name, cells in curves.items() if cells}


def sensitivity_rank(profile: Profile) -> list[str]:
    """Targets from most to least sensitive: by their mean rank over the profile's fractional levels
    (each level counts the same, so one exploding level does not decide alone); a level a target
    was not measured at (a scan stopped by max_drop) takes the target's last drop before it."""
    curves = _curves(profile)
    levels = sorted({c.sparsity for cells in curves.values() for c in cells})
    drops: dict[str, list[float]] = {}
    for name, cells in curves.items():
        at, last = {c.sparsity: profile.drop(c) for c in cells}, 0.0
        drops[name] = [last := at.get(level, last) for level in levels]
    rank = dict.fromkeys(drops, 0.0)
    for j in range(len(levels)):
        order = sorted(drops, key=lambda n: drops[n][j] if not math.isnan(drops[n][j]) else -math.inf, reverse=True)
        for position, name in enumerate(order):
            rank[name] += position
    return sorted(rank, key=lambda n: rank[n])


def _planned(plan: Plan | None, name: str) -> float | None:
    if plan is None or name not in plan.levels or isinstance(plan.levels[name], str):
        return None
    return removed_share(plan.levels[name])


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    return float(np.interp(x, xs, ys))


def _bars(ax: plt.Axes, profile: Profile, shown: Quantity, factor: float, level: str) -> None:
    """One horizontal bar per target at ``level``, with its interval as an error bar."""
    by_target = {c.target: c for c in profile.cells if c.level == level}
    names = [t.name for t in profile.targets if t.name in by_target]
    values = [factor * shown.of(profile, by_target[n]) for n in names]
    errors = [[0.0, 0.0] for _ in names]
    for i, name in enumerate(names):
        interval = shown.interval(profile, by_target[name])
        if interval is not None:
            errors[i] = [max(values[i] - factor * interval[0], 0.0), max(factor * interval[1] - values[i], 0.0)]
    short = short_names(names, 48)
    ax.barh(range(len(names)), values, xerr=list(zip(*errors, strict=True)) if names else None,
            color=["#b2182b" if v > 0 else "#2166ac" for v in values], error_kw={"lw": 0.8})
    ax.set_yticks(range(len(names)), [short[n] for n in names], fontsize=min(9, max(4, 400 / max(len(names), 1))))
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)


def _log_axis(ax: plt.Axes, threshold: float) -> None:
    """A symmetric-log y axis, linear within +-``threshold``, with plain-number ticks."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    ax.set_yscale("symlog", linthresh=threshold)
    bottom, top = min(min(ys), -threshold) * 1.5, max(ys) * 1.5
    ax.set_yticks([t for t in symlog_ticks(threshold, top) if t >= bottom])
    ax.set_ylim(bottom, top)
    ax.yaxis.set_major_formatter("{x:g}")


def sensitivity_figure(profile: Profile, plan: Plan | None = None) -> plt.Figure:
    """The shown drop (see ``report_text.quantity``) against the fraction removed, per target, with
    interval bands, dense at zero, and ``plan``'s level per target marked with a star."""
    shown = quantity(profile)
    curves = _curves(profile)
    scale = scale_for([shown.of(profile, c) for cells in curves.values() for c in cells])
    factor = 10.0**-scale.exponent
    noun = unit_noun(profile)
    levels = {c.level for cells in curves.values() for c in cells}
    if len(levels) <= 1:
        level = next(iter(levels)) if levels else profile.levels[0]
        fig, ax = plt.subplots(figsize=(8, min(max(0.22 * len(profile.targets) + 1.5, 3.5), 40)))
        _bars(ax, profile, shown, factor, level)
        ax.set_xlabel(shown.label + (f" ({scale.suffix})" if scale.suffix else ""))
        how = "removed whole" if profile.granularity == "block" else f"pruned at level {level} ({profile.criterion})"
        ax.set_title(f"{shown.label} when one {noun} is {how}, the rest dense\n{context(profile)}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        return fig

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ranked = sensitivity_rank(profile)
    picked = ranked[:HIGHLIGHT]
    short = short_names(picked, 40)
    handles = []
    for name in reversed(ranked):  # the most sensitive drawn last, on top
        cells = curves[name]
        xs = [0.0] + [c.sparsity for c in cells]
        ys = [0.0] + [factor * shown.of(profile, c) for c in cells]
        level = _planned(plan, name)
        if name not in picked:
            ax.plot(xs, ys, color=_GREY, lw=0.7, alpha=0.6, zorder=1)
            if level is not None:
                ax.plot([level], [_interp(level, xs, ys)], marker="*", ms=7, color=_GREY, mec="black", mew=0.3, zorder=2)
            continue
        i = picked.index(name)
        color, marker = _COLORS[i % len(_COLORS)], _MARKERS[i % len(_MARKERS)]
        (line,) = ax.plot(xs, ys, marker=marker, ms=4, lw=1.5, color=color, label=short[name], zorder=3)
        handles.append((i, line))
        intervals = [shown.interval(profile, c) for c in cells]
        if all(iv is not None for iv in intervals):
            ax.fill_between(xs, [0.0] + [factor * iv[0] for iv in intervals], [0.0] + [factor * iv[1] for iv in intervals],
                            color=color, alpha=0.15, lw=0, zorder=2)
        if level is not None:
            ax.plot([level], [_interp(level, xs, ys)], marker="*", ms=13, color=color, mec="black", mew=0.6, zorder=4)
    legend = [line for _, line in sorted(handles, key=lambda pair: pair[0])]
    if len(ranked) > len(picked):
        legend.append(Line2D([], [], color=_GREY, lw=0.7, label=f"{len(ranked) - len(picked)} other {noun}s"))
    legend.append(Line2D([], [], color="black", ls="--", lw=1, label="dense"))
    if plan is not None:
        legend.append(Line2D([], [], ls="", marker="*", ms=10, color="white", mec="black", label="planned level"))
    ax.axhline(0.0, color="black", ls="--", lw=1, zorder=2)
    noise = noise_level(profile)
    threshold = log_threshold([y for line in ax.get_lines() for y in line.get_ydata()], None if noise is None else factor * noise)
    if threshold is not None:
        _log_axis(ax, threshold)
    title = "most sensitive first" if len(ranked) <= len(picked) else f"the {len(picked)} most sensitive of {len(ranked)}"
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, title=title,
              title_fontsize=8, frameon=False)
    ax.set_xlabel(level_axis(profile))
    notes = [scale.suffix] if scale.suffix else []
    notes += ["symlog"] if threshold is not None else []
    ax.set_ylabel(shown.label + (f" ({', '.join(notes)})" if notes else ""))
    nm = any(is_nm_key(lv) for lv in profile.levels)
    notes = [context(profile)] + (["N:M levels are in the heatmap"] if nm else [])
    ax.set_title(f"{shown.label} when one {noun} is pruned, the rest dense\n" + "; ".join(notes), fontsize=9)
    ax.grid(alpha=0.3)
    return fig
