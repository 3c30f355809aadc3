"""Vocabulary loading: an Athena download and the bundled subset, on SQLite and PostgreSQL.

The Athena folder is written by the test in Athena's own format (tab-separated, header row, no quoting,
dates as YYYYMMDD). It holds a non-standard ICD10CM code with a 'Maps to' row to a standard SNOMED
concept: the case the ETL depends on. The concept ids are illustrative test data, not checked against an
Athena release.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import and_, func, select, text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from omop_etl.database import open_engine
from omop_etl.schema import cdm_metadata, create_cdm
from omop_etl.vocab_cli import vocab_app
from omop_etl.vocabulary import bundled_catalog
from omop_etl.vocabulary.athena import AthenaFormatError, VocabularyLoadError, load_athena
from omop_etl.vocabulary.bundled import BUNDLED_VOCABULARY_VERSION, cdm_table, load_bundled_vocabulary

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich tables without truncated cells

CONCEPT_HEADER = (
    "concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\tconcept_code"
    "\tvalid_start_date\tvalid_end_date\tinvalid_reason"
)
CONCEPTS = [
    "0\tNo matching concept\tMetadata\tNone\tUndefined\t\tNo matching concept\t19700101\t20991231\t",
    "201826\tType 2 diabetes mellitus\tCondition\tSNOMED\tClinical Finding\tS\t44054006\t19700101\t20991231\t",
    "320128\tEssential hypertension\tCondition\tSNOMED\tClinical Finding\tS\t59621000\t19700101\t20991231\t",
    "316139\tHeart failure\tCondition\tSNOMED\tClinical Finding\tS\t84114007\t19700101\t20991231\t",
    "255573\tChronic obstructive lung disease\tCondition\tSNOMED\tClinical Finding\tS\t13645005\t19700101\t20991231\t",
    # A source code: non-standard, reaches SNOMED through 'Maps to'.
    "35207668\tEssential (primary) hypertension\tCondition\tICD10CM\t3-char billing code\t\tI10\t20071001\t20991231\t",
    "45576876\tType 2 diabetes mellitus without complications\tCondition\tICD10CM\tBilling Code\t\tE11.9"
    "\t20071001\t20991231\t",
    # A deprecated concept: invalid_reason 'D' and an end date in the past.
    "4000001\tOld hypertension code\tCondition\tSNOMED\tClinical Finding\t\t1201005\t19700101\t20180131\tD",
    "3027018\tHeart rate\tMeasurement\tLOINC\tClinical Observation\tS\t8867-4\t19700101\t20991231\t",
    "3004249\tSystolic blood pressure\tMeasurement\tLOINC\tClinical Observation\tS\t8480-6\t19700101\t20991231\t",
    '3012888\tDiastolic "blood" pressure\tMeasurement\tLOINC\tClinical Observation\tS\t8462-4\t19700101\t20991231\t',
    "8541\tper minute\tUnit\tUCUM\tUnit\tS\t/min\t19700101\t20991231\t",
    "8876\tmillimeter mercury column\tUnit\tUCUM\tUnit\tS\tmm[Hg]\t19700101\t20991231\t",
    "8507\tMALE\tGender\tGender\tGender\tS\tM\t19700101\t20991231\t",
    "8532\tFEMALE\tGender\tGender\tGender\tS\tF\t19700101\t20991231\t",
    "9201\tInpatient Visit\tVisit\tVisit\tVisit\tS\tIP\t19700101\t20991231\t",
    "9202\tOutpatient Visit\tVisit\tVisit\tVisit\tS\tOP\t19700101\t20991231\t",
    "9203\tEmergency Room Visit\tVisit\tVisit\tVisit\tS\tER\t19700101\t20991231\t",
    "1503297\tmetformin\tDrug\tRxNorm\tIngredient\tS\t6809\t19700101\t20991231\t",
    "1503328\tmetformin hydrochloride 500 MG Oral Tablet\tDrug\tRxNorm\tClinical Drug\tS\t861007\t20050101\t20991231\t",
    "32817\tEHR\tType Concept\tType Concept\tType Concept\tS\tOMOP4976890\t20200101\t20991231\t",
]
VOCABULARIES = [
    "vocabulary_id\tvocabulary_name\tvocabulary_reference\tvocabulary_version\tvocabulary_concept_id",
    "None\tOMOP Standardized Vocabularies\tOMOP generated\tv5.0 TEST-RELEASE\t44819096",
    "SNOMED\tSystematic Nomenclature of Medicine - Clinical Terms (IHTSDO)\tSNOMED reference\t2024-03-01 SNOMED\t1",
    "ICD10CM\tICD-10 Clinical Modification\tICD10CM reference\tICD10CM FY2024\t2",
    "LOINC\tLogical Observation Identifiers Names and Codes\tLOINC reference\tLOINC 2.76\t3",
]
RELATIONSHIPS = [
    "concept_id_1\tconcept_id_2\trelationship_id\tvalid_start_date\tvalid_end_date\tinvalid_reason",
    "35207668\t320128\tMaps to\t20071001\t20991231\t",
    "320128\t35207668\tMapped from\t20071001\t20991231\t",
    "45576876\t201826\tMaps to\t20071001\t20991231\t",
    "201826\t45576876\tMapped from\t20071001\t20991231\t",
    "4000001\t320128\tMaps to\t19700101\t20180131\tD",
    "320128\t320128\tMaps to\t19700101\t20991231\t",
    "201826\t201826\tMaps to\t19700101\t20991231\t",
    "1503328\t1503297\tHas ingredient\t20050101\t20991231\t",
]
FILES = {
    "CONCEPT.csv": [CONCEPT_HEADER, *CONCEPTS],
    "VOCABULARY.csv": VOCABULARIES,
    "CONCEPT_RELATIONSHIP.csv": RELATIONSHIPS,
    "DOMAIN.csv": [
        "domain_id\tdomain_name\tdomain_concept_id",
        "Condition\tCondition\t19",
        "Measurement\tMeasurement\t21",
    ],
    "CONCEPT_CLASS.csv": [
        "concept_class_id\tconcept_class_name\tconcept_class_concept_id",
        "Clinical Finding\tClinical Finding\t44819011",
    ],
    "RELATIONSHIP.csv": [
        "relationship_id\trelationship_name\tis_hierarchical\tdefines_ancestry\treverse_relationship_id"
        "\trelationship_concept_id",
        "Maps to\tNon-standard to Standard map (OMOP)\t0\t0\tMapped from\t44818977",
        "Mapped from\tStandard to Non-standard map (OMOP)\t0\t0\tMaps to\t44818978",
    ],
    # Lower-case name on purpose: files are matched case-insensitively.
    "concept_synonym.csv": [
        "concept_id\tconcept_synonym_name\tlanguage_concept_id",
        "320128\tHigh blood pressure\t4180186",
        "320128\tHypertensive disorder, essential\t4180186",
    ],
    "CONCEPT_ANCESTOR.csv": [
        "ancestor_concept_id\tdescendant_concept_id\tmin_levels_of_separation\tmax_levels_of_separation",
        "1503297\t1503328\t1\t1",
        "320128\t320128\t0\t0",
    ],
    "DRUG_STRENGTH.csv": [
        "drug_concept_id\tingredient_concept_id\tamount_value\tamount_unit_concept_id\tnumerator_value"
        "\tnumerator_unit_concept_id\tdenominator_value\tdenominator_unit_concept_id\tbox_size\tvalid_start_date"
        "\tvalid_end_date\tinvalid_reason",
        "1503328\t1503297\t500\t8576\t\t\t\t\t\t20050101\t20991231\t",
    ],
}
EXPECTED_ROWS = {
    "concept": len(CONCEPTS),
    "vocabulary": 4,
    "domain": 2,
    "concept_class": 1,
    "relationship": 2,
    "concept_relationship": len(RELATIONSHIPS) - 1,
    "concept_synonym": 2,
    "concept_ancestor": 2,
    "drug_strength": 1,
}


def write_athena(folder: Path, files: dict[str, list[str]] | None = None) -> Path:
    """Write an Athena-format folder (LF line endings, as Athena ships them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (files or FILES).items():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def counts(engine: Engine, schema: str | None = None) -> dict[str, int]:
    metadata = cdm_metadata(schema)
    with engine.connect() as connection:
        return {
            name: connection.execute(select(func.count()).select_from(cdm_table(metadata, name))).scalar_one()
            for name in EXPECTED_ROWS
        }


def maps_to(engine: Engine, vocabulary_id: str, code: str, schema: str | None = None) -> list[int]:
    """The standard concepts a source code maps to, as the ETL resolves it."""
    metadata = cdm_metadata(schema)
    concept, relationship = cdm_table(metadata, "concept"), cdm_table(metadata, "concept_relationship")
    target = concept.alias("target")
    query = (
        select(target.c.concept_id)
        .select_from(
            concept.join(relationship, relationship.c.concept_id_1 == concept.c.concept_id).join(
                target, target.c.concept_id == relationship.c.concept_id_2
            )
        )
        .where(
            and_(
                concept.c.vocabulary_id == vocabulary_id,
                concept.c.concept_code == code,
                relationship.c.relationship_id == "Maps to",
                relationship.c.invalid_reason.is_(None),
                target.c.standard_concept == "S",
            )
        )
    )
    with engine.connect() as connection:
        return sorted(connection.execute(query).scalars())


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{tmp_path / 'omop.sqlite'}", bulk_load=True)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[tuple[Engine, str]]:
    """A fresh PostgreSQL schema for one test, dropped afterwards."""
    schema = f"twinfed_vocab_{uuid.uuid4().hex[:10]}"
    engine = open_engine(pg_url)
    try:
        yield engine, schema
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def check_loaded(engine: Engine, schema: str | None = None) -> None:
    """The tiny Athena folder is in the database, with dates, NULLs and mappings as Athena means them."""
    assert counts(engine, schema) == EXPECTED_ROWS
    metadata = cdm_metadata(schema)
    concept = cdm_table(metadata, "concept")
    with engine.connect() as connection:
        icd = connection.execute(select(concept).where(concept.c.concept_code == "I10")).one()
        deprecated = connection.execute(select(concept).where(concept.c.concept_id == 4000001)).one()
        quoted = connection.execute(select(concept.c.concept_name).where(concept.c.concept_id == 3012888)).scalar()
        strength = connection.execute(select(cdm_table(metadata, "drug_strength"))).one()
        version = connection.execute(
            select(cdm_table(metadata, "vocabulary").c.vocabulary_version).where(
                cdm_table(metadata, "vocabulary").c.vocabulary_id == "None"
            )
        ).scalar_one()
    assert icd.valid_start_date == dt.date(2007, 10, 1) and icd.valid_end_date == dt.date(2099, 12, 31)
    assert icd.standard_concept is None and icd.invalid_reason is None
    assert deprecated.invalid_reason == "D" and deprecated.valid_end_date == dt.date(2018, 1, 31)
    assert quoted == 'Diastolic "blood" pressure'  # no quoting in Athena files: quotes are data
    assert strength.amount_value == 500 and strength.numerator_value is None and strength.box_size is None
    assert version == "v5.0 TEST-RELEASE"
    assert maps_to(engine, "ICD10CM", "I10", schema) == [320128]
    assert maps_to(engine, "ICD10CM", "E11.9", schema) == [201826]
    assert maps_to(engine, "SNOMED", "1201005", schema) == []  # its only 'Maps to' row is deprecated


# --- Athena load on SQLite -----------------------------------------------------------------------------------


def test_athena_folder_loads_into_sqlite(tmp_path, sqlite_engine):
    folder = write_athena(tmp_path / "athena")
    progress: list[tuple[int, int]] = []
    result = load_athena(sqlite_engine, folder, on_progress=lambda done, total: progress.append((done, total)))
    assert result.rows == EXPECTED_ROWS
    assert result.total_rows == sum(EXPECTED_ROWS.values())
    assert result.missing == [] and result.notes == []
    assert result.seconds > 0 and set(result.table_seconds) == set(EXPECTED_ROWS)
    check_loaded(sqlite_engine)
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert progress[-1] == (total, total) and result.bytes_read == total
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(progress))


