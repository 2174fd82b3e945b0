"""The words and numbers a report shows: the metric's rise in its own words, what a level removes,
one number format for a whole figure or table, and target names shortened to a width."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .profile import Cell, Profile

# metric -> (what its worsening is called, factor from the metric's units to the shown ones)
_RISE = {
    "accuracy": ("accuracy drop (points)", 100.0),
    "loss": ("loss rise (nats)", 1.0),
    "perplexity": ("perplexity rise", 1.0),
    "kl": ("KL to dense (nats)", 1.0),
    "cosine": ("cosine distance to dense", 1.0),
}
_UNIT = {"weight": "layer", "channel": "channel group", "head": "attention layer", "neuron": "MLP", "block": "block"}
_REMOVED = {
    "weight": "weight sparsity: fraction of the layer's weights removed",
    "channel": "fraction of the channel group's channels removed",
    "head": "fraction of the layer's attention heads removed",
    "neuron": "fraction of the MLP's neurons removed",
    "block": "block removed whole",
}


def is_score(profile: Profile) -> bool:
    """True for an estimated profile whose cells are rank-only scores, not metric values."""
    return profile.kind == "estimated" and str(profile.provenance.get("units", "")).startswith("score")


def estimate_note(profile: Profile) -> str:
    """For an estimated profile: the method and, when it was measured against a scan, its Spearman
    rank correlation with the measured drops (all cells, and the mean within a level); else ''."""
    if profile.kind != "estimated":
        return ""
    note = f"estimated by {profile.provenance.get('score', '?')}"
    agreement = profile.provenance.get("agreement")
    if agreement:
        note += (f"; Spearman vs measured scan {agreement['spearman']:.2f} over {agreement['cells']} cells "
                 f"({agreement['mean_per_level']:.2f} within a level)")
    return note


@dataclass(frozen=True)
class Quantity:
    """What a report shows per cell: the profile's drop (positive = worse) times ``factor``, named ``label``."""

    label: str
    factor: float

    def of(self, profile: Profile, cell: Cell) -> float:
        """The cell's shown value."""
        return self.factor * profile.drop(cell)

    def interval(self, profile: Profile, cell: Cell) -> tuple[float, float] | None:
        """The shown value's confidence interval (low, high), or None without one."""
        if cell.ci_low is None or cell.ci_high is None:
            return None
        sign = -1.0 if profile.higher_is_better else 1.0
        low, high = sorted((sign * cell.ci_low, sign * cell.ci_high))
        return self.factor * low, self.factor * high


def quantity(profile: Profile) -> Quantity:
    """The drop in the metric's own words: "accuracy drop (points)", "perplexity rise", "KL to dense
    (nats)", an "estimated ..." for estimated profiles, a method's score for rank-only estimates."""
    if is_score(profile):
        return Quantity(f"estimated {profile.provenance.get('score', '?')} score (higher = predicted worse)", 1.0)
    default = f"{profile.metric} {'drop' if profile.higher_is_better else 'rise'}"
    label, factor = _RISE.get(profile.metric, (default, 1.0))
    return Quantity(("estimated " if profile.kind == "estimated" else "") + label, factor)


def unit_noun(profile: Profile) -> str:
    """What one target is: "layer", "channel group", "attention layer", "MLP" or "block"."""
    return _UNIT.get(profile.granularity, "target")


def level_axis(profile: Profile) -> str:
    """What a level's fraction removes, with the criterion choosing what is removed."""
    return f"{_REMOVED.get(profile.granularity, 'fraction removed')} ({profile.criterion})"


@dataclass(frozen=True)
class Scale:
    """One number format for a figure or table: values shown divided by ``10**exponent`` with
    ``decimals`` digits, so the largest shows about three significant figures."""

    exponent: int = 0
    decimals: int = 2
    significant: bool = False
    """Each value with two significant figures of its own instead (a range too wide for one
    format), but never more than ``decimals`` digits after the point."""

    @property
    def suffix(self) -> str:
        """What to say about the multiplier ("" when there is none): "values in units of 1e-3"."""
        return f"values in units of 1e{self.exponent}" if self.exponent else ""

    def plain(self, value: float) -> float:
        """``value`` in the scale's units."""
        return value / 10.0**self.exponent

    def __call__(self, value: float) -> str:
        """``value`` as text: "0" for an exact zero, "inf"/"nan" spelled out."""
        if value == 0:
            return "0"
        if not math.isfinite(value):
            return "inf" if value > 0 else "-inf" if value < 0 else "nan"
        digits = self.decimals
        if self.significant:
            digits = 0 if abs(value) >= 100 else min(digits, 1 - math.floor(math.log10(abs(value))))
        text = f"{self.plain(value):.{max(digits, 0)}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text


def scale_for(values: Iterable[float], noise: float | None = None) -> Scale:
    """The format for ``values``: no multiplier for a largest magnitude in [0.1, 10000), else a power
    of 1000 that brings it into [1, 1000); two figures per value when the range is too wide for one
    format (when :func:`log_threshold` with ``noise`` finds one)."""
    values = list(values)
    largest = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    if largest == 0:
        return Scale(0, 2)
    threshold = log_threshold(values, noise)
    if threshold is not None:  # resolve values down to the threshold, no further
        return Scale(0, max(0, -math.floor(math.log10(threshold))), significant=True)
    exponent = 0 if 0.1 <= largest < 1e4 else 3 * math.floor(math.log10(largest) / 3)
    digits = math.floor(math.log10(largest / 10.0**exponent))  # 0 for 1.x, 1 for 12.x, -1 for 0.x
    return Scale(exponent, max(0, 2 - digits))


