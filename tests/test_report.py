"""Pictures and tables people can read: colours centred on zero with "worse" warm, words that match
the profile, legends off the data, tables that fit 80 columns, and a CSV that pandas reads."""

from __future__ import annotations

import io
import math
import re

import matplotlib
import pytest
from matplotlib.colors import SymLogNorm
from rich.console import Console

import prunescope as ps
from prunescope.levels import level_sparsity
from prunescope.report import heatmap_figure, profile_table, sensitivity_figure, write_report
from prunescope.report_curves import HIGHLIGHT
from prunescope.report_tables import plan_table
from prunescope.report_text import short_names, tail_width

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LEVELS = ("0.2", "0.5", "0.8")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLM_NAMES = [f"model.layers.{i}.{p}" for i in range(28) for p in PROJECTIONS]


def make_profile(names, drop, *, levels=LEVELS, metric="accuracy", higher_is_better=True, granularity="weight",
                 kind="measured", half_width=0.002, provenance=None) -> ps.Profile:
    """A profile whose cell (target i, level) got ``drop(i, fraction)`` worse, in metric units."""
    targets = [ps.Target(n, "Linear", (64, 64), 4096 * (i + 1), 8192.0, granularity=granularity) for i, n in enumerate(names)]
    cells = []
    for i, name in enumerate(names):
        for level in levels:
            fraction = level_sparsity(level) if level != "1" else 1.0
            change = -drop(i, fraction) if higher_is_better else drop(i, fraction)
            ci = (None, None) if half_width is None else (change - half_width, change + half_width)
            cells.append(ps.Cell(name, level, fraction, 0.9 + change, change, *ci, 64, 0.1))
    return ps.Profile(metric, higher_is_better, 0.9, "magnitude", granularity, list(levels), targets, cells, kind=kind,
                      provenance=provenance or {"samples": 64})


def cell_colors(fig: plt.Figure):
    """RGBA of every heatmap cell, [row][column]."""
    image = fig.axes[0].images[0]
    return image.to_rgba(image.get_array())


def luminance(rgba) -> float:
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# ---- heatmap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("spread", [1.0, 1e5], ids=["linear", "log"])
def test_heatmap_colours_an_improvement_and_a_worsening_of_equal_size_symmetrically(higher_is_better, spread):
    # cell (0, 0) improves by 0.05, cell (1, 0) worsens by 0.05, whatever the metric's direction
    drops = {(0, 0.2): -0.05, (1, 0.2): 0.05, (2, 0.8): 0.3 * spread}
    profile = make_profile(["a", "b", "c"], lambda i, x: drops.get((i, x), 0.0), higher_is_better=higher_is_better,
                           metric="accuracy" if higher_is_better else "loss")
    fig = heatmap_figure(profile)
    norm = fig.axes[0].images[0].norm
    assert isinstance(norm, SymLogNorm) == (spread > 1)  # a few exploding cells: log beyond the noise
    better, worse, zero = cell_colors(fig)[0][0], cell_colors(fig)[1][0], cell_colors(fig)[0][1]
    assert norm(0.0) == pytest.approx(0.5)
    factor = 100 if higher_is_better else 1  # accuracy is shown in points
    assert float(norm(0.05 * factor)) - 0.5 == pytest.approx(0.5 - float(norm(-0.05 * factor)), abs=1e-9)
    cmap = fig.axes[0].images[0].get_cmap()
    distance = float(norm(0.05 * factor)) - 0.5
    assert distance > 0.001  # visible at all
    assert tuple(worse) == pytest.approx(cmap(0.5 + distance)) and tuple(better) == pytest.approx(cmap(0.5 - distance))
    assert luminance(worse) == pytest.approx(luminance(better), abs=0.05) and luminance(zero) > luminance(worse)
    assert worse[0] > worse[2] + 0.05  # worse is warm (red)...
    assert better[2] > better[0] + 0.05  # ...an improvement is cool, not the "safe" colour of zero
    plt.close(fig)


