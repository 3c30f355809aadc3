"""The ground-truth file tells the truth about the export: each defect is where it says and nothing else
is broken; consent histories, stays and outcomes in the file match the FHIR records; the stated
probabilities are calibrated against what happened."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import orjson

from omop_etl.vocabulary import is_valid_loinc, is_valid_snomed
from synthetic.defects import MEASUREMENT_KEY_BY_LOINC, plausible_limits
from synthetic.ground_truth import expected_auroc, realized_auroc
from tests.fhir_export import TYPES, index, lines, resources, sites

REQUIRED = {
    "Encounter": ("status", "class"),
    "Observation": ("status", "code"),
    "Condition": ("subject",),
    "MedicationRequest": ("status", "intent", "subject"),
    "MedicationAdministration": ("status", "subject"),
    "Procedure": ("status", "subject"),
    "Consent": ("status", "scope", "category"),
}
DATE_FIELDS = ("effectiveDateTime", "onsetDateTime", "authoredOn", "performedDateTime", "recordedDate")


def _parse_date(value: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def _detect(record: dict, patients: dict[str, dt.date], export_date: dt.date) -> list[str]:
    """Every rule this record breaks, found by looking at the record alone (plus the patient list)."""
    found = []
    rtype = record["resourceType"]
    if any(field not in record for field in REQUIRED.get(rtype, ())):
        found.append("schema_violation")
    dates = [record[f] for f in DATE_FIELDS if f in record]
    period = record.get("period") or {}
    dates += [v for v in (period.get("start"), period.get("end")) if v]
    if any(_parse_date(v) is None for v in dates):
        found.append("invalid_date")
    subject = record.get("subject") or record.get("patient")
    patient_id = subject["reference"].split("/", 1)[1] if subject else None
    if subject and patient_id not in patients:
        found.append("dangling_reference")
    birth = patients.get(patient_id) if patient_id else None
    parsed = [d for d in (_parse_date(v) for v in dates) if d is not None]
    outside_life = any(d > export_date for d in parsed) or bool(birth and any(d < birth for d in parsed))
    ends_before_start = bool(period.get("end")) and len(parsed) == len(dates) and period["end"] < period["start"]
    if outside_life or ends_before_start:
        found.append("impossible_date")
    holder = record.get("code") or record.get("medicationCodeableConcept")
    if holder and rtype != "Consent":
        coding = holder["coding"][0]
        system, code = coding["system"], coding["code"]
        if (
            (system == "http://loinc.org" and not is_valid_loinc(code))
            or (system == "http://snomed.info/sct" and not is_valid_snomed(code))
            or (system.endswith("rxnorm") and not code.isdigit())
        ):
            found.append("invalid_code")
        quantity = record.get("valueQuantity") or (record.get("component") or [{}])[0].get("valueQuantity")
        key = "sbp" if "component" in record else MEASUREMENT_KEY_BY_LOINC.get(code)
        if quantity and key:
            low, high = plausible_limits(key, quantity["code"])
            if not low <= quantity["value"] <= high:
                found.append("implausible_value")
    return found


def test_the_defect_list_is_exactly_what_an_independent_check_finds(medium_consortium):
    for site_id, export_dir, truth in sites(medium_consortium):
        export_date = dt.date.fromisoformat(truth["export_date"])
        patients: dict[str, dt.date] = {}
        for _, line in lines(export_dir, "Patient"):
            record = orjson.loads(line)
            patients[record["id"]] = dt.date.fromisoformat(record["birthDate"])
        found: set[tuple[str, int, str]] = set()
        for resource_type in TYPES:
            seen: set[str] = set()
            for number, line in lines(export_dir, resource_type):
                key = (f"{resource_type}.ndjson", number)
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    found.add((*key, "malformed_json"))
                    continue
                if record["id"] in seen:
                    found.add((*key, "duplicate"))
                    continue
                seen.add(record["id"])
                problems = _detect(record, patients, export_date)
                assert len(problems) <= 1, f"{site_id} {key} breaks several rules: {problems}"
                found.update((*key, p) for p in problems)
        listed = {(d["file"], d["line"], d["kind"]) for d in truth["defects"]["records"]}
        assert found == listed, (
            f"{site_id}: not in ground truth {sorted(found - listed)[:5]}; not found {sorted(listed - found)[:5]}"
        )
        assert len(listed) == truth["defects"]["total"] > 0
        assert set(truth["defects"]["by_kind"]) == {
            "malformed_json",
            "schema_violation",
            "invalid_date",
            "impossible_date",
            "invalid_code",
            "dangling_reference",
            "duplicate",
            "implausible_value",
        }


def test_defect_rates_follow_the_site_profile(medium_consortium):
    for site_id, _, truth in sites(medium_consortium):
        rates = truth["profile"]["defects"]
        records = truth["defects"]["records_written"]
        observed = truth["defects"]["rate_per_record"]
        assert observed == round(truth["defects"]["total"] / records, 6)
        # Observations dominate the export and are eligible for every kind.
        ceiling = sum(rates.values())
        assert 0.3 * ceiling < observed <= ceiling * 1.3, (site_id, observed, ceiling)
    by_site = {s: t["defects"]["rate_per_record"] for s, _, t in sites(medium_consortium)}
    assert by_site["cedar-valley"] > 1.5 * by_site["aster-university"], "the rural site's exports are messier"


def test_consent_histories_in_the_export_match_the_ground_truth(medium_consortium):
    denying_total = patients_total = withdrawn_total = 0
    for site_id, export_dir, truth in sites(medium_consortium):
        export_consent: dict[str, list[dict]] = {}
        for record in resources(export_dir, "Consent"):
            assert record["scope"]["coding"][0]["code"] == "research"
            export_consent.setdefault(record["patient"]["reference"].split("/")[1], []).append(record)
        for patient in truth["patients"]:
            records = export_consent.get(patient["patient_id"], [])
            active_deny = [r for r in records if r["provision"]["type"] == "deny" and r["status"] == "active"]
            status = patient["consent"]
            if status in ("opt_out", "withdrawn"):
                assert len(active_deny) == 1, (site_id, patient["patient_id"], records)
                assert active_deny[0]["provision"]["period"]["start"] == patient["denies_research_from"]
            else:
                assert not active_deny and patient["denies_research_from"] is None
            if status == "withdrawn":
                earlier = [r for r in records if r["provision"]["type"] == "permit"]
                assert earlier and earlier[0]["status"] == "inactive"
                assert earlier[0]["provision"]["period"]["end"] == patient["denies_research_from"]
            if status == "none":
                assert not records
        denying = sum(p["consent"] in ("opt_out", "withdrawn") for p in truth["patients"])
        assert denying == truth["consent"]["denying_research"]
        denying_total += denying
        patients_total += len(truth["patients"])
        withdrawn_total += truth["consent"]["withdrawn_later"]
    assert 0.025 <= denying_total / patients_total <= 0.055, "about 3-5% of patients deny research use"
    assert withdrawn_total > 0, "some patients withdraw a consent they gave earlier"


def test_stays_in_the_ground_truth_match_the_encounters_and_deaths_in_the_export(medium_consortium):
    for site_id, export_dir, truth in sites(medium_consortium):
        encounters = {r["id"]: r for r in resources(export_dir, "Encounter")}
        deceased = {r["id"] for r in resources(export_dir, "Patient") if "deceasedDateTime" in r}
        broken = {d["resource_id"] for d in truth["defects"]["records"] if d["kind"] != "duplicate"}
        checked = 0
        for stay in truth["stays"]:
            if stay["encounter_id"] in broken:
                continue  # this encounter carries an injected defect; its truth is in the defect list
            encounter = encounters[stay["encounter_id"]]
            assert encounter["class"]["code"] == "IMP"
            assert encounter["subject"]["reference"] == f"Patient/{stay['patient_id']}"
            checked += 1
            if stay["censored"]:
                assert encounter["status"] == "in-progress"
                continue
            start = dt.datetime.fromisoformat(encounter["period"]["start"])
            end = dt.datetime.fromisoformat(encounter["period"]["end"])
            if end > start:
                assert round((end - start).total_seconds() / 3600) == stay["length_of_stay_hours"]
            disposition = encounter["hospitalization"]["dischargeDisposition"]["coding"][0]["code"]
            assert (disposition == "exp") == stay["died_in_hospital"]
            if stay["died_in_hospital"]:
                assert stay["patient_id"] in deceased
        assert checked > 0.95 * len(truth["stays"]), site_id


def _pooled(out, outcome: str) -> tuple[np.ndarray, np.ndarray]:
    probabilities, labels = [], []
    for _, _, truth in sites(out):
        export_end = dt.datetime.fromisoformat(truth["export_date"] + "T00:00:00")
        for s in truth["stays"]:
            if s["censored"]:
                continue
            if outcome == "readmission_30d":
                admitted = dt.datetime.fromisoformat(s["admitted"][:19])
                discharge = admitted + dt.timedelta(hours=s["length_of_stay_hours"])
                if s["died_in_hospital"] or discharge + dt.timedelta(days=30) >= export_end:
                    continue
                probabilities.append(s["p_readmission_30d"])
                labels.append(s["readmitted_within_30d"])
            elif s["alive_at_prediction_time"]:
                if outcome == "in_hospital_death":
                    probabilities.append(s["p_in_hospital_death"])
                    labels.append(s["died_in_hospital"])
                else:
                    probabilities.append(s["p_los_over_7_days"])
                    labels.append(s["length_of_stay_hours"] > 7 * 24)
    return np.asarray(probabilities, dtype=float), np.asarray(labels, dtype=bool)


def test_true_probabilities_are_calibrated_and_the_ceiling_is_consistent(medium_consortium):
    for outcome in ("in_hospital_death", "los_over_7_days", "readmission_30d"):
        p, y = _pooled(medium_consortium, outcome)
        assert p.size > 500, outcome
        standard_error = math.sqrt(float(np.sum(p * (1 - p)))) / p.size
        assert abs(p.mean() - y.mean()) < 4 * standard_error, (outcome, p.mean(), y.mean())
        ceiling = expected_auroc(p)
        assert 0.6 < ceiling < 0.99, (outcome, ceiling)
        assert abs(realized_auroc(p, y) - ceiling) < 0.08, outcome
    for _, _, truth in sites(medium_consortium):
        death = truth["outcomes"]["in_hospital_death"]
        assert death["events"] > 10 and 0.02 < death["observed_rate"] < 0.2
        # time to death within 90 days: one example per patient, every in-stay death of a first stay an event
        survival = truth["survival"]["death_within_90d"]
        first_stays = {s["patient_id"] for s in truth["stays"] if s["alive_at_prediction_time"]}
        assert survival["evaluable_stays"] == len(first_stays) and survival["horizon_days"] == 90
        assert death["events"] * 0.5 < survival["events"] <= survival["evaluable_stays"]
        assert 0.6 < survival["bayes_optimal_c_index"] < 0.99


def test_index_lists_every_site_with_its_files(medium_consortium):
    data = index(medium_consortium)
    assert [s["site_id"] for s in data["sites"]] == ["aster-university", "birchwood-general", "cedar-valley"]
    for site in data["sites"]:
        assert (medium_consortium / site["fhir_export"] / "manifest.json").is_file()
        assert (medium_consortium / site["ground_truth"]).is_file()
        assert not (medium_consortium / site["fhir_export"] / ".." / "ground-truth").exists()