def dense_text(profile: Profile) -> str:
    """The dense model's metric as a person reads it: "accuracy 99.17%", "perplexity 12.3"; "" for
    a score or a distance to the dense model itself (kl, cosine: 0 by definition)."""
    if is_score(profile) or profile.metric in ("kl", "cosine"):
        return ""
    if profile.metric == "accuracy":
        return f"accuracy {profile.dense_value:.2%}"
    return f"{profile.metric} {profile.dense_value:.4g}"


def compact_count(count: int) -> str:
    """A parameter count in at most five characters: 288, 36.9k, 2.36M, 1.2G."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            value = count / size
            return f"{value:.3g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"
    return str(count)


def _unique_tail(parts: Sequence[str], tails: Counter) -> int:
    """Fewest trailing components of a dotted name no other name ends with (``tails`` counts every
    name's trailing component tuples)."""
    for k in range(1, len(parts) + 1):
        if tails[tuple(parts[-k:])] == 1:
            return k
    return len(parts)


def shared_prefix(names: Sequence[str]) -> str:
    """The leading dotted components every name shares and none ends at ("model.layers."), or ""."""
    split = [name.split(".") for name in names]
    if len(split) < 2:
        return ""
    count = 0
    while all(len(p) > count + 1 and p[count] == split[0][count] for p in split):
        count += 1
    return ".".join(split[0][:count]) + "." if count else ""


def tail_width(names: Sequence[str]) -> int:
    """Characters the longest distinguishing tail needs: with the shared prefix dropped, the
    fewest trailing components no other name ends with, plus one for a leading "…"."""
    prefix = shared_prefix(names)
    split = [name[len(prefix):].split(".") for name in names]
    tails = Counter(tuple(p[-k:]) for p in split for k in range(1, len(p) + 1))
    return max((len(".".join(p[-_unique_tail(p, tails):])) + 1 for p in split), default=1)


def short_names(names: Sequence[str], width: int) -> dict[str, str]:
    """Each name fitted to ``width`` characters, keeping its distinguishing tail. When any name is
    too long, the prefix all share (see :func:`shared_prefix`) goes first; then, from a name still
    too long, leading components give way to "…" ("…11.mlp.down_proj"), and when even the shortest
    tail no other name shares is too long, its middle does too ("…11.self_a…q_proj")."""
    if all(len(name) <= width for name in names):
        return {name: name for name in names}
    prefix = shared_prefix(names)
    split = {name: name[len(prefix):].split(".") for name in names}
    tails = Counter(tuple(p[-k:]) for p in split.values() for k in range(1, len(p) + 1))
    short = {}
    for name, parts in split.items():
        rest = ".".join(parts)
        if len(rest) <= width:
            short[name] = rest
            continue
        keep = _unique_tail(parts, tails)
        while keep < len(parts) and len(".".join(parts[-keep - 1:])) + 1 <= width:
            keep += 1
        tail = ".".join(parts[-keep:])
        if len(tail) + 1 <= width:
            short[name] = "…" + tail
        elif len(parts[-1]) + 4 <= width:
            short[name] = "…" + tail[: width - len(parts[-1]) - 2] + "…" + parts[-1]
        else:
            short[name] = "…" + rest[-(width - 1):]
    return short


def names_note(names: Sequence[str], short: dict[str, str]) -> str:
    """What a reader needs to know about ``short`` names: the prefix left out, the "…" cuts; or ""."""
    if all(short[name] == name for name in names):
        return ""
    prefix = shared_prefix(names)
    notes = [f"names without their shared prefix {prefix!r}"] if prefix else []
    if any("…" in short[name] for name in names):
        notes.append("… marks a cut name")
    return "; ".join(notes)


def context(profile: Profile) -> str:
    """How the cells were obtained: measured samples and interval level, or the estimate's note."""
    if profile.kind == "estimated":
        return estimate_note(profile)
    return f"measured on {profile.provenance.get('samples', '?')} samples, {profile.confidence:.0%} intervals"


def noise_level(profile: Profile) -> float | None:
    """Median interval half-width of the cells, in shown units; None without intervals."""
    shown = quantity(profile)
    halves = sorted(h for c in profile.cells if (iv := shown.interval(profile, c)) is not None
                    and math.isfinite(h := (iv[1] - iv[0]) / 2))
    return halves[len(halves) // 2] if halves else None


def log_threshold(values: Iterable[float], noise: float | None = None) -> float | None:
    """Where a zero-centred scale should turn logarithmic, or None for a linear one: at the
    ``noise`` level (else the median non-zero magnitude) when the largest magnitude exceeds 1000x
    it, so a few exploding cells do not flatten the rest."""
    magnitudes = sorted(abs(v) for v in values if math.isfinite(v) and v != 0)
    if not magnitudes:
        return None
    if noise is None or not noise > 0:
        noise = magnitudes[len(magnitudes) // 2]
    return noise if magnitudes[-1] > 1000 * noise else None


def symlog_ticks(threshold: float, largest: float) -> list[float]:
    """Zero and +-each power of ten from ``threshold`` up to ``largest``: ticks a reader can name."""
    first, last = math.ceil(math.log10(threshold)), math.floor(math.log10(largest))
    powers = [10.0**k for k in range(first, last + 1)]
    powers = powers[:: max(1, math.ceil(len(powers) / 4))]
    return [-p for p in reversed(powers)] + [0.0] + powers