def test_heatmap_text_contrasts_with_its_cell_and_uses_one_format():
    profile = make_profile(["a", "b", "c", "d"], lambda i, x: 0.3 * i * x ** 3)  # pale to dark red cells
    fig = heatmap_figure(profile)
    colors = cell_colors(fig)
    texts = fig.axes[0].texts
    assert len(texts) == 4 * len(LEVELS)
    for text in texts:
        j, i = (round(v) for v in text.get_position())
        dark, light = sorted((luminance(colors[i][j]), luminance(matplotlib.colors.to_rgba(text.get_color()))))
        assert (light + 0.05) / (dark + 0.05) >= 4.5, text.get_text()  # WCAG AA contrast
    shown = {t.get_text() for t in texts}
    assert "46.1" in shown and "0" in shown  # 0.3 * 3 * 0.8**3 = 0.461 accuracy = 46.1 points; exact zero as 0
    assert all(re.fullmatch(r"-?\d+\.\d|0", s) for s in shown), shown  # one decimal for all, no 1e-05 notation
    plt.close(fig)


def test_heatmap_of_200_targets_labels_every_row_and_prints_no_values():
    names = [f"blocks.{i}.mlp.fc{k}" for i in range(100) for k in (1, 2)]
    fig = heatmap_figure(make_profile(names, lambda i, x: 0.001 * (i % 7) * x))
    ax = fig.axes[0]
    labels = ax.get_yticklabels()
    assert [t.get_text() for t in labels] == names
    assert min(t.get_fontsize() for t in labels) >= 6  # readable when zoomed, not a grey smear
    assert not ax.texts and "values not printed" in ax.get_title()
    row_points = fig.get_figheight() * 72 * ax.get_position().height / len(names)
    assert row_points >= labels[0].get_fontsize()  # labels do not overlap
    plt.close(fig)


# ---- words ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("granularity", "metric", "kind", "provenance", "axis", "quantity"), [
    ("weight", "accuracy", "measured", None, "weight sparsity", "accuracy drop (points)"),
    ("channel", "perplexity", "measured", None, "channels removed", "perplexity rise"),
    ("head", "kl", "measured", None, "heads removed", "KL to dense (nats)"),
    ("neuron", "loss", "estimated", {"score": "taylor", "units": "predicted change of loss"}, "neurons removed",
     "estimated loss rise (nats)"),
    ("weight", "accuracy", "estimated", {"score": "fisher", "units": "score (rank only; drop = the score)"},
     "weight sparsity", "estimated fisher score"),
])
def test_words_match_granularity_kind_and_metric(granularity, metric, kind, provenance, axis, quantity):
    profile = make_profile(["a", "b"], lambda i, x: 0.01 * x, metric=metric, higher_is_better=metric == "accuracy",
                           granularity=granularity, kind=kind, provenance=provenance)
    heat, curves = heatmap_figure(profile), sensitivity_figure(profile)
    assert axis in heat.axes[0].get_xlabel() and axis in curves.axes[0].get_xlabel()
    assert quantity in heat.axes[1].get_ylabel().replace("\n", " ")  # the colour bar
    assert quantity in curves.axes[0].get_ylabel() and quantity in curves.axes[0].get_title()
    assert quantity in profile_table(profile, width=80).title
    if granularity != "weight":
        assert "weight" not in heat.axes[0].get_xlabel()
    plt.close("all")


def test_a_block_profile_is_drawn_as_bars_of_whole_blocks():
    profile = make_profile([f"model.layers.{i}" for i in range(6)], lambda i, x: 0.1 * i, levels=("1",),
                           granularity="block", metric="perplexity", higher_is_better=False)
    fig = sensitivity_figure(profile)
    ax = fig.axes[0]
    assert "block is removed whole" in ax.get_title() and len(ax.patches) == 6
    assert [round(p.get_width(), 6) for p in ax.patches] == [round(0.1 * i, 6) for i in range(6)]
    plt.close(fig)


# ---- curves --------------------------------------------------------------------------------------


