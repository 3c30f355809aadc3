"""Right to erasure: one command removes a person everywhere, says what it removed, and later loads
keep the person out.

"Everywhere" includes the quarantine, which holds raw source records: a record quarantined before its
patient could be resolved (a bad code, a cut-off line, a Patient that failed validation) carries no
patient key, only the patient's identifiers inside the raw JSON or CSV row. Erasure finds those too,
on SQLite and PostgreSQL, and a later load counts such records of an erased patient as excluded
instead of storing them raw again.
"""

from __future__ import annotations

import gzip
import re
import uuid
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from omop_etl.database import open_engine
from omop_etl.identity import SiteKeys, load_or_create_secret
from omop_etl.load.erasure import ERASED_REASON, erase, quarantine_keys
from site_node.governance import GovernanceStore, RoundMembership
from tests import fhir_samples as S
from tests.etl_helpers import CLINICAL_TABLES, LAB_MAPPING, count, load
from tests.shared_data import require, shared_path
from twinfed.cli import app

SYNTHEA = shared_path("data", "synthea-r4", "bundles")
COLEMAN = SYNTHEA / "Coleman_Ortiz_70e00093-a3d5-42bc-8186-eface8432c02.json.gz"  # 3 Procedures with a bad code

STRANGER = str(uuid.UUID("0b8e4e5c-6a55-4e7a-9c39-2f1d3c1a7e01"))  # a patient whose own Patient record is broken
P2 = {k: v for k, v in S.PATIENT.items() if k not in ("deceasedDateTime", "identifier")} | {
    "id": "p2",
    "birthDate": "1980-01-01",
}
# Defective records of p1 (the patient to erase), each quarantined a different way.
BAD_CODE = {**S.GLUCOSE_MMOL, "id": "g-bad", "code": {"coding": [{"system": "http://loinc.org", "code": "2345-6"}]}}
TOO_HIGH = {**S.GLUCOSE_MMOL, "id": "g-high", "valueQuantity": {**S.GLUCOSE_MMOL["valueQuantity"], "value": 900}}
NO_SUBJECT = {k: v for k, v in S.CONDITION.items() if k != "subject"} | {"id": "c-nosubject"}  # names Encounter/e1
TRUNCATED = orjson.dumps({**S.TEMPERATURE_F, "id": "t-cut"})[:-60]  # a cut-off line that still names Patient/p1
# Other patients' defects, which must stay: p2, and p10 (whose id starts with p1's). No link to p1's encounter.
UNLINKED = {k: v for k, v in BAD_CODE.items() if k != "encounter"}
P2_BAD_CODE = {**UNLINKED, "id": "g-bad-p2", "subject": {"reference": "Patient/p2"}}
P10_BAD_CODE = {**UNLINKED, "id": "g-bad-p10", "subject": {"reference": "Patient/p10"}}
# A patient whose Patient record fails validation (no birthDate), referenced the way Synthea does.
STRANGER_PATIENT = {k: v for k, v in P2.items() if k != "birthDate"} | {"id": STRANGER}
STRANGER_OBSERVATION = {**UNLINKED, "id": "g-stranger", "subject": {"reference": f"urn:uuid:{STRANGER}"}}
STRANGER_ENCOUNTER = {**S.ENCOUNTER, "id": "e-stranger", "subject": {"reference": f"Patient/{STRANGER}"}}