def test_reload_replaces_rather_than_duplicates(tmp_path, sqlite_engine):
    folder = write_athena(tmp_path / "athena")
    load_athena(sqlite_engine, folder)
    load_athena(sqlite_engine, folder)
    assert counts(sqlite_engine) == EXPECTED_ROWS
    # A newer release with one concept less: the table holds exactly the new file's rows.
    smaller = dict(FILES, **{"CONCEPT.csv": [CONCEPT_HEADER, *CONCEPTS[:-1]]})
    result = load_athena(sqlite_engine, write_athena(tmp_path / "newer", smaller))
    assert result.rows["concept"] == len(CONCEPTS) - 1
    assert counts(sqlite_engine)["concept"] == len(CONCEPTS) - 1


def test_only_present_files_are_replaced(tmp_path, sqlite_engine):
    load_athena(sqlite_engine, write_athena(tmp_path / "full"))
    only_concepts = write_athena(tmp_path / "only", {"concept.CSV": [CONCEPT_HEADER, *CONCEPTS[:5]]})
    result = load_athena(sqlite_engine, only_concepts)
    assert result.rows == {"concept": 5}
    assert "CONCEPT_RELATIONSHIP.csv" in result.missing
    assert counts(sqlite_engine) == dict(EXPECTED_ROWS, concept=5)