def _overlap(a, b) -> float:
    """Area shared by two display-space boxes (0 when they are apart)."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


@pytest.mark.parametrize("count", [4, 24])
def test_curves_legend_sits_outside_the_data_area(count):
    names = [f"layer{i}.conv" for i in range(count)]
    profile = make_profile(names, lambda i, x: 0.02 * (i + 1) * x)
    plan = ps.Plan({n: 0.5 for n in names}, {n: 10 for n in names})
    fig = sensitivity_figure(profile, plan)
    fig.canvas.draw()
    ax, legend = fig.axes[0], fig.axes[0].get_legend()
    renderer = fig.canvas.get_renderer()
    assert legend is not None
    assert _overlap(legend.get_window_extent(renderer), ax.get_window_extent(renderer)) == 0
    plt.close(fig)


def test_curves_highlight_the_most_sensitive_with_intervals_and_plan_marks():
    names = [f"encoder.layer.{i}.dense" for i in range(24)]
    sensitivity = [(7 * i) % 24 for i in range(24)]  # a shuffled order of sensitivity
    profile = make_profile(names, lambda i, x: 0.01 * sensitivity[i] * x)
    plan = ps.Plan({n: 0.4 for n in names}, {n: 10 for n in names})
    fig = sensitivity_figure(profile, plan)
    ax = fig.axes[0]
    labelled = [t.get_text() for t in ax.get_legend().get_texts()]
    top = sorted(range(24), key=lambda i: -sensitivity[i])[:HIGHLIGHT]
    assert labelled[:HIGHLIGHT] == [names[i] for i in top]
    assert labelled[HIGHLIGHT] == f"{24 - HIGHLIGHT} other layers"
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1 and line.get_label() in labelled]
    styles = {(matplotlib.colors.to_hex(line.get_color()), line.get_marker()) for line in lines}
    assert len(styles) == HIGHLIGHT  # each highlighted line has its own colour and marker
    assert len(ax.collections) == HIGHLIGHT  # an interval band per highlighted line
    stars = [line for line in ax.get_lines() if line.get_marker() == "*" and len(line.get_xdata()) == 1]
    assert len(stars) == 24 and all(line.get_xdata()[0] == 0.4 for line in stars)
    plt.close(fig)


# ---- tables --------------------------------------------------------------------------------------


def _render(renderable, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), force_terminal=False, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _unique_tail(name: str, names: list[str]) -> str:
    """The shortest dotted tail of ``name`` that no other name ends with."""
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        tail = ".".join(parts[-k:])
        if not any(other != name and (other == tail or other.endswith("." + tail)) for other in names):
            return tail
    return name


@pytest.mark.parametrize(("names", "levels"), [
    (LLM_NAMES, tuple(f"0.{i}" for i in range(1, 10))),
    ([f"layer{i // 4 + 1}.{i % 2}.{'downsample.0' if i % 4 == 3 else 'conv' + str(i % 3)}" for i in range(20)], LEVELS),
    ([f"vision_model.encoder.layers.{i}.self_attn.out_proj" for i in range(12)] + ["text_model.final_layer_norm.proj"],
     ("0.1", "0.3", "0.5", "0.7", "0.9", "2:4")),
])
@pytest.mark.parametrize("metric", ["accuracy", "perplexity"])
def test_profile_table_fits_80_columns_and_keeps_each_targets_distinguishing_name(names, levels, metric, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    profile = make_profile(names, lambda i, x: 0.0123 * (i + 1) * x ** 4 * (1000 if i == 3 else 1), levels=levels,
                           metric=metric, higher_is_better=metric == "accuracy")
    for text in (_render(profile_table(profile)), _render(profile_table(profile, width=80), width=200)):
        lines = text.splitlines()
        assert max(map(len, lines)) <= 80
        rows = [line for line in lines if re.match(r"\S+\s+\d[\d.]*[kMG]?\s+-?[\d.]+(\s|$)", line)]
        assert len(rows) == min(len(names), 40)  # one line per target: nothing wrapped
        for name, row in zip(names, rows, strict=False):
            shown = row.split()[0]
            tail = _unique_tail(name, names)
            assert tail in shown, (name, shown)
            assert "…" not in "".join(row.split()[1:])  # no number cut short
    assert Console(file=io.StringIO()).width == 80  # what a non-tty console at COLUMNS=80 gets


def test_short_names_keep_the_distinguishing_tail_when_it_fits():
    assert tail_width(LLM_NAMES) == len("…10.self_attn.q_proj")
    for width in (6, 12, 16, 20, 24, 40):
        short = short_names(LLM_NAMES, width)
        assert all(len(s) <= width for s in short.values())
        if width >= tail_width(LLM_NAMES):
            assert len(set(short.values())) == len(LLM_NAMES)
            assert all(_unique_tail(n, LLM_NAMES) in short[n] for n in LLM_NAMES)
    short = short_names(LLM_NAMES, 20)
    assert short["model.layers.11.self_attn.q_proj"] == "11.self_attn.q_proj"  # the shared prefix goes first
    assert short["model.layers.11.mlp.down_proj"] == "11.mlp.down_proj"


def test_plan_table_fits_80_columns_with_long_names():
    names = [f"model.decoder.layers.{i}.encoder_attn.k_proj_with_a_very_long_suffix_name" for i in range(12)]
    plan = ps.Plan({n: 0.25 + 0.05 * i for i, n in enumerate(names)}, {n: 4_194_304 for n in names}, method="threshold")
    text = _render(plan_table(plan))
    assert max(map(len, text.splitlines())) <= 80
    for i in range(12):
        assert re.search(rf"\b{i}\.encoder_attn\S*\s+4\.19M\s+{0.25 + 0.05 * i:.3f}", text), i


# ---- CSV -----------------------------------------------------------------------------------------


def test_profile_csv_is_a_plain_table_pandas_reads(tmp_path):
    pd = pytest.importorskip("pandas")
    profile = make_profile(["features.0", "odd,name \"quoted\"", "classifier.1"], lambda i, x: 0.1 * i * x,
                           levels=("0.5", "2:4"), provenance={"samples": 64, "note": "ünïcode\nnewline"})
    cells = list(profile.cells)
    cells[0] = ps.Cell(cells[0].target, cells[0].level, 0.5, math.inf, math.inf, None, None, 1, 0.1)
    profile.cells = cells
    path = profile.save(tmp_path / "profile.csv")
    frame = pd.read_csv(path)
    assert list(frame.columns[:6]) == ["target", "level", "sparsity", "value", "change", "drop"]
    assert len(frame) == len(profile.cells)
    assert list(frame["target"]) == [c.target for c in profile.cells] and list(frame["level"]) == [c.level for c in profile.cells]
    for column in ("sparsity", "value", "change", "drop", "ci_low", "ci_high", "samples", "params", "dense_value"):
        assert pd.api.types.is_numeric_dtype(frame[column]), column
    assert frame["drop"].tolist()[1:] == pytest.approx([profile.drop(c) for c in profile.cells[1:]])
    assert frame["value"][0] == math.inf and math.isnan(frame["ci_low"][0])
    assert frame["profile"].notna().tolist() == [True] + [False] * (len(frame) - 1)
    same = profile.to_dataframe()  # the CSV holds every column to_dataframe gives, with the same values
    pd.testing.assert_frame_equal(frame[list(same.columns)], same, check_dtype=False)
    assert ps.Profile.load(path) == profile


def test_profile_csv_that_is_not_ours_is_refused_in_one_line(tmp_path):
    profile = make_profile(["a"], lambda i, x: 0.1)
    good = profile.to_csv()
    broken = good.replace(",0.5,0.5,", ",0.5,half,", 1)
    cases = {"old.csv": "# prunescope-profile {}\ntarget,level\n", "other.csv": "a,b\n1,2\n", "broken.csv": broken,
             "headless.csv": good.splitlines()[0] + "\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ps.PrunescopeError) as error:
            ps.Profile.load(tmp_path / name)
        assert "\n" not in str(error.value), name
    with pytest.raises(ps.PrunescopeError, match="line 3, column 'sparsity'"):
        ps.Profile.from_csv(broken)
    with pytest.raises(ps.PrunescopeError, match="without cells"):
        ps.Profile(**{**profile.__dict__, "cells": []}).save(tmp_path / "empty.csv")
    assert not (tmp_path / "empty.csv").exists()


def test_write_report_writes_both_pictures(tmp_path):
    profile = make_profile([f"layer{i}" for i in range(3)], lambda i, x: 0.01 * i * x)
    written = write_report(profile, tmp_path / "report")
    assert [p.name for p in written] == ["sensitivity.png", "heatmap.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
