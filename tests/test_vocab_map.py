"""`twinfed vocab map`: a hospital's own codes (Usagi's source_to_concept_map export) are checked row by row,
loaded idempotently, and used by the ETL for code systems it does not know, counted in the load report."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from omop_etl.database import open_engine
from omop_etl.schema import cdm_metadata
from omop_etl.schema.create import init_cdm_schema
from omop_etl.vocabulary.bundled import load_bundled_vocabulary
from omop_etl.vocabulary.source_map import SourceMapError, load_source_to_concept_map
from tests import fhir_samples as S
from tests.etl_helpers import count
from tests.test_vocabulary_load import FILES, write_athena
from twinfed.cli import app

runner = CliRunner()
LAB_SYSTEM = "http://aster.example.org/fhir/CodeSystem/lab"
HEADER = (
    "source_code,source_concept_id,source_vocabulary_id,source_code_description,target_concept_id,"
    "target_vocabulary_id,valid_start_date,valid_end_date,invalid_reason"
)
# Exactly what Usagi's "Export source_to_concept_map" writes (two approved codes, one approved without target).
USAGI_EXPORT = [
    HEADER,
    "K-CREA,0,ASTER-LAB,Kreatinine serum,3016723,LOINC,1970-01-01,2099-12-31,",
    "K-LACT,0,ASTER-LAB,Lactaat bloed,3047181,LOINC,1970-01-01,2099-12-31,",
    'K-HB,0,ASTER-LAB,"Hemoglobine, bloed",3000963,LOINC,1970-01-01,2099-12-31,',
    "K-CALC,0,ASTER-LAB,Berekende waarde,0,None,1970-01-01,2099-12-31,",
]


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def omop(tmp_path: Path) -> str:
    """An empty OMOP CDM v5.4 SQLite database with the bundled vocabulary (LOINC, SNOMED, ... subsets)."""
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    init_cdm_schema(url)
    engine = open_engine(url)
    with engine.begin() as connection:
        load_bundled_vocabulary(connection, cdm_metadata())
        # A non-standard source concept, as a full vocabulary has many (ICD10CM codes map to SNOMED).
        connection.execute(
            text(
                "INSERT INTO concept VALUES (2000000101, 'Test ICD10CM code', 'Condition', 'ICD10CM', "
                "'5-char billing code', NULL, 'E11.9', '1970-01-01', '2099-12-31', NULL)"
            )
        )
    engine.dispose()
    return url


def rows(url: str, where: str = "") -> list[tuple]:
    engine = open_engine(url)
    with engine.connect() as connection:
        found = connection.execute(
            text(
                f"SELECT source_vocabulary_id, source_code, target_concept_id FROM source_to_concept_map {where} "
                "ORDER BY source_code, target_concept_id"
            )
        ).all()
    engine.dispose()
    return [tuple(r) for r in found]


def test_a_usagi_export_loads_and_loading_it_again_replaces(omop, tmp_path):
    file = write(tmp_path / "aster-lab.csv", USAGI_EXPORT)
    first = load_source_to_concept_map(omop, file)
    assert (first.rows_read, first.loaded, first.replaced, first.rejected) == (4, 4, 0, [])
    assert first.by_vocabulary == {"ASTER-LAB": 4} and first.to_no_concept == 1
    again = load_source_to_concept_map(omop, file)
    assert (again.loaded, again.replaced) == (4, 4)
    assert len(rows(omop)) == 4, "loading the same file again replaces its rows, it never duplicates them"
    # A later file with one code changed replaces that code only; the other codes stay.
    changed = write(tmp_path / "fix.csv", [HEADER, "K-HB,0,ASTER-LAB,Hb,3000963,LOINC,2020-01-01,2099-12-31,"])
    fixed = load_source_to_concept_map(omop, changed)
    assert (fixed.loaded, fixed.replaced) == (1, 1) and len(rows(omop)) == 4


def test_every_bad_row_is_named_with_file_line_and_rule_and_the_good_rows_still_load(omop, tmp_path):
    file = write(
        tmp_path / "local.csv",
        [
            HEADER,
            "K-CREA,0,ASTER-LAB,Creatinine,3016723,LOINC,1970-01-01,2099-12-31,",  # line 2: good
            "K-TYPO,0,ASTER-LAB,Typo,3016724,LOINC,1970-01-01,2099-12-31,",  # 3: not in the LOINC the database holds
            "K-ICD,0,ASTER-LAB,Diabetes,2000000101,ICD10CM,1970-01-01,2099-12-31,",  # 4: not standard
            "K-DATE,0,ASTER-LAB,Date,3016723,LOINC,1970-13-01,2099-12-31,",  # 5: no such date
            "K-ORDER,0,ASTER-LAB,Order,3016723,LOINC,2020-01-01,2019-12-31,",  # 6: end before start
            ",0,ASTER-LAB,No code,3016723,LOINC,1970-01-01,2099-12-31,",  # 7: source_code missing
            "K-VOC,0,ASTER-LAB,Vocabulary,3016723,SNOMED,1970-01-01,2099-12-31,",  # 8: target is LOINC
            "K-CREA,0,ASTER-LAB,Again,3016723,LOINC,1970-01-01,2099-12-31,",  # 9: duplicate of line 2
            "K-NUM,0,ASTER-LAB,Number,abc,LOINC,1970-01-01,2099-12-31,",  # 10: not a concept id
            "K-FAR,0,ASTER-LAB,Unknown vocabulary,2000999999,MYVOCAB,1970-01-01,2099-12-31,",  # 11: unchecked, loads
        ],
    )
    result = runner.invoke(app, ["vocab", "map", str(file), "--db", omop])
    assert result.exit_code == 1, result.output
    expected = {
        3: "unknown_concept",
        4: "not_standard",
        5: "invalid_date",
        6: "date_order",
        7: "missing_field",
        8: "vocabulary_mismatch",
        9: "duplicate",
        10: "not_an_integer",
    }
    for line, rule in expected.items():
        assert f"local.csv, line {line}: " in said(result) and f"(rule {rule})" in said(result), (line, rule)
    assert "2 loaded" in said(result) and "8 rejected" in said(result)
    assert rows(omop) == [("ASTER-LAB", "K-CREA", 3016723), ("ASTER-LAB", "K-FAR", 2000999999)]
    assert "could not be checked" in said(result), "a target of a vocabulary the database lacks is said unchecked"


def test_files_that_are_not_a_source_to_concept_map_are_refused_with_what_to_do(omop, tmp_path):
    usagi_save = write(
        tmp_path / "mapping.csv",
        [
            "sourceCode,sourceName,sourceFrequency,sourceAutoAssignedConceptIds,matchScore,mappingStatus,conceptId",
            "K-CREA,Kreatinine,10,,0.9,APPROVED,3016723",
        ],
    )
    with pytest.raises(SourceMapError, match="Export source_to_concept_map"):
        load_source_to_concept_map(omop, usagi_save)
    no_vocabulary = write(tmp_path / "short.csv", ["source_code,target_concept_id", "K-CREA,3016723"])
    with pytest.raises(SourceMapError, match=r"lacks the column.*source_vocabulary_id.*--vocabulary-id"):
        load_source_to_concept_map(omop, no_vocabulary)
    filled = load_source_to_concept_map(omop, no_vocabulary, vocabulary_id="ASTER-LAB")
    assert filled.loaded == 1 and rows(omop) == [("ASTER-LAB", "K-CREA", 3016723)]
    with pytest.raises(SourceMapError, match="LOINC, which twinfed already maps"):
        load_source_to_concept_map(omop, no_vocabulary, vocabulary_id="X", system="http://loinc.org")
    result = runner.invoke(app, ["vocab", "map", str(tmp_path / "missing.csv"), "--db", omop])
    assert result.exit_code == 2 and "There is no file" in said(result)


def test_a_local_fhir_code_system_is_mapped_by_the_etl_and_counted_in_the_report(tmp_path):
    """End to end: omop init, vocab map --system, twinfed etl; the local codes end with the mapped concepts."""
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    assert runner.invoke(app, ["omop", "init", "--db", url]).exit_code == 0
    mapping = write(tmp_path / "aster-lab.csv", USAGI_EXPORT)
    registered = runner.invoke(
        app, ["vocab", "map", str(mapping), "--db", url, "--system", LAB_SYSTEM, "--vocabulary-id", "ASTER-LAB"]
    )
    assert registered.exit_code == 0, registered.output
    assert "ASTER-LAB" in said(registered) and "4 loaded" in said(registered)
    # The diagnosis system is short enough to be its own source_vocabulary_id: no registration needed.
    diagnoses = write(tmp_path / "dx.csv", [HEADER, "DX-HF,0,ASTER-DX,Hartfalen,316139,SNOMED,1970-01-01,2099-12-31,"])
    assert runner.invoke(app, ["vocab", "map", str(diagnoses), "--db", url]).exit_code == 0

    local_lab = {
        "resourceType": "Observation",
        "id": "lab-1",
        "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": LAB_SYSTEM, "code": "K-CREA", "display": "Kreatinine"}]},
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "effectiveDateTime": "2024-03-01T07:00:00+01:00",
        "valueQuantity": {"value": 1.1, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }
    unmapped_lab = {**local_lab, "id": "lab-2", "code": {"coding": [{"system": LAB_SYSTEM, "code": "K-NEW"}]}}
    local_diagnosis = {
        **S.CONDITION,
        "id": "dx-1",
        "code": {"coding": [{"system": "ASTER-DX", "code": "DX-HF"}]},
    }
    export = S.write_ndjson(
        tmp_path / "export", [S.ORG, S.PATIENT, S.ENCOUNTER, local_lab, unmapped_lab, local_diagnosis]
    )
    result = runner.invoke(
        app,
        [
            "etl",
            "--input",
            str(export),
            "--db",
            url,
            "--secret-file",
            str(tmp_path / "secret"),
            "--report",
            str(tmp_path / "report.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Mapped by the site's source_to_concept_map" in said(result)
    assert (
        count(
            url, "measurement", where="WHERE measurement_concept_id = 3016723 AND measurement_source_value = 'K-CREA'"
        )
        == 1
    )
    assert count(url, "condition_occurrence", where="WHERE condition_concept_id = 316139") == 1
    from omop_etl.load.report import EtlReport

    report = EtlReport.model_validate_json((tmp_path / "report.json").read_text())
    assert report.site_mapped_events == 2
    assert {(c.system, c.code, c.count) for c in report.site_mapped_codes} == {
        (LAB_SYSTEM, "K-CREA", 1),
        ("ASTER-DX", "DX-HF", 1),
    }
    assert {(c.system, c.code) for c in report.unmapped_codes} == {(LAB_SYSTEM, "K-NEW")}


def test_an_athena_reload_keeps_the_local_system_registration(omop, tmp_path):
    mapping = write(tmp_path / "aster-lab.csv", USAGI_EXPORT)
    load_source_to_concept_map(omop, mapping, system=LAB_SYSTEM)  # the file's one vocabulary id is used
    engine = open_engine(omop, bulk_load=True)
    try:
        from omop_etl.vocabulary.athena import load_athena

        load_athena(engine, write_athena(tmp_path / "athena", FILES))
        with engine.connect() as connection:
            reference = connection.execute(
                text("SELECT vocabulary_reference FROM vocabulary WHERE vocabulary_id = 'ASTER-LAB'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert reference == LAB_SYSTEM
    assert len(rows(omop)) == 4, "source_to_concept_map is not an Athena table: a vocabulary load keeps it"


@pytest.mark.postgres
def test_vocab_map_on_postgresql_in_a_schema(pg_url, tmp_path):
    schema = f"stcm_{uuid.uuid4().hex[:8]}"
    try:
        init_cdm_schema(pg_url, schema)
        file = write(tmp_path / "aster-lab.csv", USAGI_EXPORT)
        first = load_source_to_concept_map(pg_url, file, schema, system=LAB_SYSTEM, vocabulary_id="ASTER-LAB")
        again = load_source_to_concept_map(pg_url, file, schema)
        assert (first.loaded, again.loaded, again.replaced) == (4, 4, 4)
        assert first.unchecked_targets == 3, "an empty vocabulary cannot check the targets: said, not refused"
        assert count(pg_url, "source_to_concept_map", schema) == 4
    finally:
        engine = open_engine(pg_url)
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