def test_many_chunks_and_extra_columns(tmp_path, sqlite_engine):
    """Rows travel in chunks (here of 3); a column the CDM lacks is ignored and said so."""
    header = CONCEPT_HEADER + "\tlocal_note"
    rows = [f"{line}\tx" for line in CONCEPTS]
    folder = write_athena(tmp_path / "athena", {"CONCEPT.csv": [header, *rows]})
    result = load_athena(sqlite_engine, folder, chunk_rows=3)
    assert result.rows == {"concept": len(CONCEPTS)}
    assert any("local_note" in note for note in result.notes)
    assert counts(sqlite_engine)["concept"] == len(CONCEPTS)


def test_crlf_lines_byte_order_mark_and_iso_dates_are_accepted(tmp_path, sqlite_engine):
    folder = tmp_path / "athena"
    folder.mkdir()
    lines = [CONCEPT_HEADER, CONCEPTS[1].replace("19700101", "1970-01-01")]
    (folder / "CONCEPT.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())  # with a BOM
    load_athena(sqlite_engine, folder)
    concept = cdm_table(cdm_metadata(), "concept")
    with sqlite_engine.connect() as connection:
        row = connection.execute(select(concept)).one()
    assert row.concept_id == 201826 and row.valid_start_date == dt.date(1970, 1, 1) and row.invalid_reason is None


# --- errors --------------------------------------------------------------------------------------------------


def test_missing_concept_file_names_the_folder(tmp_path, sqlite_engine):
    folder = write_athena(tmp_path / "download", {"VOCABULARY.csv": VOCABULARIES})
    with pytest.raises(VocabularyLoadError, match=r"There is no CONCEPT\.csv in") as info:
        load_athena(sqlite_engine, folder)
    assert str(folder) in str(info.value)
    with pytest.raises(VocabularyLoadError, match="is not a folder"):
        load_athena(sqlite_engine, tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("bad_line", "column", "problem"),
    [
        ("320128\tEssential hypertension\tCondition\tSNOMED", None, "4 tab-separated fields where the header has 10"),
        ("32O128\tEssential hypertension\tCondition\tSNOMED\tClinical Finding\tS\t59621000\t19700101\t20991231\t",
         "concept_id", "'32O128' is not an integer"),
        ("320128\tEssential hypertension\tCondition\tSNOMED\tClinical Finding\tS\t59621000\t19700231\t20991231\t",
         "valid_start_date", "'19700231' is not a calendar date"),
        ("320128\tEssential hypertension\tCondition\tSNOMED\tClinical Finding\tS\t59621000\t01/01/1970\t20991231\t",
         "valid_start_date", "not a date in the form YYYYMMDD"),
        ("320128\tEssential hypertension\tCondition\tSNOMED\tClinical Finding\tSS\t59621000\t19700101\t20991231\t",
         "standard_concept", "at most 1"),
    ],
)  # fmt: skip
def test_malformed_line_names_file_line_and_column(tmp_path, sqlite_engine, bad_line, column, problem):
    load_athena(sqlite_engine, write_athena(tmp_path / "good"))
    lines = [CONCEPT_HEADER, *CONCEPTS[:6], bad_line, *CONCEPTS[6:]]
    folder = write_athena(tmp_path / "bad", dict(FILES, **{"CONCEPT.csv": lines}))
    with pytest.raises(AthenaFormatError) as info:
        load_athena(sqlite_engine, folder, chunk_rows=4)  # the bad line is in the second chunk
    message = str(info.value)
    assert message.startswith("CONCEPT.csv, line 8"), message
    assert problem in message
    assert info.value.line == 8 and info.value.column == column
    if column:
        assert f"column {column}" in message
    assert counts(sqlite_engine) == EXPECTED_ROWS  # the previous vocabulary is intact


def test_blank_lines_are_skipped_but_extra_fields_and_bad_bytes_are_not(tmp_path, sqlite_engine):
    blank = write_athena(tmp_path / "blank", {"CONCEPT.csv": [CONCEPT_HEADER, CONCEPTS[1], "", CONCEPTS[2], ""]})
    assert load_athena(sqlite_engine, blank).rows == {"concept": 2}
    extra = write_athena(tmp_path / "extra", {"CONCEPT.csv": [CONCEPT_HEADER, CONCEPTS[1], CONCEPTS[2] + "\tx"]})
    with pytest.raises(AthenaFormatError, match="line 3: the line has 11 tab-separated fields where the header has 10"):
        load_athena(sqlite_engine, extra)
    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "CONCEPT.csv").write_bytes(
        (CONCEPT_HEADER + "\n" + CONCEPTS[1] + "\n").encode()
        + "8507\tMännlich\tGender\tGender\tGender\tS\tM\t19700101\t20991231\t\n".encode("latin-1")
    )
    with pytest.raises(AthenaFormatError, match=r"CONCEPT\.csv, line 3: byte 7 of the line is not UTF-8"):
        load_athena(sqlite_engine, latin1)
    assert counts(sqlite_engine)["concept"] == 2