LABS = """\
lab_id,mrn,loinc,result,unit,taken_at
L1,MRN998877,2345-7,6.1,mmol/L,2024-03-02T07:00:00
L4,MRN998877,2160-1,1.0,mg/dL,2024-03-02T07:00:00
L5,MRN998877,2160-0,lots,mg/dL,2024-03-02T07:00:00
"""
LATER_LABS = """\
lab_id,mrn,loinc,result,unit,taken_at
M1,MRN998877,2345-7,6.3,mmol/L,2024-04-02T07:00:00
M4,MRN998877,2160-1,1.2,mg/dL,2024-04-02T07:00:00
M5,MRN998877,2160-0,many,mg/dL,2024-04-02T07:00:00
"""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def omop_db(request, tmp_path):
    """(url, schema) of an empty OMOP database: a SQLite file, or a throw-away schema on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'omop.sqlite'}", None
        return
    url = request.getfixturevalue("pg_url")
    schema = f"erasure_{uuid.uuid4().hex[:10]}"
    yield url, schema
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def _quarantine(url: str, schema: str | None) -> list[tuple[str, str, bool, str]]:
    """(resource type, rule, has a patient key, raw + detail) of every quarantined record."""
    name = f'"{schema}".twinfed_quarantine' if schema else "twinfed_quarantine"
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(f"SELECT resource_type, rule, patient_key, raw, detail FROM {name}")).all()
    finally:
        engine.dispose()
    return [(r[0], r[1], r[2] is not None, f"{r[3] or ''} {r[4] or ''}") for r in rows]


def _naming(rows: list[tuple[str, str, bool, str]], *identifiers: str) -> list[tuple[str, str, bool, str]]:
    """The rows whose raw record or detail holds one of these identifiers as a whole token."""
    pattern = re.compile("|".join(rf"(?<![\w.-]){re.escape(i)}(?![\w.-])" for i in identifiers))
    return [row for row in rows if pattern.search(row[3])]


def _export(tmp_path: Path) -> list[Path]:
    """An NDJSON export with p1's, p2's and a stranger's defects, and a warehouse lab extract (by MRN)."""
    export = S.write_ndjson(
        tmp_path / "export",
        [*S.ALL, P2, BAD_CODE, TOO_HIGH, NO_SUBJECT, P2_BAD_CODE, P10_BAD_CODE, STRANGER_PATIENT,
         STRANGER_OBSERVATION, STRANGER_ENCOUNTER],
    )  # fmt: skip
    observations = export / "Observation.ndjson"
    observations.write_bytes(observations.read_bytes() + TRUNCATED + b"\n")
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    (warehouse / "labs.csv").write_text(LABS)
    (warehouse / "labs.yaml").write_text(LAB_MAPPING)
    return [export, warehouse]


def _erase(url: str, schema: str | None, secret: Path, patient: str) -> str:
    arguments = ["erase", "--db", url, "--patient", patient, "--secret-file", str(secret)]
    result = CliRunner().invoke(app, arguments + (["--schema", schema] if schema else []))
    assert result.exit_code == 0, result.output
    return result.output


def test_erase_removes_the_person_everywhere_and_later_loads_exclude_them(tmp_path):
    other = {k: v for k, v in S.PATIENT.items() if k != "deceasedDateTime"} | {"id": "p2", "birthDate": "1980-01-01"}
    export = S.write_ndjson(tmp_path / "export", [*S.ALL, other])
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    secret = tmp_path / "secret"
    load([export], url, secret)
    assert count(url, "person") == 2
    result = CliRunner().invoke(app, ["erase", "--db", url, "--patient", "p1", "--secret-file", str(secret)])
    assert result.exit_code == 0, result.output
    for table in ("person", "measurement", "visit_occurrence", "drug_exposure", "death", "twinfed_id_map"):
        assert table in result.output
    assert count(url, "person") == 1
    remaining = {t: count(url, t) for t in CLINICAL_TABLES if t not in ("care_site", "location", "provider")}
    assert remaining["death"] == 0 and remaining["measurement"] == 0 and remaining["observation_period"] <= 1
    assert count(url, "twinfed_consent", where="WHERE person_id IS NOT NULL") == 0
    (export / "Patient.ndjson").write_bytes((export / "Patient.ndjson").read_bytes() + b"\n")  # a new export
    report = load([export], url, secret)
    assert report.excluded.by_resource_type.get("Patient") == 1
    assert "erased on request (right to erasure)" in report.excluded_by_reason
    assert count(url, "person") == 1


def test_erase_of_an_unknown_patient_is_recorded_and_says_so(tmp_path):
    export = S.write_ndjson(tmp_path / "export", S.ALL)
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    load([export], url, tmp_path / "secret")
    result = CliRunner().invoke(
        app, ["erase", "--db", url, "--patient", "nobody", "--secret-file", str(tmp_path / "secret")]
    )
    assert result.exit_code == 0 and "was not loaded" in result.output
    result = CliRunner().invoke(app, ["erase", "--db", url, "--person-id", "999"])
    assert result.exit_code == 2 and "No person with person_id 999" in result.output


def test_erase_with_another_secret_than_the_loads_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    load([S.write_ndjson(tmp_path / "export", S.ALL)], url, tmp_path / "secret")
    load_or_create_secret(tmp_path / "other")
    result = CliRunner().invoke(
        app, ["erase", "--db", url, "--person-id", "1", "--secret-file", str(tmp_path / "other")]
    )
    assert result.exit_code == 2 and "loaded with a different site secret" in result.output
    assert count(url, "person") == 1 and count(url, "twinfed_erasure") == 0


