"""What a person looks at: sensitivity curves, a layer x level heatmap, and summary tables."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.table import Table  # noqa: E402

from .atomic import write_bytes_atomic  # noqa: E402
from .levels import is_nm_key  # noqa: E402
from .plan import Plan  # noqa: E402
from .profile import Profile  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def is_score(profile: Profile) -> bool:
    """True for an estimated profile whose cells are rank-only scores, not metric values."""
    return profile.kind == "estimated" and str(profile.provenance.get("units", "")).startswith("score")


def estimate_note(profile: Profile) -> str:
    """For an estimated profile: the method and, when it was measured against a scan, its Spearman
    rank correlation with the measured drops (all cells, and the mean within a level); else ''."""
    if profile.kind != "estimated":
        return ""
    note = f"estimated by {profile.provenance.get('method', '?')}"
    agreement = profile.provenance.get("agreement")
    if agreement:
        note += (f"; Spearman vs measured scan {agreement['spearman']:.2f} over {agreement['cells']} cells "
                 f"({agreement['mean_per_level']:.2f} within a level)")
    return note


def plot_sensitivity(profile: Profile, path: str | Path, plan: Plan | None = None) -> Path:
    """Metric vs fraction removed, one line per target with its confidence band; dense as a dashed line.
    With a plan, each target's planned level is marked on its curve."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.95, max(len(profile.targets), 1)))
    for color, target in zip(colors, profile.targets, strict=True):
        cells = sorted((c for c in profile.cells if c.target == target.name and not is_nm_key(c.level)), key=lambda c: c.sparsity)
        if not cells:
            continue
        x = [0.0] + [c.sparsity for c in cells]
        y = [0.0 if is_score(profile) else profile.dense_value] + [c.value for c in cells]
        ax.plot(x, y, marker="o", ms=3, lw=1.2, color=color, label=target.name)
        if all(c.ci_low is not None for c in cells):
            low = [profile.dense_value] + [profile.dense_value + c.ci_low for c in cells]
            high = [profile.dense_value] + [profile.dense_value + c.ci_high for c in cells]
            ax.fill_between(x, low, high, color=color, alpha=0.12, lw=0)
        if plan is not None and len(profile.targets) <= 40 and target.name in plan.levels and not isinstance(plan.levels[target.name], str):
            level = float(plan.levels[target.name])
            ax.plot([level], [float(np.interp(level, x, y))], marker="*", ms=12, color=color, mec="black", mew=0.6)
    if not is_score(profile):
        ax.axhline(profile.dense_value, color="black", ls="--", lw=1, label=f"dense ({profile.dense_value:.4g})")
    ax.set_xlabel(f"fraction of the layer's weights removed ({profile.criterion})")
    ax.set_ylabel(f"{profile.provenance.get('method')} score" if is_score(profile) else profile.metric)
    if profile.metric == "perplexity" and not is_score(profile):
        ax.set_yscale("log")
    title = f"Pruning sensitivity per layer ({profile.kind}, {profile.provenance.get('samples', '?')} samples, {profile.confidence:.0%} CI)"
    if profile.kind == "estimated":
        title = f"Pruning sensitivity per layer ({estimate_note(profile)})"
    ax.set_title(title + ("; stars = plan" if plan and len(profile.targets) <= 40 else ""), fontsize=10)
    if len(profile.targets) <= 24:
        ax.legend(fontsize=7, ncol=2 if len(profile.targets) > 12 else 1, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_heatmap(profile: Profile, path: str | Path) -> Path:
    """Drop (positive = worse) per target (rows) and level (columns)."""
    names = [t.name for t in profile.targets]
    levels = list(profile.levels)
    grid = np.full((len(names), len(levels)), np.nan)
    for cell in profile.cells:
        grid[names.index(cell.target), levels.index(cell.level)] = profile.drop(cell)
    height = min(0.28 * len(names) + 1.8, 40)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(levels) + 2.5, height))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_xticks(range(len(levels)), levels)
    ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 30 else 9)
    ax.set_xlabel("level")
    direction = "dense - pruned" if profile.higher_is_better else "pruned - dense"
    fig.colorbar(image, ax=ax, label=f"{profile.metric} drop ({direction})")
    if len(names) * len(levels) <= 120:
        for i in range(len(names)):
            for j in range(len(levels)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j] + 0.0:.2g}" if abs(grid[i, j]) > 1e-12 else "0", ha="center", va="center", fontsize=6, color="grey")
    ax.set_title("Sensitivity heatmap (blank = not measured)")
    return _save(fig, path)


def profile_table(profile: Profile, max_rows: int = 40) -> Table:
    """Per-target rows: params, the metric at each level, and the widest interval half-width."""
    levels = list(profile.levels)
    if is_score(profile):
        table = Table(title=f"{profile.provenance.get('method')} score when one layer is pruned (higher = predicted worse)")
    else:
        table = Table(title=f"{profile.metric} when one layer is pruned (dense {profile.dense_value:.4g})")
    table.add_column("target", no_wrap=True)
    table.add_column("params", justify="right")
    for level in levels:
        table.add_column(level, justify="right")
    table.add_column(f"±{profile.confidence:.0%}", justify="right")
    for target in profile.targets[:max_rows]:
        cells = [profile.cell(target.name, level) for level in levels]
        widths = [(c.ci_high - c.ci_low) / 2 for c in cells if c is not None and c.ci_low is not None]
        row = [target.name, f"{target.params:,}"]
        row += ["-" if c is None else f"{c.value:.3g}" for c in cells]
        row.append(f"{max(widths):.2g}" if widths else "")
        table.add_row(*row)
    captions = [estimate_note(profile)] if profile.kind == "estimated" else []
    if len(profile.targets) > max_rows:
        captions.append(f"{len(profile.targets) - max_rows} more targets in the profile file")
    table.caption = "; ".join(captions) or None
    return table


def plan_table(plan: Plan, max_rows: int = 40) -> Table:
    """Per-target planned level and parameters removed."""
    table = Table(title=f"plan: {plan.method}, {plan.sparsity:.1%} of {sum(plan.params.values()):,} prunable parameters removed")
    table.add_column("target")
    table.add_column("params", justify="right")
    table.add_column("level", justify="right")
    for name, level in list(plan.levels.items())[:max_rows]:
        table.add_row(name, f"{plan.params[name]:,}", level if isinstance(level, str) else f"{float(level):.3f}")
    if len(plan.levels) > max_rows:
        table.caption = f"{len(plan.levels) - max_rows} more targets in the plan file"
    return table


def write_report(profile: Profile, out_dir: str | Path, plan: Plan | None = None) -> list[Path]:
    """sensitivity.png and heatmap.png in ``out_dir``."""
    out = Path(out_dir)
    return [plot_sensitivity(profile, out / "sensitivity.png", plan), plot_heatmap(profile, out / "heatmap.png")]