def test_bad_header_and_empty_concept_file_are_refused(tmp_path, sqlite_engine):
    load_athena(sqlite_engine, write_athena(tmp_path / "good"))
    no_code = [CONCEPT_HEADER.replace("\tconcept_code", "")]
    with pytest.raises(AthenaFormatError, match="line 1, column concept_code: the header lacks"):
        load_athena(sqlite_engine, write_athena(tmp_path / "header", {"CONCEPT.csv": no_code}))
    with pytest.raises(VocabularyLoadError, match="holds no concepts"):
        load_athena(sqlite_engine, write_athena(tmp_path / "empty", {"CONCEPT.csv": [CONCEPT_HEADER]}))
    assert counts(sqlite_engine) == EXPECTED_ROWS


def test_database_refusal_keeps_previous_rows(tmp_path, sqlite_engine):
    """A duplicate primary key in VOCABULARY.csv: the database refuses, the load says where, nothing is lost."""
    load_athena(sqlite_engine, write_athena(tmp_path / "good"))
    duplicated = dict(FILES, **{"VOCABULARY.csv": [*VOCABULARIES, VOCABULARIES[1]]})
    with pytest.raises(VocabularyLoadError, match=r"The database refused VOCABULARY\.csv .*previous contents"):
        load_athena(sqlite_engine, write_athena(tmp_path / "dup", duplicated))
    assert counts(sqlite_engine)["vocabulary"] == EXPECTED_ROWS["vocabulary"]


