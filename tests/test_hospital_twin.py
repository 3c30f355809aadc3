"""The hospital twin on a hospital's OMOP database (issue 13): its history read as any OMOP has it, what
it learns as of a day, replications from that day's state, and scenarios with common random numbers."""

from __future__ import annotations

import datetime as dt
import sqlite3

import numpy as np
import pytest

from site_node.cohort.omop_source import OmopSource
from site_node.config import load_site_config
from site_node.hospital_twin.config import HospitalConfig
from site_node.hospital_twin.history import DAY_S, HospitalHistoryError, read_ward_stays
from site_node.hospital_twin.scenario import HospitalScenario, HospitalScenarioError, load_hospital_scenarios
from site_node.hospital_twin.twin import HospitalTwinError, learn, replication_model, run

HOSPITAL = {
    "wards": [
        {"name": "general", "beds": 14, "care_sites": ["HU"]},  # place-of-service source values of the export
        {"name": "icu", "beds": 5, "care_sites": ["ICU"]},
    ],
    "emergency_department": ["ER"],
}


@pytest.fixture(scope="module")
def omop(prepared_site):
    config = load_site_config(prepared_site / "site.yaml")
    return config.omop.url, config.omop.url.removeprefix("sqlite:///")


@pytest.fixture(scope="module")
def history(omop):
    with OmopSource.open(omop[0]) as source:
        return read_ward_stays(source, HospitalConfig.model_validate(HOSPITAL))


def test_every_ward_stay_of_the_database_is_read_and_the_running_ones_are_censored(history, omop):
    with sqlite3.connect(omop[1]) as db:
        by_site = dict(db.execute(
            "SELECT c.place_of_service_source_value, count(*) FROM visit_detail d JOIN care_site c "
            "ON c.care_site_id = d.care_site_id GROUP BY 1"
        ).fetchall())  # fmt: skip
        clinic = db.execute(
            "SELECT count(*) FROM visit_detail d JOIN care_site c ON c.care_site_id = d.care_site_id "
            "WHERE c.place_of_service_source_value NOT IN ('HU', 'ICU', 'ER')"
        ).fetchone()[0]
        open_inpatient = db.execute(
            "SELECT count(*) FROM visit_detail d JOIN care_site c ON c.care_site_id = d.care_site_id "
            "WHERE c.place_of_service_source_value IN ('HU', 'ICU') AND d.visit_detail_end_datetime IS NULL"
        ).fetchone()[0]
    stays = history.stays
    # a visit's consecutive rows in one ward are one stay; none of the generator's repeat a ward back to back
    assert (stays.ward == "general").sum() == by_site["HU"] and (stays.ward == "icu").sum() == by_site["ICU"]
    assert sum(history.unmatched_care_sites.values()) == clinic, "rows of no ward and no ED are counted, not lost"
    assert int((~stays.ended).sum()) == open_inpatient, "open at the export: still running"
    assert (stays.kind == "emergency").all(), "this generator admits through the emergency department only"
    assert (stays.end_s >= stays.start_s).all()


def test_a_care_site_the_database_lacks_is_named_with_the_ones_it_has(omop):
    wrong = {**HOSPITAL, "wards": [{"name": "general", "beds": 10, "care_sites": ["Ward 9"]}]}
    with OmopSource.open(omop[0]) as source, pytest.raises(HospitalHistoryError, match=r"Ward 9.*Medical Ward 3"):
        read_ward_stays(source, HospitalConfig.model_validate(wrong))


