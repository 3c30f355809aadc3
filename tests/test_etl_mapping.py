"""Each FHIR resource type lands in the right OMOP table with the right concepts, units, dates and links,
and nothing that identifies a patient enters OMOP."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from omop_etl.database import open_engine
from tests import fhir_samples as S
from tests.etl_helpers import count, frame, load


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mapping")
    S.write_ndjson(folder / "export", S.ALL)
    url = f"sqlite:///{folder / 'omop.sqlite'}"
    report = load([folder / "export"], url, folder / "secret")
    return url, report


def one(url: str, sql: str):
    engine = open_engine(url)
    with engine.connect() as connection:
        row = connection.execute(text(sql)).one()
    engine.dispose()
    return row


def test_report_accounts_for_every_resource(db):
    _, report = db
    assert report.input.total == len(S.ALL) and report.reconciles
    assert report.skipped.by_resource_type == {"CarePlan": 1, "Observation": 1, "Procedure": 1}
    assert report.quarantined.total == 0 and report.excluded.total == 0
    assert {(c.system, c.code) for c in report.unmapped_codes} == {
        ("http://loinc.org", "72166-2"),
        ("http://hl7.org/fhir/sid/cvx", "140"),
    }


def test_patient_becomes_person_and_death(db):
    url, _ = db
    person = one(url, "SELECT * FROM person")
    assert (person.gender_concept_id, person.year_of_birth, person.month_of_birth, person.day_of_birth) == (
        8532,
        1950,
        4,
        3,
    )
    assert person.race_concept_id == 8527 and person.race_source_value == "2106-3"
    assert person.ethnicity_concept_id == 0
    assert len(person.person_source_value) == 43 and person.person_source_value != "p1"
    assert (
        person.care_site_id == one(url, "SELECT care_site_id FROM care_site WHERE care_site_name = 'Test Hospital'")[0]
    )
    death = one(url, "SELECT * FROM death")
    assert (str(death.death_date)[:10], death.death_type_concept_id) == ("2024-03-05", 32817)


def test_no_identifying_value_reaches_any_table(db):
    url, _ = db
    engine = open_engine(url)
    with engine.connect() as connection:
        names = [r[0] for r in connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))]
        dump = "\n".join(
            str(row)
            for name in names
            for row in connection.execute(text(f'SELECT * FROM "{name}"'))
            if name != "twinfed_quarantine"
        )
    engine.dispose()
    for secret in ("Verysecretname", "Anna", "5550199", "Kerkstraat", "3511AB", "MRN998877", "Doctorow"):
        assert secret not in dump


def test_encounter_becomes_visit_with_details_and_links(db):
    url, _ = db
    visit = one(url, "SELECT * FROM visit_occurrence")
    assert visit.visit_concept_id == 9201 and visit.visit_type_concept_id == 32827
    assert str(visit.visit_start_date) == "2024-03-01" and str(visit.visit_end_date) == "2024-03-05"
    assert visit.admitted_from_source_value == "emd" and visit.discharged_to_source_value == "exp"
    assert visit.provider_id == one(url, "SELECT provider_id FROM provider")[0]
    detail = one(url, "SELECT * FROM visit_detail")
    assert detail.visit_occurrence_id == visit.visit_occurrence_id
    assert (
        detail.care_site_id == one(url, "SELECT care_site_id FROM care_site WHERE care_site_name LIKE 'Intensive%'")[0]
    )
    linked = count(url, "measurement", where=f"WHERE visit_occurrence_id = {visit.visit_occurrence_id}")
    assert linked == 3  # two blood-pressure components and the glucose


def test_conditions_by_coding_preference_and_type(db):
    url, _ = db
    rows = frame(url, "condition_occurrence")
    by_code = {r.condition_source_value: r for r in rows.itertuples()}
    assert by_code["91302008"].condition_concept_id == 132797
    assert by_code["91302008"].condition_type_concept_id == 32827  # encounter diagnosis
    assert by_code["44054006"].condition_concept_id == 201826  # SNOMED chosen over ICD-10-CM
    assert by_code["44054006"].condition_type_concept_id == 32840  # problem list
    assert by_code["44054006"].condition_start_date == "2010-06-01"  # a partial date takes day 1


def test_blood_pressure_panel_gives_one_row_per_component(db):
    url, _ = db
    rows = frame(url, "measurement")
    bp = rows[rows.measurement_source_value.isin(["8480-6", "8462-4"])]
    assert sorted(bp.measurement_concept_id) == [3004249, 3012888]
    assert set(bp.unit_concept_id) == {8876} and sorted(bp.value_as_number) == [79.0, 128.0]
    assert set(bp.measurement_type_concept_id) == {32817}
    assert not (rows.measurement_source_value == "85354-9").any()


def test_units_are_converted_to_one_canonical_unit(db):
    url, _ = db
    rows = frame(url, "measurement").set_index("measurement_source_value")
    glucose = rows.loc["2345-7"]
    assert glucose.value_as_number == pytest.approx(5.5 * 18.016)
    assert (glucose.unit_concept_id, glucose.unit_source_value) == (8840, "mmol/L")
    assert glucose.measurement_type_concept_id == 32856 and glucose.range_low == 3.9
    temperature = rows.loc["8310-5"]
    assert temperature.value_as_number == pytest.approx((101.3 - 32) * 5 / 9)
    assert (temperature.unit_concept_id, temperature.unit_source_value) == (586323, "[degF]")


def test_unmapped_codes_follow_the_ohdsi_convention(db):
    url, _ = db
    smoking = one(url, "SELECT * FROM observation")
    assert smoking.observation_concept_id == 0 and smoking.observation_source_value == "72166-2"
    assert smoking.observation_source_concept_id == 0 and smoking.value_source_value == "8517006"
    vaccine = one(url, "SELECT * FROM drug_exposure WHERE drug_source_value = '140'")
    assert vaccine.drug_concept_id == 0 and vaccine.lot_number == "LOT42" and vaccine.drug_type_concept_id == 32818


def test_drugs_and_procedures(db):
    url, _ = db
    prescription = one(url, "SELECT * FROM drug_exposure WHERE drug_source_value = '6809'")
    assert prescription.drug_concept_id == 1503297 and prescription.drug_type_concept_id == 32838
    assert str(prescription.drug_exposure_end_date) == "2024-02-09"  # 30 days of supply
    assert prescription.refills == 2 and prescription.days_supply == 30
    administration = one(url, "SELECT * FROM drug_exposure WHERE drug_source_value = '4603'")
    assert administration.drug_concept_id == 956874 and administration.drug_type_concept_id == 32818
    assert administration.quantity == 40 and administration.visit_occurrence_id is not None
    procedure = one(url, "SELECT * FROM procedure_occurrence")
    assert procedure.procedure_concept_id == 4163872 and str(procedure.procedure_date) == "2024-03-01"


def test_derived_tables_and_consent_registry(db):
    url, _ = db
    period = one(url, "SELECT * FROM observation_period")
    # the problem-list onset (2010) does not open the period; the first event in hospital care does
    assert str(period.observation_period_start_date) == "2023-05-01"
    assert str(period.observation_period_end_date) == "2024-03-05"
    assert period.period_type_concept_id == 32882
    source = one(url, "SELECT * FROM cdm_source")
    assert source.cdm_version == "5.4" and source.cdm_version_concept_id == 756265
    assert str(source.source_release_date) == "2025-01-01"
    consent = one(url, "SELECT * FROM twinfed_consent")
    assert (consent.provision, consent.status, consent.scope) == ("deny", "active", "research")
    assert consent.person_id == one(url, "SELECT person_id FROM person")[0]


def test_a_synthea_style_bundle_loads_the_same(tmp_path, db):
    url, _ = db
    bundle = S.write_bundle(tmp_path / "patient-bundle.json", S.ALL)
    bundle_url = f"sqlite:///{tmp_path / 'bundle.sqlite'}"
    report = load([bundle], bundle_url, tmp_path / "secret")
    assert report.reconciles and report.quarantined.total == 0
    for table in (
        "person",
        "visit_occurrence",
        "visit_detail",
        "condition_occurrence",
        "measurement",
        "drug_exposure",
        "procedure_occurrence",
        "observation",
        "death",
    ):
        assert count(bundle_url, table) == count(url, table), table
    assert count(bundle_url, "measurement", where="WHERE visit_occurrence_id IS NOT NULL") == 3


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"status": None}, "schema_violation"),
        ({"effectiveDateTime": "2024-02-30T10:00:00+01:00"}, "invalid_date"),
        ({"effectiveDateTime": "1940-01-01"}, "impossible_date"),
        ({"subject": {"reference": "Patient/nobody"}}, "dangling_reference"),
        ({"code": {"coding": [{"system": "http://loinc.org", "code": "2345-8"}]}}, "invalid_code"),
        (
            {"valueQuantity": {"value": 550, "system": "http://unitsofmeasure.org", "code": "mmol/L"}},
            "implausible_value",
        ),
        ({"encounter": {"reference": "Encounter/e2"}}, None),
    ],
)
def test_each_rule_quarantines_with_file_line_and_reason(tmp_path, change, rule):
    broken = {**S.GLUCOSE_MMOL, **change}
    broken = {k: v for k, v in broken.items() if v is not None}
    other_encounter = {**S.ENCOUNTER, "id": "e2", "subject": {"reference": "Patient/p2"}}
    other_patient = {**S.PATIENT, "id": "p2"}
    S.write_ndjson(tmp_path / "export", [S.ORG, S.PATIENT, other_patient, S.ENCOUNTER, other_encounter, broken])
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    report = load([tmp_path / "export"], url, tmp_path / "secret")
    assert report.reconciles
    expected = rule or "inconsistent_reference"
    assert report.quarantine_by_rule == {expected: 1}
    row = one(url, "SELECT file, position, position_kind, rule, detail, raw FROM twinfed_quarantine")
    assert row.file.endswith("Observation.ndjson") and (row.position, row.position_kind) == (1, "line")
    assert row.rule == expected and row.detail and '"g1"' in row.raw