# --- the bundled subset --------------------------------------------------------------------------------------


def bundled_expectations() -> tuple[int, int, int]:
    catalog = list(bundled_catalog())
    vocabularies = len({"None", *(c.vocabulary_id for c in catalog)})
    standard = sum(1 for c in catalog if c.standard_concept == "S")
    return len(catalog) + 1, vocabularies, standard


def check_bundled(engine: Engine, schema: str | None) -> None:
    metadata = create_cdm(engine, schema)
    concepts, vocabularies, standard = bundled_expectations()
    with engine.begin() as connection:
        assert load_bundled_vocabulary(connection, metadata) == concepts + vocabularies + standard
    with engine.begin() as connection:
        assert load_bundled_vocabulary(connection, metadata) == 0  # a no-op the second time
    concept, vocabulary = cdm_table(metadata, "concept"), cdm_table(metadata, "vocabulary")
    relationship = cdm_table(metadata, "concept_relationship")
    with engine.connect() as connection:
        zero = connection.execute(select(concept).where(concept.c.concept_id == 0)).one()
        n_concepts = connection.execute(select(func.count()).select_from(concept)).scalar_one()
        versions = dict(connection.execute(select(vocabulary.c.vocabulary_id, vocabulary.c.vocabulary_version)).all())
        self_maps = connection.execute(
            select(func.count())
            .select_from(relationship)
            .where(
                relationship.c.relationship_id == "Maps to", relationship.c.concept_id_1 == relationship.c.concept_id_2
            )
        ).scalar_one()
        heart_rate = connection.execute(select(concept).where(concept.c.concept_code == "8867-4")).one()
    assert (zero.concept_name, zero.domain_id, zero.vocabulary_id, zero.concept_class_id) == (
        "No matching concept", "Metadata", "None", "Undefined",
    )  # fmt: skip
    assert zero.standard_concept is None and zero.concept_code == "No matching concept"
    assert n_concepts == concepts
    assert len(versions) == vocabularies and set(versions.values()) == {BUNDLED_VOCABULARY_VERSION}
    assert {"None", "LOINC", "SNOMED", "RxNorm", "UCUM"} <= set(versions)
    assert self_maps == standard
    assert heart_rate.concept_id == 3027018 and heart_rate.valid_start_date == dt.date(1970, 1, 1)
    assert heart_rate.valid_end_date == dt.date(2099, 12, 31) and heart_rate.invalid_reason is None
    assert maps_to(engine, "LOINC", "8867-4", schema) == [3027018]