def _midnight_with_patients(history):
    """A past midnight with patients in both wards (for a backtest-like start)."""
    for day in range(int(history.data_end_s // DAY_S) - 30, int(history.data_end_s // DAY_S) - 400, -1):
        running = history.as_of(day * DAY_S).occupants(day * DAY_S)
        if set(running.ward) == {"general", "icu"}:
            return day * DAY_S, running
    raise AssertionError("no midnight with patients in both wards")


def test_the_twin_learns_from_the_history_as_it_stood_and_starts_from_who_was_in_bed(history):
    config = HospitalConfig.model_validate(HOSPITAL)
    at, running = _midnight_with_patients(history)
    plan = learn(history, config, at)
    seen = history.as_of(at)
    assert int((~seen.stays.ended).sum()) == len(running) and (seen.stays.end_s <= at).all(), "cut there, censored"
    assert sorted(o[0] for o in plan.occupants) == sorted(running.ward)
    assert all(elapsed > 0 for _, _, elapsed in plan.occupants)
    assert plan.history_days == at // DAY_S - int(history.stays.start_s.min() // DAY_S)
    assert ("general", "emergency") in plan.arrivals and plan.transfers["icu"].get("general", 0) > 0.3
    first = replication_model(plan, 10, seed=3)
    counts = {w.name: sum(o.ward == w.name for o in first.occupants) for w in first.wards}
    assert counts == running.ward.value_counts().to_dict()
    later = learn(history, config, at + 200 * DAY_S)
    assert later.arrivals[("general", "emergency")].arrivals > plan.arrivals[("general", "emergency")].arrivals


def test_more_occupants_than_the_site_file_gives_beds_is_refused(history):
    at, running = _midnight_with_patients(history)
    small = {**HOSPITAL, "wards": [{"name": "general", "beds": 1, "care_sites": ["HU"]}, HOSPITAL["wards"][1]]}
    if (running.ward == "general").sum() > 1:
        with pytest.raises(HospitalTwinError, match="correct `hospital: wards: beds`"):
            learn(history, HospitalConfig.model_validate(small), at)


def test_a_run_is_the_same_in_parallel_and_a_scenario_is_paired_with_the_baseline(history):
    config = HospitalConfig.model_validate(HOSPITAL)
    plan = learn(history, config, int(history.data_end_s // DAY_S) * DAY_S)
    fewer = HospitalScenario.model_validate(
        {"name": "beds closed", "changes": [{"change": "beds", "ward": "general", "beds": 2}]}
    )
    serial = run(plan, 14, 40, [fewer], seed=11, workers=1)
    parallel = run(plan, 14, 40, [fewer], seed=11, workers=2)
    assert np.array_equal(serial.baseline.census, parallel.baseline.census)
    assert np.array_equal(serial.scenarios["beds closed"].census, parallel.scenarios["beds closed"].census)
    effect = serial.effects["beds closed"]
    assert effect["boarding_hours"].mean > 0 and effect["boarding_hours"].interval()[0] > 0, "fewer beds: more waiting"
    day0 = serial.baseline.quantiles(serial.baseline.census)[:, 0, 2]
    assert day0.tolist() == [sum(o[0] == w for o in plan.occupants) for w in ("general", "icu")]
    assert serial.baseline.runs == 40 and serial.baseline.census.sum(axis=-1).max() == 40


def test_scenario_files_are_checked_against_the_hospital(tmp_path):
    config = HospitalConfig.model_validate(HOSPITAL)
    path = tmp_path / "scenario.yaml"
    path.write_text("name: wave\nchanges:\n  - {change: arrivals, factor: 1.2, from_day: 5, to_day: 3}\n")
    with pytest.raises(HospitalScenarioError, match="to_day"):
        load_hospital_scenarios(path, config)
    path.write_text("name: beds\nchanges:\n  - {change: beds, ward: maternity, beds: 4}\n")
    with pytest.raises(HospitalScenarioError, match="'maternity' is not one of the hospital's wards"):
        load_hospital_scenarios(path, config)
    path.write_text("name: x\nchanges:\n  - {change: teleport, ward: general}\n")
    with pytest.raises(HospitalScenarioError, match="scenario file is not valid"):
        load_hospital_scenarios(path, config)
    path.write_text(
        "scenarios:\n"
        "  - {name: nights, changes: [{change: staffing, start_hour: 22, end_hour: 7, factor: 0.85}]}\n"
        "  - {name: shorter, changes: [{change: length_of_stay, ward: general, factor: 0.9}]}\n"
    )
    nights, shorter = load_hospital_scenarios(path, config)
    shares = nights.staffed_share("general", (1.0,) * 24)
    assert shares[23] == shares[3] == pytest.approx(0.85) and shares[12] == 1.0
    assert shorter.stay_factor("general", "emergency") == pytest.approx(0.9) and shorter.stay_factor("icu", "x") == 1


def test_twinfed_twin_hospital_reports_baseline_and_scenario_and_audits_the_run(prepared_site, tmp_path):
    import json
    import subprocess

    import yaml

    from site_node.governance import Governance
    from site_node.hospital_twin.report import HospitalTwinReport
    from tests.process_helpers import TWINFED
    from tests.site_helpers import fresh_site

    site_file = fresh_site(prepared_site, tmp_path / "site")
    command = [TWINFED, "twin", "hospital", "-s", str(site_file), "--days", "7", "--runs", "30", "--workers", "1"]
    missing = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "no `hospital:` section" in missing.stdout + missing.stderr
    raw = yaml.safe_load(site_file.read_text())
    site_file.write_text(yaml.safe_dump({**raw, "hospital": HOSPITAL}), encoding="utf-8")
    scenario = tmp_path / "plus4.yaml"
    scenario.write_text("name: plus4\nchanges:\n  - {change: beds, ward: general, beds: 18}\n", encoding="utf-8")
    done = subprocess.run([*command, "--scenario", str(scenario), "--by", "bed manager"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Scenario minus baseline" in done.stdout and "kept at this site" in done.stdout
    folder = site_file.parent / "twins" / "hospital"
    (json_file,) = folder.glob("hospital-twin-*.json")
    report = HospitalTwinReport.model_validate(json.loads(json_file.read_text()))
    assert report.runs == 30 and report.days == 7 and [a.name for a in report.scenarios] == ["plus4"]
    assert [w.name for w in report.baseline.wards] == ["general", "icu"]
    assert report.scenarios[0].wards[0].beds == 18 and report.baseline.wards[0].beds == 14
    assert (json_file.stat().st_mode & 0o777) == 0o600 and json_file.with_suffix(".html").exists()
    governance = Governance.of_site(load_site_config(site_file))
    runs = [e for e in governance.audit.entries() if e.kind == "hospital-twin-run"]
    governance.close()
    assert len(runs) == 1 and runs[0].payload["by"] == "bed manager" and runs[0].payload["scenarios"] == ["plus4"]


def test_backtest_figures_on_a_hand_made_case():
    from types import SimpleNamespace

    from site_node.hospital_twin.backtest import compare
    from site_node.hospital_twin.twin import ArmSummary

    summary = ArmSummary(["ward"], days=3, top=10)
    for value in range(10):  # ten replications: midnight census 5 on day 0, then 0, 1, ..., 9 on days 1 and 2
        census = np.array([[5], [value], [value]])
        zeros = np.zeros((3, 1))
        summary.add(SimpleNamespace(midnight_census=census, peak_occupancy=census, hours_full=zeros, boarded=zeros,
                                    boarding_hours=zeros))  # fmt: skip
    # bands on days 1 and 2: 95% 0-9, 80% 0-8, median 4; what happened: 9 then 4 (day 0 is the start state)
    report = compare(summary, np.array([[5, 9, 4]]), beds=[10], start=dt.datetime(2025, 6, 1))
    (ward,) = report.wards
    assert ward.days == 2 and ward.coverage_80 == 0.5 and ward.coverage_95 == 1.0
    assert ward.census_mae_share_of_beds == pytest.approx((5 + 0) / 2 / 10)
    assert report.coverage_80 == 0.5 and ward.actual_census == [5, 9, 4]


def test_a_backtest_starts_from_the_past_state_and_counts_what_happened(history):
    from site_node.hospital_twin.backtest import actual_census

    at, running = _midnight_with_patients(history)
    real = actual_census(history, ["general", "icu"], at, 5)
    assert real[:, 0].tolist() == [int((running.ward == w).sum()) for w in ("general", "icu")]
    plan = learn(history, HospitalConfig.model_validate(HOSPITAL), at)
    result = run(plan, 5, 20, seed=1)
    assert result.baseline.quantiles(result.baseline.census)[:, 0, 2].tolist() == real[:, 0].tolist()


def test_twinfed_twin_hospital_backtests_a_past_month(prepared_site, tmp_path):
    import json
    import subprocess

    import yaml

    from site_node.hospital_twin.report import HospitalTwinReport
    from tests.process_helpers import TWINFED
    from tests.site_helpers import fresh_site

    site_file = fresh_site(prepared_site, tmp_path / "site")
    site_file.write_text(yaml.safe_dump({**yaml.safe_load(site_file.read_text()), "hospital": HOSPITAL}))
    command = [TWINFED, "twin", "hospital", "-s", str(site_file), "--days", "30", "--runs", "40", "--workers", "2"]
    both = subprocess.run([*command, "--backtest", "2025-09-01", "--start", "2025-09-01"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert both.returncode == 2 and "not both" in both.stdout + both.stderr
    late = subprocess.run([*command, "--backtest", "2025-12-20"], capture_output=True, text=True, timeout=300)
    assert late.returncode == 1 and "runs past the data's end" in late.stdout + late.stderr
    done = subprocess.run([*command, "--backtest", "2025-09-01"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Backtest from 2025-09-01" in done.stdout
    report = HospitalTwinReport.model_validate_json(
        (site_file.parent / "twins" / "hospital" / "hospital-twin-2025-09-01.json").read_text()
    )
    backtest = report.backtest
    assert backtest is not None and [w.ward for w in backtest.wards] == ["general", "icu"]
    assert all(len(w.actual_census) == 30 and w.days == 29 for w in backtest.wards)
    assert 0.0 <= backtest.coverage_80 <= backtest.coverage_95 <= 1.0
    assert json.loads(report.model_dump_json())["backtest"]["start"].startswith("2025-09-01")
