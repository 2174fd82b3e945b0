"""Shards: one scan split across machines by target, and the shard profiles merged back into one.

``scan(..., shard=(i, n))`` measures targets ``i, i + n, i + 2n, ...`` of the target list (every
machine must build the same list: same model, same ``find_targets`` call). Each machine writes
its own store (whose identity records the shard) and profile; :func:`merge_profiles` checks that
the n profiles come from the same scan, one per shard, and interleaves them back into the
profile a single scan would have produced: same targets, same cells, same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import PrunescopeError
from .identity import ScanIdentity
from .profile import Profile
from .target import Target


def shard_targets(targets: list[Target], shard: tuple[int, int]) -> list[Target]:
    """Targets ``i, i + n, ...`` of ``targets`` for ``shard=(i, n)``; refuses an invalid or empty shard."""
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise PrunescopeError(f"shard must be a pair (index, count) with 0 <= index < count; got {shard!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, count)) or not 0 <= index < count:
        raise PrunescopeError(f"shard must be a pair (index, count) with 0 <= index < count; got {shard!r}")
    chosen = targets[index::count]
    if not chosen:
        raise PrunescopeError(f"shard {index} of {count} has no targets: there are only {len(targets)}; use fewer shards")
    return chosen


def _identity(profile: Profile) -> dict:
    """What every shard of one scan shares: its ScanIdentity but the shard, the kind and the data size."""
    return {**ScanIdentity.of_profile(profile).without_shard(), "kind": profile.kind,
            "higher_is_better": profile.higher_is_better,
            **{k: profile.provenance.get(k) for k in ("samples", "batches")}}


def merge_profiles(profiles: Sequence[Profile | str | Path]) -> Profile:
    """One profile from the shard profiles (or their files) of one scan, as if scanned in one go.

    Refuses profiles that are not shards, shards of different scans (naming the differing
    fields), and a missing or repeated shard. The merged profile keeps the first shard's dense
    value, costs and provenance, with ``provenance["merged_shards"] = n`` instead of ``"shard"``.
    """
    if isinstance(profiles, (str, Path, Profile)):
        raise PrunescopeError("merge_profiles takes a list of shard profiles (or their files), one per shard")
    loaded = [p if isinstance(p, Profile) else Profile.load(p) for p in profiles]
    if not loaded:
        raise PrunescopeError("merge_profiles needs the profiles of every shard; got none")
    shards = []
    for position, profile in enumerate(loaded):
        shard = profile.provenance.get("shard")
        if shard is None:
            raise PrunescopeError(f"profile {position} is not a shard (it has no provenance 'shard'); merge the "
                                  "profiles of scan(..., shard=(i, n)) for i = 0..n-1")
        shards.append(tuple(shard))
    count = shards[0][1]
    if any(n != count for _, n in shards):
        raise PrunescopeError(f"the profiles are shards of different splits: {sorted(set(shards))}")
    given = sorted(i for i, _ in shards)
    if given != list(range(count)):
        missing = sorted(set(range(count)) - set(given))
        repeated = sorted({i for i in given if given.count(i) > 1})
        raise PrunescopeError(f"merge needs each of the {count} shards once: "
                              + "; ".join(filter(None, [missing and f"missing {missing}", repeated and f"repeated {repeated}"])))
    by_index = dict(zip((i for i, _ in shards), loaded, strict=True))
    first = _identity(by_index[0])
    for index in range(1, count):
        other = _identity(by_index[index])
        different = [k for k in first if first[k] != other[k]]
        if different:
            raise PrunescopeError(f"shard {index} comes from a different scan than shard 0: its {', '.join(different)} "
                                  "differ; refusing to merge")
    total = sum(len(p.targets) for p in loaded)
    sizes, expected = [len(by_index[i].targets) for i in range(count)], [len(range(i, total, count)) for i in range(count)]
    if sizes != expected:
        raise PrunescopeError(f"the shards hold {sizes} targets; the {count} shards of one scan of {total} targets hold {expected}")
    targets = [by_index[k % count].targets[k // count] for k in range(total)]
    cells_of = {}
    for profile in loaded:
        for cell in profile.cells:
            cells_of.setdefault(cell.target, []).append(cell)
    base = by_index[0]
    provenance = {k: v for k, v in base.provenance.items() if k != "shard"}
    provenance["merged_shards"] = count
    dense_values = [by_index[i].dense_value for i in range(count)]
    if len(set(dense_values)) > 1:
        provenance["shard_dense_values"] = dense_values
    return Profile(metric=base.metric, higher_is_better=base.higher_is_better, dense_value=base.dense_value,
                   criterion=base.criterion, granularity=base.granularity, levels=list(base.levels), targets=targets,
                   cells=[c for t in targets for c in cells_of.get(t.name, [])], kind=base.kind,
                   confidence=base.confidence, provenance=provenance, costs=base.costs)