def test_erase_by_person_id_of_a_patient_with_an_mrn(tmp_path):
    """The id map holds a person's Patient key and MRN alias alike; erasure by person_id takes them all."""
    url, secret = f"sqlite:///{tmp_path / 'omop.sqlite'}", tmp_path / "secret"
    for source in _export(tmp_path):
        load([source], url, secret)
    engine = open_engine(url)
    with engine.connect() as connection:
        person_id = connection.execute(text("SELECT person_id FROM person WHERE year_of_birth = 1950")).scalar_one()
    engine.dispose()
    result = CliRunner().invoke(
        app, ["erase", "--db", url, "--person-id", str(person_id), "--secret-file", str(secret)]
    )
    assert result.exit_code == 0, result.output
    assert count(url, "person") == 1 and _naming(_quarantine(url, None), "Patient/p1", "MRN998877") == []
    (tmp_path / "warehouse" / "labs.csv").write_text(LATER_LABS)
    report = load([tmp_path / "warehouse"], url, secret)
    assert report.excluded_by_reason == {ERASED_REASON: 3} and report.quarantined.total == 0


def test_erase_removes_quarantined_raw_records_with_and_without_a_patient_key(omop_db, tmp_path):
    url, schema = omop_db
    secret = tmp_path / "secret"
    inputs = _export(tmp_path)
    for source in inputs:
        assert load([source], url, secret, schema=schema).reconciles
    before = _quarantine(url, schema)
    of_p1 = _naming(before, "Patient/p1", "Encounter/e1", "MRN998877")
    # g-bad, g-high, c-nosubject, t-cut and the CSV rows L4, L5; only g-high had its patient resolved
    assert len(of_p1) == 6 and sum(has_key for _, _, has_key, _ in of_p1) == 1, of_p1
    of_stranger = _naming(before, STRANGER)
    assert len(of_stranger) == 3 and sum(has_key for _, _, has_key, _ in of_stranger) == 1  # the Encounter's
    others = _naming(before, "Patient/p2", "Patient/p10")
    assert len(others) == 2

    output = _erase(url, schema, secret, "p1")
    assert "twinfed_quarantine" in output
    after = _quarantine(url, schema)
    assert _naming(after, "Patient/p1", "Encounter/e1", "MRN998877") == []
    assert len(after) == len(before) - 6 and _naming(after, "Patient/p2", "Patient/p10") == others

    # A patient who was never loaded (their own Patient record failed validation): erasure still finds
    # the Patient record, the urn:uuid reference and the plain reference.
    result = erase(url, patient_id=STRANGER, schema=schema, secret_file=secret)
    assert result.person_id is None and result.removed == {"twinfed_quarantine": 3}
    assert _naming(_quarantine(url, schema), STRANGER) == []
    assert len(_quarantine(url, schema)) == len(before) - 9


def test_a_later_load_counts_an_erased_patients_defective_records_and_stores_nothing_raw(omop_db, tmp_path):
    url, schema = omop_db
    secret = tmp_path / "secret"
    inputs = _export(tmp_path)
    for source in inputs:
        load([source], url, secret, schema=schema)
    _erase(url, schema, secret, "p1")
    erase(url, patient_id=STRANGER, schema=schema, secret_file=secret)
    stored = len(_quarantine(url, schema))

    # The next nightly export sends the same patients again, with new defective records.
    later = S.write_ndjson(
        tmp_path / "later",
        [S.PATIENT, {**S.PATIENT, "birthDate": "1950-02-30"}, {**BAD_CODE, "id": "g-bad-2"},
         {**NO_SUBJECT, "id": "c-nosubject-2"}, {**STRANGER_PATIENT, "gender": "unknown"},
         {**STRANGER_OBSERVATION, "id": "g-stranger-2"}, {**P2_BAD_CODE, "id": "g-bad-p2-2"}],
    )  # fmt: skip
    observations = later / "Observation.ndjson"
    observations.write_bytes(observations.read_bytes() + TRUNCATED.replace(b"t-cut", b"t-cut-2") + b"\n")
    report = load([later], url, secret, schema=schema)
    assert report.reconciles
    # p1 twice (valid, and with a date that does not exist), g-bad-2, c-nosubject-2, the stranger's Patient,
    # g-stranger-2 and t-cut-2
    assert report.excluded.total == 7 and report.excluded_by_reason == {ERASED_REASON: 7}
    assert report.quarantined.total == 1 and report.quarantine_by_rule == {"invalid_code": 1}  # p2's
    assert report.input.total == report.loaded.total + report.quarantined.total + report.excluded.total
    after = _quarantine(url, schema)
    assert len(after) == stored + 1 and _naming(after, "Patient/p1", "Encounter/e1", STRANGER) == []

    # The warehouse sends p1's labs again, by MRN: counted as excluded, none stored.
    (tmp_path / "warehouse" / "labs.csv").write_text(LATER_LABS)
    report = load([tmp_path / "warehouse"], url, secret, schema=schema)
    assert report.reconciles and report.excluded.total == 3 and report.quarantined.total == 0
    assert _naming(_quarantine(url, schema), "MRN998877") == []


