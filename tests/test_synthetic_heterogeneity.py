"""The hospitals differ the way real ones do (non-IID), visibly in their FHIR exports."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import numpy as np

from tests.fhir_export import resources, sites


def _by_site(out):
    return {site_id: (export_dir, truth) for site_id, export_dir, truth in sites(out)}


def _units(export_dir, loinc: str) -> Counter:
    return Counter(
        r["valueQuantity"]["code"]
        for r in resources(export_dir, "Observation")
        if r["code"]["coding"][0]["code"] == loinc and "valueQuantity" in r
    )


def test_one_site_reports_glucose_in_mmol_per_litre_and_the_others_in_mg_per_decilitre(medium_consortium):
    by_site = _by_site(medium_consortium)
    european = _units(by_site["birchwood-general"][0], "2345-7")
    assert set(european) == {"mmol/L"} and sum(european.values()) > 500
    for site_id in ("aster-university", "cedar-valley"):
        assert set(_units(by_site[site_id][0], "2345-7")) == {"mg/dL"}, site_id
    values = [
        r["valueQuantity"]["value"]
        for r in resources(by_site["birchwood-general"][0], "Observation")
        if r["code"]["coding"][0]["code"] == "2345-7" and "valueQuantity" in r
    ]
    assert 4 < np.median(values) < 15, "mmol/L values, not mg/dL numbers with a different label"


def test_units_and_coding_habits_differ_between_sites(medium_consortium):
    by_site = _by_site(medium_consortium)
    assert set(_units(by_site["birchwood-general"][0], "2160-0")) == {"umol/L"}
    assert set(_units(by_site["cedar-valley"][0], "8310-5")) == {"[degF]"}
    assert set(_units(by_site["aster-university"][0], "8310-5")) == {"Cel"}

    def condition_codes(site_id):
        records = resources(by_site[site_id][0], "Condition")
        return Counter(r["code"]["coding"][0]["code"] for r in records if "code" in r)

    # The careful coder uses "Essential hypertension", the hurried one "Hypertensive disorder".
    assert condition_codes("aster-university")["59621000"] > 0 and condition_codes("aster-university")["38341003"] == 0
    assert condition_codes("cedar-valley")["38341003"] > 0 and condition_codes("cedar-valley")["59621000"] == 0

    def drug_classes(site_id):
        records = resources(by_site[site_id][0], "MedicationRequest")
        return Counter(r["medicationCodeableConcept"]["coding"][0]["code"] for r in records)

    assert drug_classes("birchwood-general")["860975"] > 0, "the clinical-drug site sends metformin 500 MG ER tablets"
    assert drug_classes("aster-university")["860975"] == 0 and drug_classes("aster-university")["6809"] > 0


def test_sites_differ_in_age_case_mix_measurement_and_missingness(medium_consortium):
    by_site = _by_site(medium_consortium)
    export_date = dt.date(2026, 1, 1)

    def mean_age(site_id):
        births = [dt.date.fromisoformat(r["birthDate"]) for r in resources(by_site[site_id][0], "Patient")]
        return np.mean([(export_date - b).days / 365.25 for b in births])

    assert mean_age("cedar-valley") - mean_age("birchwood-general") > 8
    mixes = {s: Counter(st["reason"] for st in t["stays"]) for s, (_, t) in by_site.items()}
    assert mixes["aster-university"]["sepsis"] / sum(mixes["aster-university"].values()) > 0.2
    assert mixes["cedar-valley"]["heart_failure"] > mixes["cedar-valley"]["acute_mi"]

    def heart_rate_missing(site_id):
        return by_site[site_id][1]["missingness"]["heart_rate"]["missing_rate"]

    assert heart_rate_missing("cedar-valley") > 0.25 > 0.1 > heart_rate_missing("aster-university")

    def vitals_per_stay_day(site_id):
        export_dir, truth = by_site[site_id]
        rates = sum(1 for r in resources(export_dir, "Observation") if r["code"]["coding"][0]["code"] == "8867-4")
        days = sum((s["length_of_stay_hours"] or 0) for s in truth["stays"]) / 24
        return rates / days

    assert vitals_per_stay_day("aster-university") > 1.8 * vitals_per_stay_day("cedar-valley")


def test_race_is_recorded_at_us_sites_and_not_at_the_european_one(medium_consortium):
    by_site = _by_site(medium_consortium)
    for site_id, expected in (("aster-university", True), ("birchwood-general", False), ("cedar-valley", True)):
        patients = list(resources(by_site[site_id][0], "Patient"))
        with_race = sum(1 for p in patients if any("us-core-race" in e["url"] for e in p.get("extension", [])))
        assert (with_race == len(patients)) if expected else (with_race == 0), site_id


def test_missingness_is_informative(medium_consortium):
    """Sicker patients are measured more often: lactate is recorded mostly when it is high."""
    for site_id, (export_dir, truth) in _by_site(medium_consortium).items():
        lactate = [
            r["valueQuantity"]["value"]
            for r in resources(export_dir, "Observation")
            if r["code"]["coding"][0]["code"] == "32693-4" and "valueQuantity" in r
        ]
        died = {s["patient_id"] for s in truth["stays"] if s["died_in_hospital"]}
        survived = {s["patient_id"] for s in truth["stays"]} - died
        assert lactate and np.median(lactate) > 1.0, site_id
        measured_per_patient = Counter(
            r["subject"]["reference"].split("/")[1]
            for r in resources(export_dir, "Observation")
            if "subject" in r and r["code"]["coding"][0]["code"] == "32693-4"
        )
        # both groups counted with their patients never measured (0): those who died were measured more often
        died_mean = np.mean([measured_per_patient[p] for p in died])
        assert died_mean > np.mean([measured_per_patient[p] for p in survived]), site_id
