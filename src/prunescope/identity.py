"""ScanIdentity: the settings that decide a scan's cells, as one value.

The same value is written as a store's header (a resume refuses a store written for another
identity), as the entries of a profile's provenance, compared when shard profiles are merged,
and its removal settings (criterion, seed, round_to, head mode, SparseGPT's block size and
dampening) are carried into every Plan allocated from the profile, so ``apply`` removes what the
scan removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .profile import Profile

SPARSEGPT_OPTIONS = {"block_size": 128, "damp": 0.01}
"""The block size (columns per lazy update) and dampening (fraction of the mean diagonal of H) a
scan's SparseGPT cells use."""


@dataclass(frozen=True)
class ScanIdentity:
    """What a scan measured, and how its cells removed elements: equal identities, equal cells.

    ``model`` and ``data`` are SHA-256 fingerprints (of the state_dict and of the batches);
    ``levels`` are level keys; ``calibration`` is "evaluator batches" or the calibration batches'
    fingerprint (calibrated criteria); ``options`` are the criterion's own settings.
    """

    model: str
    data: str
    metric: str
    criterion: str
    granularity: str
    levels: tuple[str, ...]
    seed: int = 0
    confidence: float = 0.95
    round_to: int | None = None
    head_mode: str | None = None
    calibration: str | None = None
    mode: str = "exact"
    tolerance: float | None = None
    min_batches: int = 2
    shard: tuple[int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def store_header(self) -> dict[str, Any]:
        """The identity a store records; keys that keep their default are left out, so stores
        written before a setting existed still resume."""
        header = {"model": self.model, "data": self.data, "metric": self.metric, "criterion": self.criterion,
                  "seed": self.seed, "levels": list(self.levels), "granularity": self.granularity,
                  "confidence": self.confidence}
        optional = {"round_to": self.round_to or None, "calibration": self.calibration,
                    "head_mode": self.head_mode if self.granularity == "head" else None,
                    "shard": list(self.shard) if self.shard is not None else None,
                    "options": self.options if self.options and self.options != SPARSEGPT_OPTIONS else None}
        if self.mode != "exact":
            optional.update(mode=self.mode, tolerance=self.tolerance,
                            min_batches=self.min_batches if self.min_batches != 2 else None)
        return {**header, **{k: v for k, v in optional.items() if v is not None}}

    def provenance(self) -> dict[str, Any]:
        """The entries of a profile's provenance that record this identity."""
        entries = {"model_sha256": self.model, "data_sha256": self.data, "seed": self.seed, "round_to": self.round_to}
        optional = {"head_mode": self.head_mode, "calibration": self.calibration, "options": self.options or None,
                    "shard": list(self.shard) if self.shard is not None else None}
        if self.mode != "exact":
            optional.update(mode=self.mode, tolerance=self.tolerance, min_batches=self.min_batches)
        return {**entries, **{k: v for k, v in optional.items() if v is not None}}

    def removal(self) -> dict[str, Any]:
        """The settings that decide which elements a level removes, as a Plan carries them."""
        return {"seed": self.seed, "round_to": self.round_to, "head_mode": self.head_mode, "options": dict(self.options)}

    def without_shard(self) -> dict[str, Any]:
        """Every field but the shard: what the shards of one scan share."""
        return {k: v for k, v in asdict(self).items() if k != "shard"}

    @classmethod
    def of_profile(cls, profile: Profile) -> ScanIdentity:
        """The identity a profile's fields and provenance record (older profiles: defaults where absent)."""
        p = profile.provenance
        head_mode = p.get("head_mode")
        if head_mode is None and profile.granularity == "head":
            head_mode = "query" if any(t.kind == "head/query" for t in profile.targets) else "kv_group"
        shard = p.get("shard")
        return cls(model=p.get("model_sha256", ""), data=p.get("data_sha256", ""), metric=profile.metric,
                   criterion=profile.criterion, granularity=profile.granularity, levels=tuple(profile.levels),
                   seed=p.get("seed", 0), confidence=profile.confidence, round_to=p.get("round_to"),
                   head_mode=head_mode, calibration=p.get("calibration"), mode=p.get("mode", "exact"),
                   tolerance=p.get("tolerance"), min_batches=p.get("min_batches", 2),
                   shard=tuple(shard) if shard is not None else None, options=dict(p.get("options") or {}))
