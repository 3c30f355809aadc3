"""CSV extracts from a data warehouse load through a YAML column mapping, with the same checks as FHIR."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests import fhir_samples as S
from tests.etl_helpers import LAB_MAPPING, count, frame, load
from twinfed.cli import app

LABS = """\
lab_id,mrn,loinc,result,unit,taken_at
L1,MRN998877,2345-7,6.1,mmol/L,2024-03-02T07:00:00
L2,MRN998877,2160-0,88,umol/L,2024-03-02T07:00:00
L3,MRN000000,2160-0,1.0,mg/dL,2024-03-02T07:00:00
L4,MRN998877,2160-1,1.0,mg/dL,2024-03-02T07:00:00
L5,MRN998877,2160-0,lots,mg/dL,2024-03-02T07:00:00
L6,MRN998877,2160-0,1.1,mg/dL,not a date
"""


def test_a_lab_extract_joins_patients_by_mrn_and_quarantines_bad_rows(tmp_path):
    S.write_ndjson(tmp_path / "export", S.ALL)
    extract = tmp_path / "warehouse"
    extract.mkdir()
    (extract / "labs.csv").write_text(LABS)
    (extract / "labs.yaml").write_text(LAB_MAPPING)
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    load([tmp_path / "export"], url, tmp_path / "secret")
    report = load([extract], url, tmp_path / "secret")
    assert report.reconciles and report.input.by_resource_type == {"CSV:measurement": 6}
    assert report.loaded.total == 2
    # L3: unknown MRN; L4: LOINC check digit; L5: not a number; L6: not a date
    assert report.quarantine_by_rule == {
        "dangling_reference": 1,
        "invalid_code": 1,
        "schema_violation": 1,
        "invalid_date": 1,
    }
    rows = frame(url, "measurement").set_index("measurement_source_value")
    assert rows.loc["2345-7"].value_as_number.max() == pytest.approx(6.1 * 18.016)
    creatinine = rows.loc["2160-0"]
    assert creatinine.value_as_number == pytest.approx(88 / 88.42) and creatinine.unit_source_value == "umol/L"
    again = load([extract], url, tmp_path / "secret")
    assert again.input.total == 0 and count(url, "measurement", where="WHERE measurement_source_value='2160-0'") == 1


def test_a_broken_mapping_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "labs.csv").write_text("lab_id,mrn\nL1,M1\n")
    (tmp_path / "labs.yaml").write_text(LAB_MAPPING)
    result = CliRunner().invoke(
        app,
        [
            "etl",
            "--input",
            str(tmp_path),
            "--db",
            f"sqlite:///{tmp_path / 'x.sqlite'}",
            "--secret-file",
            str(tmp_path / "secret"),
        ],
    )
    assert result.exit_code == 2
    assert "labs.csv" in result.output and "loinc" in result.output and "not in the header" in result.output