def test_bundled_vocabulary_fills_an_empty_sqlite_database_once(sqlite_engine):
    check_bundled(sqlite_engine, None)


def test_bundled_vocabulary_never_touches_an_athena_vocabulary(tmp_path, sqlite_engine):
    load_athena(sqlite_engine, write_athena(tmp_path / "athena"))
    with sqlite_engine.begin() as connection:
        assert load_bundled_vocabulary(connection, cdm_metadata()) == 0
    assert counts(sqlite_engine) == EXPECTED_ROWS


def test_athena_replaces_the_bundled_subset(tmp_path, sqlite_engine):
    metadata = create_cdm(sqlite_engine)
    with sqlite_engine.begin() as connection:
        load_bundled_vocabulary(connection, metadata)
    load_athena(sqlite_engine, write_athena(tmp_path / "athena"))
    check_loaded(sqlite_engine)


# --- the command line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["load"], ["status"]])
def test_vocab_commands_have_help(args):
    result = runner.invoke(vocab_app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_cli_load_and_status(tmp_path):
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    folder = write_athena(tmp_path / "athena")
    result = runner.invoke(vocab_app, ["load", str(folder), "--db", url], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "concept_relationship" in result.output and "Vocabulary loaded" in result.output
    result = runner.invoke(vocab_app, ["load", str(folder), "--db", url], env=WIDE)
    assert result.exit_code == 0, result.output

    result = runner.invoke(vocab_app, ["status", "--db", url], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "v5.0 TEST-RELEASE" in result.output
    assert "ICD10CM FY2024" in result.output
    concept_row = next(line for line in result.output.splitlines() if "│ concept " in line)
    assert f"{len(CONCEPTS)}" in concept_row  # counted once: the second load replaced the first


def test_cli_errors_are_sentences_with_exit_status_2(tmp_path):
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(vocab_app, ["load", str(empty), "--db", url], env=WIDE)
    assert result.exit_code == 2 and "There is no CONCEPT.csv" in result.output
    bad = write_athena(tmp_path / "bad", {"CONCEPT.csv": [CONCEPT_HEADER, CONCEPTS[1], "1\tbroken"]})
    result = runner.invoke(vocab_app, ["load", str(bad), "--db", url], env=WIDE)
    assert result.exit_code == 2 and "CONCEPT.csv, line 3" in result.output
    result = runner.invoke(vocab_app, ["status", "--db", f"sqlite:///{tmp_path / 'missing.sqlite'}"])
    assert result.exit_code == 2 and "no database file" in result.output
    result = runner.invoke(vocab_app, ["status", "--db", "not a url"])
    assert result.exit_code == 2 and "is not a database URL" in result.output


# --- PostgreSQL ----------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_athena_folder_loads_into_postgresql(tmp_path, pg_schema):
    engine, schema = pg_schema
    folder = write_athena(tmp_path / "athena")
    result = load_athena(engine, folder, schema=schema)
    assert result.rows == EXPECTED_ROWS
    check_loaded(engine, schema)
    load_athena(engine, folder, schema=schema, chunk_rows=5)
    check_loaded(engine, schema)  # replaced, not duplicated


@pytest.mark.postgres
def test_postgresql_failure_keeps_previous_vocabulary(tmp_path, pg_schema):
    engine, schema = pg_schema
    load_athena(engine, write_athena(tmp_path / "good"), schema=schema)
    bad_date = CONCEPTS[3].replace("19700101", "19701301")
    folder = write_athena(tmp_path / "bad", {"CONCEPT.csv": [CONCEPT_HEADER, *CONCEPTS, bad_date]})
    with pytest.raises(AthenaFormatError, match=rf"CONCEPT\.csv, line {len(CONCEPTS) + 2}, column valid_start_date"):
        load_athena(engine, folder, schema=schema, chunk_rows=5)
    duplicated = dict(FILES, **{"VOCABULARY.csv": [*VOCABULARIES, VOCABULARIES[2]]})
    with pytest.raises(VocabularyLoadError, match=r"The database refused VOCABULARY\.csv"):
        load_athena(engine, write_athena(tmp_path / "dup", duplicated), schema=schema)
    assert counts(engine, schema) == EXPECTED_ROWS


@pytest.mark.postgres
def test_bundled_vocabulary_on_postgresql_schema(pg_schema):
    engine, schema = pg_schema
    check_bundled(engine, schema)


@pytest.mark.postgres
def test_cli_on_postgresql(tmp_path, pg_url, pg_schema):
    _engine, schema = pg_schema
    folder = write_athena(tmp_path / "athena")
    result = runner.invoke(vocab_app, ["load", str(folder), "--db", pg_url, "--schema", schema], env=WIDE)
    assert result.exit_code == 0, result.output
    result = runner.invoke(vocab_app, ["status", "--db", pg_url, "--schema", schema], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "v5.0 TEST-RELEASE" in result.output
    result = runner.invoke(vocab_app, ["status", "--db", pg_url, "--schema", schema + "_none"], env=WIDE)
    assert result.exit_code == 2 and "has no OMOP vocabulary tables" in result.output