def test_erasing_a_real_synthea_patient_removes_their_quarantined_records(tmp_path):
    url, secret = f"sqlite:///{tmp_path / 'omop.sqlite'}", tmp_path / "secret"
    bundle = orjson.loads(gzip.decompress(require(COLEMAN).read_bytes()))
    patient_id = next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    first = load([COLEMAN], url, secret)
    assert first.reconciles and first.quarantine_by_rule == {"invalid_code": 3}
    rows = _quarantine(url, None)
    assert len(_naming(rows, f"Patient/{patient_id}")) == 3 and not any(has_key for _, _, has_key, _ in rows)

    result = erase(url, patient_id=patient_id, secret_file=secret)
    assert result.removed["twinfed_quarantine"] == 3 and _quarantine(url, None) == []

    # The next export of the same patient, with their Patient record broken as well: nothing stored.
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"]["birthDate"] = "1978-02-30"  # not a date: the Patient fails validation
    again = tmp_path / "again.json"
    again.write_bytes(orjson.dumps(bundle))
    report = load([again], url, secret)
    assert report.reconciles and report.quarantined.total == 0 and _quarantine(url, None) == []
    assert report.excluded.by_resource_type["Patient"] == 1 and report.excluded.by_resource_type["Procedure"] >= 3
    assert set(report.excluded_by_reason) == {ERASED_REASON}


def test_every_patient_reference_of_real_synthea_bundles_is_recognised(tmp_path):
    keys = SiteKeys(load_or_create_secret(tmp_path / "secret")[0])
    checked = unrecognised = 0
    for path in sorted(require(SYNTHEA).glob("*.json.gz")):
        bundle = orjson.loads(gzip.decompress(path.read_bytes()))
        patients = [e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
        if not patients:  # the shared hospital and practitioner bundles
            continue
        patient_key = keys.key(f"Patient/{patients[0]}")
        for entry in bundle["entry"]:
            raw = orjson.dumps(entry["resource"]).decode()
            if patients[0] not in raw:
                continue
            resource_type = entry["resource"]["resourceType"]
            rewritten = raw.replace(f"urn:uuid:{patients[0]}", f"Patient/{patients[0]}")  # as the ETL stores it
            pretty = orjson.dumps(entry["resource"], option=orjson.OPT_INDENT_2).decode()  # as Synthea writes it
            for form in (raw, rewritten, pretty):
                checked += 1
                unrecognised += patient_key not in quarantine_keys(keys, resource_type, None, None, form, None)
    assert checked > 40_000 and unrecognised == 0  # 15,557 records name their patient, each in three forms


def test_round_membership_keeps_only_a_person_id_that_no_one_else_gets_after_erasure(tmp_path):
    export = S.write_ndjson(tmp_path / "export", [*S.ALL, P2])
    url, secret = f"sqlite:///{tmp_path / 'omop.sqlite'}", tmp_path / "secret"
    load([export], url, secret)
    engine = open_engine(url)
    with engine.connect() as connection:
        ids = dict(connection.execute(text("SELECT person_id, year_of_birth FROM person")).all())
    engine.dispose()
    erased = next(pid for pid, year in ids.items() if year == 1950)  # p1
    store = GovernanceStore(f"sqlite:///{tmp_path / 'governance.sqlite'}")
    membership = RoundMembership(store)
    membership.record("study", "round-1", ids)
    erase(url, patient_id="p1", secret_file=secret)
    # A new patient loaded after the erasure gets a new person_id, never the erased one: the lineage
    # kept in the governance database cannot come to name someone else.
    newcomer = {**P2, "id": "p3", "birthDate": "1990-01-01"}
    load([S.write_ndjson(tmp_path / "later", [newcomer])], url, secret)
    assert count(url, "person", where=f"WHERE person_id = {erased}") == 0
    linked = f"WHERE person_id = {erased} OR (omop_table = 'person' AND omop_id = {erased})"
    assert count(url, "twinfed_id_map", where=linked) == 0
    assert count(url, "person", where=f"WHERE person_id > {max(ids)}") == 1
    assert [r for _, r, _ in membership.rounds_including(erased)] == ["round-1"]
    store.dispose()
