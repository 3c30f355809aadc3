"""Right to erasure: one command removes a person everywhere, says what it removed, and later loads
keep the person out."""

from __future__ import annotations

from typer.testing import CliRunner

from tests import fhir_samples as S
from tests.etl_helpers import CLINICAL_TABLES, count, load
from twinfed.cli import app


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
