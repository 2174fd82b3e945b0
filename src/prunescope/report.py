"""What a person looks at: a target x level heatmap, sensitivity curves, and summary tables.

Figures and tables show one quantity, the drop (positive = worse) in the metric's own words (see
``report_text.quantity``), so "up" and "warm" mean worse whatever the metric's direction.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import CenteredNorm, Normalize, SymLogNorm  # noqa: E402

from .atomic import write_bytes_atomic  # noqa: E402
from .plan import Plan  # noqa: E402
from .profile import Profile  # noqa: E402
from .report_curves import sensitivity_figure  # noqa: E402
from .report_tables import plan_table, profile_table  # noqa: E402
from .report_text import (  # noqa: E402
    context,
    estimate_note,
    is_score,
    level_axis,
    log_threshold,
    names_note,
    noise_level,
    quantity,
    scale_for,
    short_names,
    symlog_ticks,
    unit_noun,
)

__all__ = ["estimate_note", "heatmap_figure", "is_score", "plan_table", "plot_heatmap", "plot_sensitivity",
           "profile_table", "sensitivity_figure", "write_report"]

CMAP = "RdBu_r"  # diverging: red = worse, blue = better, white = unchanged
_ROW_INCHES = (0.14, 0.32)  # a heatmap row's height: the least (7 pt labels) and the most
_TEXT_ROW_INCHES = 0.2  # rows lower than this get no printed values
_NAME_CHARS = 48
_MAX_INCHES = 80  # the rows of a heatmap of 500+ targets share this height (labels thin out below 4 pt)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def color_norm(values: np.ndarray, noise: float | None = None) -> Normalize:
    """A colour norm centred on zero and symmetric: a rise and a fall of equal size sit at equal
    distances from the centre. Logarithmic beyond ``log_threshold(values, noise)`` when there is one."""
    finite = np.abs(values[np.isfinite(values)])
    largest = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    threshold = log_threshold(values.ravel().tolist(), noise)
    if threshold is not None:
        return SymLogNorm(linthresh=threshold, vmin=-largest, vmax=largest, base=10)
    return CenteredNorm(0.0, largest)


def _text_color(rgba: tuple[float, ...]) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell colour)."""
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"  # >= 4.5:1 contrast either way


def heatmap_figure(profile: Profile) -> plt.Figure:
    """Targets (rows) x levels (columns), coloured by the shown drop on a zero-centred diverging scale."""
    shown = quantity(profile)
    names = [t.name for t in profile.targets]
    levels = list(profile.levels)
    row_of, col_of = {n: i for i, n in enumerate(names)}, {lv: j for j, lv in enumerate(levels)}
    grid = np.full((len(names), len(levels)), np.nan)
    for cell in profile.cells:
        grid[row_of[cell.target], col_of[cell.level]] = shown.of(profile, cell)
    noise = noise_level(profile)
    scale = scale_for(grid[np.isfinite(grid)].tolist(), noise)
    grid = grid / 10.0**scale.exponent
    norm = color_norm(grid, None if noise is None else scale.plain(noise))

    row_in = min(max(24.0 / max(len(names), 1), _ROW_INCHES[0]), _ROW_INCHES[1], _MAX_INCHES / max(len(names), 1))
    texts = {(i, j): scale(v * 10.0**scale.exponent) for (i, j), v in np.ndenumerate(grid) if not np.isnan(v)}
    col_in = max(0.5, 0.075 * max(map(len, texts.values()), default=1) + 0.2)
    height = row_in * len(names) + 1.9
    fig, ax = plt.subplots(figsize=(1.2 + col_in * len(levels) + 1.4, height))
    fig.subplots_adjust(top=1 - 1.1 / height, bottom=0.8 / height)  # margins in inches: rows get the rest
    cmap = plt.get_cmap(CMAP).with_extremes(bad="#d9d9d9")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    label_pt = min(9.0, 72 * row_in * 0.7)
    step = max(1, math.ceil(4.0 / label_pt))  # below 4 pt, label every step-th row
    short = short_names(names, _NAME_CHARS)
    ax.set_yticks(range(0, len(names), step), [short[n] for n in names[::step]], fontsize=max(label_pt, 4.0))
    ax.set_xticks(range(len(levels)), levels, fontsize=8)
    if len(names) > 30:  # a tall figure: the levels also at the top, where reading starts
        ax.tick_params(top=True, labeltop=True)
    ax.set_xlabel(level_axis(profile))
    ax.set_ylabel(unit_noun(profile) if step == 1 else f"{unit_noun(profile)} (every {step}th labelled)")
    log = isinstance(norm, SymLogNorm)
    # at most ~6 inches long and at the top, where a reader of a tall figure starts
    bar = fig.colorbar(image, ax=ax, fraction=0.08 if len(levels) < 6 else 0.05, shrink=min(1.0, 6.0 / height),
                       anchor=(0.0, 1.0))
    label = shown.label.replace(" (higher", "\n(higher") + (f"\n({scale.suffix})" if scale.suffix else "")
    bar.set_label(label + (f"\nlinear within ±{norm.linthresh:.2g}, log beyond" if log else ""))
    if log:
        bar.set_ticks(symlog_ticks(norm.linthresh, norm.vmax))
    notes = [context(profile)] + ([names_note(names, short)] if names_note(names, short) else [])
    if np.isnan(grid).any():
        notes.append("grey = not measured")
    if row_in >= _TEXT_ROW_INCHES:
        for (i, j), text in texts.items():
            value = grid[i, j]
            rgba = cmap(norm(value)) if np.isfinite(value) else cmap(1.0 if value > 0 else 0.0)
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=_text_color(rgba))
    else:
        notes.append("values not printed: rows too small (see the table or the CSV)")
    ax.set_title(f"{shown.label} when one {unit_noun(profile)} is pruned, the rest dense\n" + "; ".join(notes), fontsize=9)
    return fig


def plot_heatmap(profile: Profile, path: str | Path) -> Path:
    """Write :func:`heatmap_figure` as a PNG at ``path``, atomically."""
    return _save(heatmap_figure(profile), path)


def plot_sensitivity(profile: Profile, path: str | Path, plan: Plan | None = None) -> Path:
    """Write :func:`sensitivity_figure` (``plan`` levels marked) as a PNG at ``path``, atomically."""
    return _save(sensitivity_figure(profile, plan), path)


def write_report(profile: Profile, out_dir: str | Path, plan: Plan | None = None) -> list[Path]:
    """sensitivity.png and heatmap.png in ``out_dir``."""
    out = Path(out_dir)
    return [plot_sensitivity(profile, out / "sensitivity.png", plan), plot_heatmap(profile, out / "heatmap.png")]
