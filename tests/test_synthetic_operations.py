"""The synthetic hospitals as operations (synthetic/operations.py): capacity, boarding, arrival patterns, discharge
timing, and the scenario ground truth re-simulated with common random numbers.

Everything about capacity is checked from the FHIR export itself (Encounter.location periods), the way the hospital
twin reads it after the ETL, with the ground truth only naming who boarded and when they asked for a bed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from scipy.stats import chisquare

from synthetic import SynthConfig
from synthetic.config import BUILTIN_PROFILES, OperationsProfile, SiteProfile, WardCapacity
from synthetic.ground_truth import SiteGroundTruth
from synthetic.operations import DAY, HOUR, WARD_NAMES, SiteOperations
from synthetic.site import generate_site

OPS = OperationsProfile(
    ward=WardCapacity(beds=3, night_staffed_share=0.67),  # 2 staffed at night
    icu=WardCapacity(beds=1),
    elective_share=0.2,
    truth_replicates=8,
)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _local(instant: str) -> float:
    """A FHIR dateTime of the export as local wall-clock seconds (the site's offset dropped, as the generator)."""
    return (dt.datetime.fromisoformat(instant[:19]) - dt.datetime(1970, 1, 1)).total_seconds()


def _lines(folder: Path, resource: str) -> list[dict]:
    path = folder / "fhir" / f"{resource}.ndjson"
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # an injected malformed-JSON defect
    return [r for r in out if isinstance(r, dict) and r.get("resourceType") == resource]


class Export:
    """One generated site with operations: its encounters' bed segments, its ground truth, its simulation."""

    def __init__(self, root: Path, site_id: str, ops: SiteOperations) -> None:
        folder = root / site_id
        self.truth = orjson.loads((root / "ground-truth" / f"{site_id}.json").read_bytes())
        self.ops_truth = self.truth["operations"]
        self.sim = ops
        kinds = {}
        for location in _lines(folder, "Location"):
            kinds[location["id"]] = {"ER": "emergency", "HU": "ward", "ICU": "icu", "GIM": "clinic"}[
                location["type"][0]["coding"][0]["code"]
            ]
        self.export_time = _local(self.truth["export_date"] + "T00:00:00")
        self.encounters = {}
        for e in _lines(folder, "Encounter"):
            if e["class"]["code"] != "IMP" or "location" not in e:
                continue
            segments = []
            for entry in e["location"]:
                where = kinds[entry["location"]["reference"].split("/")[1]]
                period = entry["period"]
                end = _local(period["end"]) if "end" in period else self.export_time
                segments.append((where, _local(period["start"]), end))
            source = e["hospitalization"]["admitSource"]["coding"][0]["code"]
            self.encounters[e["id"]] = {"start": _local(e["period"]["start"]), "segments": segments, "source": source}
        self.beds = {ward: [] for ward in WARD_NAMES}
        for encounter in self.encounters.values():
            for where, start, end in encounter["segments"]:
                if where in self.beds:
                    self.beds[where].append((start, end))
        self.staffed = {w: self.ops_truth["wards"][w]["staffed_by_hour"] for w in WARD_NAMES}

    def occupied(self, ward: str, t: float) -> int:
        return sum(1 for start, end in self.beds[ward] if start <= t < end)

    def capacity(self, ward: str, t: float) -> int:
        return self.staffed[ward][int((t % DAY) // HOUR)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Export:
    root = tmp_path_factory.mktemp("ops")
    profile = BUILTIN_PROFILES[0].model_copy(update={"operations": OPS})
    config = SynthConfig(sites=1, patients_per_site=900, seed=11, history_years=1.5, profiles=[profile])
    captured: list[SiteOperations] = []
    original = SiteOperations.of

    def capture(*args):
        made = original(*args)
        captured.append(made)
        return made

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SiteOperations, "of", staticmethod(capture))
        generate_site(profile, config, 0, root)
    return Export(root, profile.site_id, captured[0])


def test_without_operations_the_export_is_unchanged(tmp_path):
    """No operations block: the operations code never runs and every file is the same as before it existed."""
    config = SynthConfig(sites=1, patients_per_site=40, seed=5, history_years=1.0)
    absent = BUILTIN_PROFILES[1]
    explicit = SiteProfile.model_validate(
        {**absent.model_dump(mode="json", exclude={"operations"}), "operations": None}
    )
    generate_site(absent, config, 0, tmp_path / "absent")
    generate_site(explicit, config, 0, tmp_path / "explicit")
    with pytest.MonkeyPatch.context() as patch:  # the hooks bypassed altogether: the pre-operations code path
        patch.setattr(SiteOperations, "of", staticmethod(lambda *a: None))
        generate_site(absent, config, 0, tmp_path / "bypassed")
    digests = _digests(tmp_path / "absent")
    assert digests == _digests(tmp_path / "explicit") == _digests(tmp_path / "bypassed")
    truth = orjson.loads((tmp_path / "absent" / "ground-truth" / f"{absent.site_id}.json").read_bytes())
    assert "operations" not in truth and "operations" not in truth["profile"]
    # Pinned from the generator before operations existed (same settings): the FHIR export has not moved a byte.
    assert digests[f"{absent.site_id}/fhir/Encounter.ndjson"] == PINNED_ENCOUNTERS


PINNED_ENCOUNTERS = "fdc03ef6541fc5a6ad2c88602d117d90edd819bd7b846dcd0369c85c2ebda4d9"


def test_ward_beds_never_exceed_staffed_capacity_at_admission(site):
    for ward in WARD_NAMES:
        beds = site.ops_truth["wards"][ward]["beds"]
        entries = sorted(start for start, _ in site.beds[ward])
        assert entries, ward
        for t in entries:
            count = site.occupied(ward, t)
            assert count <= site.capacity(ward, t), (ward, t)  # who takes a bed finds a staffed one
            assert count <= beds
        ends = sorted(end for _, end in site.beds[ward] if end < site.export_time)
        assert max(site.occupied(ward, t - 1) for t in ends) <= beds  # never more patients than beds


def test_boarding_happens_only_when_the_ward_is_full(site):
    stays = {s["encounter_id"]: s for s in site.ops_truth["stays"]}
    boarded = [s for s in stays.values() if s["kind"] == "emergency" and s["boarding_hours"] > 0]
    assert len(boarded) >= 10, "the small wards must bind"
    for stay in boarded:
        encounter = site.encounters[stay["encounter_id"]]
        (first, _, ed_end), (target, bed_start, _) = encounter["segments"][:2]
        asked, got = _local(stay["first_bed_request"]), _local(stay["first_bed"])
        assert first == "emergency" and target in WARD_NAMES and ed_end == bed_start == got
        assert got - asked == pytest.approx(stay["boarding_hours"] * HOUR, abs=1)  # the ED segment's extra length
        for t in (asked, got - 1):  # full when they asked and until the bed freed
            assert site.occupied(target, t) >= site.capacity(target, t), (stay["encounter_id"], t)
    not_boarded = [
        s for s in stays.values() if s["kind"] == "emergency" and s["first_bed"] and s["boarding_hours"] == 0
    ]
    for stay in not_boarded[:200]:
        encounter = site.encounters[stay["encounter_id"]]
        target, bed_start, _ = encounter["segments"][1]
        assert site.occupied(target, bed_start - 1) < site.capacity(target, bed_start)  # a bed was free


def test_every_stay_is_accounted_for(site):
    summary = site.ops_truth["summary"]
    assert summary["stays_exported"] + len(site.ops_truth["dropped_stays"]) == summary["stays"]
    assert summary["stays_exported"] == len(site.truth["stays"]) == len(site.ops_truth["stays"])
    assert {s["encounter_id"] for s in site.ops_truth["stays"]} == set(site.encounters)
    model = SiteGroundTruth.model_validate(site.truth)  # the file round-trips through its model
    assert orjson.loads(orjson.dumps(model.model_dump(mode="json"))) == site.truth
    for stay in site.truth["stays"]:  # the truth's length of stay is the encounter's
        if not stay["censored"]:
            encounter = site.encounters[stay["encounter_id"]]
            last_end = encounter["segments"][-1][2]
            assert abs((last_end - encounter["start"]) / HOUR - stay["length_of_stay_hours"]) <= 0.5


def test_emergency_arrivals_follow_the_hour_of_day_pattern(site):
    hours = Counter(
        int((e["start"] % DAY) // HOUR) for e in site.encounters.values() if e["segments"][0][0] == "emergency"
    )
    weights = np.asarray(OPS.emergency_hour_weights)
    night, afternoon = slice(0, 6), slice(12, 18)
    observed = np.array([hours.get(h, 0) for h in range(24)], dtype=float)
    assert observed.sum() > 250
    expected_ratio = weights[night].sum() / weights[afternoon].sum()  # 0.27
    ratio = observed[night].sum() / observed[afternoon].sum()
    assert abs(ratio - expected_ratio) < 0.12, (ratio, expected_ratio)
    expected = weights / weights.sum() * observed.sum()
    assert chisquare(observed, expected).pvalue > 1e-3  # consistent with the configured pattern
    assert chisquare(observed).pvalue < 1e-4  # and not with arrivals spread evenly over the day
    share = np.asarray(site.ops_truth["arrivals"]["emergency"]["hour_of_day_share"])
    assert share == pytest.approx(weights / weights.sum(), abs=1e-5)


def test_electives_are_planned_on_weekday_mornings_and_go_straight_to_a_ward(site):
    electives = [s for s in site.ops_truth["stays"] if s["kind"] == "elective"]
    assert len(electives) > 20
    for stay in electives:
        planned = _local(stay["arrival"])
        weekday = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=planned)
        assert weekday.weekday() < 5 and OPS.elective_start_hour <= weekday.hour < OPS.elective_end_hour
        encounter = site.encounters[stay["encounter_id"]]
        assert encounter["source"] == "mp" and encounter["segments"][0][0] in WARD_NAMES
        if stay["boarding_hours"] == 0:  # not postponed: the encounter starts when planned
            assert encounter["start"] == planned
    emergencies = [e for e in site.encounters.values() if e["source"] == "emd"]
    assert all(e["segments"][0][0] == "emergency" for e in emergencies)


def test_discharges_cluster_in_the_discharge_window(site):
    alive = {s["encounter_id"] for s in site.truth["stays"] if s["died_in_hospital"] is False}
    hours = [int((site.encounters[e]["segments"][-1][2] % DAY) // HOUR) for e in alive]
    inside = sum(OPS.discharge_start_hour <= h < OPS.discharge_end_hour + 3 for h in hours)
    assert inside / len(hours) > 0.9  # ready inside the window: 0.5-2.5 h later; else the next window


def test_rerunning_the_baseline_reproduces_the_history_exactly(site):
    layer = site.sim.layer
    assert layer is not None
    again = layer.simulate().runs()
    first = site.sim.factual.runs()
    assert {k: r.segments for k, r in again.items()} == {k: r.segments for k, r in first.items()}
    start, end = layer.window()
    branched = layer._branch(start).clone().run(end).window(start, end)
    assert branched == site.ops_truth["baseline_window"]
    for scenario in site.ops_truth["scenarios"].values():
        for metric, value in scenario["factual"].items():
            assert value["baseline"] == pytest.approx(site.ops_truth["baseline_window"][metric], abs=1e-4)


def test_more_beds_reduce_boarding_and_fewer_staff_increase_it(site):
    scenarios = site.ops_truth["scenarios"]
    more = scenarios["plus_4_ward_beds"]
    assert more["factual"]["boarding_hours"]["effect"] <= 0
    expected = more["expected"]["metrics"]["boarding_hours"]
    assert expected["effect"] < 0 and expected["ci95"][1] < 0
    assert more["expected"]["replicates"] == OPS.truth_replicates
    fewer = scenarios["night_staffing_minus_15pct"]["expected"]["metrics"]["boarded"]
    assert fewer["effect"] >= 0
    busier = scenarios["emergency_arrivals_plus_20pct"]["expected"]["metrics"]["mean_midnight_census_all"]
    assert busier["effect"] > 0


def test_true_arrival_intensity_matches_the_history(site):
    """The ground truth's expected first admissions are the ones the history has, within Poisson noise."""
    for stream in ("emergency", "elective"):
        truth = site.ops_truth["arrivals"][stream]
        expected, seen = truth["expected_arrivals"], truth["arrivals"]
        assert abs(seen - expected) < 4 * np.sqrt(expected) + 5, (stream, seen, expected)
        assert len(truth["per_hour"]) == len(truth["day_factor"]) * 24


def test_profile_block_errors_name_the_field():
    with pytest.raises(ValueError, match="emergency_hour_weights needs 24"):
        OperationsProfile(emergency_hour_weights=(1.0,) * 23)
    with pytest.raises(ValueError, match="elective_end_hour must come after"):
        OperationsProfile(elective_start_hour=10, elective_end_hour=9)


def test_a_ward_too_small_for_the_sites_demand_is_refused_naming_it_and_its_load(tmp_path):
    from synthetic import generate_consortium
    from synthetic.operations import WardOverloaded

    tiny = OPS.model_copy(update={"ward": WardCapacity(beds=1)})
    profile = BUILTIN_PROFILES[0].model_copy(update={"operations": tiny})
    config = SynthConfig(sites=1, patients_per_site=600, seed=11, history_years=1.0, profiles=[profile])
    with pytest.raises(WardOverloaded, match=r"operations\.ward: 1 beds .* Give it about \d+ beds") as refused:
        generate_consortium(config, tmp_path / "out", workers=2)  # raised in a worker, it arrives whole
    assert refused.value.ward == "ward" and refused.value.load > 0.9 and refused.value.staffed_share == 1.0
