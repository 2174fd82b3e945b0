"""Profiles and plans survive JSON and CSV round trips exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest

import prunescope as ps


def test_scanned_profile_has_what_allocation_needs(digits_profile):
    profile = digits_profile
    assert profile.metric == "loss" and profile.higher_is_better is False and profile.kind == "measured"
    assert len(profile.cells) == len(profile.targets) * len(profile.levels)
    assert all(t.flops and t.flops > 0 for t in profile.targets)  # measured on the first batch
    assert profile.provenance["samples"] == 360 and len(profile.provenance["model_sha256"]) == 64


def test_profile_json_round_trip(digits_profile, tmp_path):
    assert ps.Profile.from_json(digits_profile.to_json()) == digits_profile
    path = digits_profile.save(tmp_path / "profile.json")
    assert ps.Profile.load(path) == digits_profile
    json.loads(path.read_text())  # plain JSON a user can read without this library


def test_profile_csv_round_trip(digits_profile, tmp_path):
    assert ps.Profile.from_csv(digits_profile.to_csv()) == digits_profile
    path = digits_profile.save(tmp_path / "profile.csv")
    assert path.read_text().startswith("target,level,")  # a plain table: the header is the first line
    assert ps.Profile.load(path) == digits_profile


def _awkward_profile(digits_profile: ps.Profile) -> ps.Profile:
    """Missing CIs, an N:M level, a target without cells or FLOPs, inf and awkward floats."""
    targets = list(digits_profile.targets)
    unmeasured = dataclasses.replace(targets[0], name="extra,layer", flops=None)
    cells = [c for c in digits_profile.cells if c.target != targets[1].name]
    first = cells[0]
    cells[0] = dataclasses.replace(first, ci_low=None, ci_high=None, samples=1, value=0.1 + 0.2, change=-1e-300)
    cells[1] = dataclasses.replace(cells[1], value=float("inf"), change=float("inf"), ci_low=-0.0, ci_high=1 / 3)
    cells.append(ps.Cell(targets[2].name, "2:4", 0.5, 1.2345678901234567, 0.25, 0.1, 0.4, 360, 0.01))
    return dataclasses.replace(
        digits_profile, targets=[*targets, unmeasured], cells=cells, levels=[*digits_profile.levels, "2:4"],
        provenance={**digits_profile.provenance, "note": "ünïcode, \"quotes\"\nnewline"},
    )


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_awkward_profile_round_trips(digits_profile, tmp_path, suffix):
    profile = _awkward_profile(digits_profile)
    loaded = ps.Profile.load(profile.save(tmp_path / f"profile{suffix}"))
    assert loaded == profile
    assert loaded.cells[0].ci_low is None
    assert loaded.target("extra,layer").flops is None
    assert [t.name for t in loaded.targets] == [t.name for t in profile.targets]  # order kept


def test_profile_to_dataframe(digits_profile):
    frame = digits_profile.to_dataframe()
    assert len(frame) == len(digits_profile.cells)
    assert (frame["drop"] == frame["change"]).all()  # loss: worse is higher


def test_plan_json_round_trip(digits_profile, tmp_path):
    plans = [
        ps.allocate(digits_profile, 0.6, method="threshold"),
        ps.Plan({"a": 0.5, "b": "2:4", "c": 0}, {"a": 10, "b": 8, "c": 4}, criterion="random"),
    ]
    for plan in plans:
        assert ps.Plan.from_json(plan.to_json()) == plan
        assert ps.Plan.load(plan.save(tmp_path / "plan.json")) == plan
    assert plans[1].sparsity == pytest.approx((5 + 4) / 22)


def test_loading_the_wrong_file_is_refused(digits_profile, tmp_path):
    plan_path = ps.allocate(digits_profile, 0.5, method="uniform").save(tmp_path / "plan.json")
    with pytest.raises(ps.PrunescopeError, match="not a prunescope profile"):
        ps.Profile.load(plan_path)
    with pytest.raises(ps.PrunescopeError, match="not a prunescope plan"):
        ps.Plan.load(digits_profile.save(tmp_path / "profile.json"))
    with pytest.raises(ps.PrunescopeError, match="does not exist"):
        ps.Profile.load(tmp_path / "missing.json")


def test_save_is_atomic_and_leaves_no_temporary_files(digits_profile, tmp_path):
    digits_profile.save(tmp_path / "p.json")
    digits_profile.save(tmp_path / "p.json")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
