"""Is this database an OMOP CDM v5.4 that a site can train on? The checks behind `twinfed site doctor --db`.

A hospital that already runs OMOP (loaded by its own ETL, not by twinfed) points its site node at it. Before
the first study, hospital IT wants to know, in sentences: are all v5.4 tables and columns there (and which
are missing), what does cdm_source say, does the vocabulary hold the standard concepts the study uses, how
many rows are in the clinical tables, and, when twinfed's ETL loaded the database, is the site secret the
one it was loaded with. Each answer is a finding with a status: ok, warn (works, but look at it) or fail
(a study will not run, or will run on the wrong data). Nothing is written to the database, and a SQLite
path that does not exist is reported instead of being created.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from omop_etl.database import missing_sqlite_file, open_engine, redact
from omop_etl.identity import SecretError, SiteKeys, load_or_create_secret
from omop_etl.load.state import etl_metadata
from omop_etl.load.state import table as etl_table
from omop_etl.schema import CDM_VERSION, cdm_metadata
from omop_etl.schema.inventory import SchemaInventory, take_inventory
from omop_etl.vocabulary.bundled import cdm_table

Status = Literal["ok", "warn", "fail"]

CLINICAL_TABLES = (
    "person", "visit_occurrence", "condition_occurrence", "measurement", "drug_exposure", "observation", "death",
)  # fmt: skip
EXACT_COUNT_LIMIT = 5_000_000  # PostgreSQL: above this (by the planner's statistics) the estimate is shown


class Finding(BaseModel):
    """One check: what was looked at, its status and a sentence hospital IT can act on."""

    name: str
    status: Status
    detail: str


class CdmCheckReport(BaseModel):
    """Everything the OMOP check found; `findings` is what the doctor shows."""

    database: str
    inventory: SchemaInventory | None = None
    cdm_version: str | None = None
    vocabulary_version: str | None = None
    missing_concepts: list[int] = Field(default_factory=list)
    non_standard_concepts: list[int] = Field(default_factory=list)
    row_counts: dict[str, int] = Field(default_factory=dict)
    estimated_counts: list[str] = Field(default_factory=list, description="tables whose count is an estimate")
    secret_fingerprint: str | None = Field(None, description="stored by `twinfed etl` (twinfed_site), if any")
    secret_matches: bool | None = None
    findings: list[Finding] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status != "fail" for f in self.findings)

    def add(self, name: str, status: Status, detail: str) -> None:
        self.findings.append(Finding(name=name, status=status, detail=detail))


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _names(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def stored_secret_fingerprint(connection: Connection, schema: str | None = None) -> str | None:
    """The fingerprint of the secret `twinfed etl` loaded this database with, or None (not loaded by twinfed)."""
    site = etl_table(etl_metadata(schema), "twinfed_site")
    if not inspect(connection).has_table(site.name, schema=schema):
        return None
    return connection.execute(select(site.c.value).where(site.c.key == "secret_fingerprint")).scalar_one_or_none()


def normalised_cdm_version(value: str | None) -> str:
    """'v5.4', 'V5.4.1', '5.4.0' -> '5.4...' (what OHDSI tools write varies)."""
    return (value or "").strip().lstrip("vV").strip()


def check_cdm(
    url: str,
    schema: str | None = None,
    concepts: Mapping[int, str] | None = None,
    secret_file: Path | None = None,
) -> CdmCheckReport:
    """Check the OMOP database at `url`; `concepts` are the standard concept ids a study uses (id -> label).

    Never raises for what it finds: an unreachable database is a failed finding too.
    """
    at = redact(url) + (f" (schema {schema})" if schema else "")
    report = CdmCheckReport(database=at)
    absent = missing_sqlite_file(url)
    if absent is not None:
        report.add(
            "OMOP tables", "fail",
            f"There is no database file {absent}. Check the --db URL (sqlite:///path/to/omop.sqlite); "
            "`twinfed omop init --db URL` creates an empty OMOP database.",
        )  # fmt: skip
        return report
    try:
        engine = open_engine(url)
    except Exception as exc:
        report.add("OMOP tables", "fail", str(exc))
        return report
    try:
        with engine.connect() as connection:
            _run_checks(connection, schema, report, concepts or {}, secret_file)
            connection.rollback()
    except OperationalError as exc:
        report.add("OMOP tables", "fail", f"Cannot read {at}: {_first_line(exc)}. Check the URL and the server.")
    except SQLAlchemyError as exc:
        report.add("OMOP tables", "fail", f"Reading {at} failed: {_first_line(exc)}. Check --db and --schema.")
    finally:
        engine.dispose()
    return report


def _run_checks(
    connection: Connection,
    schema: str | None,
    report: CdmCheckReport,
    concepts: Mapping[int, str],
    secret_file: Path | None,
) -> None:
    if schema and schema not in inspect(connection).get_schema_names():
        report.add(
            "OMOP tables", "fail",
            f"{report.database}: there is no schema {schema}. Name the schema that holds the CDM tables (--schema), "
            "or create one with `twinfed omop init --db URL --schema NAME`.",
        )  # fmt: skip
        return
    inventory = take_inventory(connection, schema)
    report.inventory = inventory
    _tables(report, inventory)
    if not inventory.has_cdm_tables:
        return
    present = set(inventory.present_tables)
    metadata = cdm_metadata(schema)
    if "cdm_source" in present:
        _cdm_source(connection, metadata, report)
    if "concept" in present:
        _concepts(connection, metadata, report, concepts)
    _row_counts(connection, metadata, report, present)
    _secret(connection, schema, report, secret_file)


def _tables(report: CdmCheckReport, inventory: SchemaInventory) -> None:
    where = report.database
    if not inventory.has_cdm_tables:
        others = f" (it has {len(inventory.other_tables)} other table(s))" if inventory.other_tables else ""
        report.add(
            "OMOP tables", "fail",
            f"{where} has no OMOP CDM tables{others}. Check --db and --schema (the schema that holds the CDM "
            "tables), or create an empty OMOP CDM v5.4 schema with `twinfed omop init --db URL`.",
        )  # fmt: skip
        return
    problems = []
    if inventory.missing_tables:
        problems.append(
            f"lacks {len(inventory.missing_tables)} of the 39 CDM v5.4 tables: {_names(inventory.missing_tables)}"
        )
    for table, columns in sorted(inventory.missing_columns.items()):
        problems.append(f"table {table} lacks the column(s) {', '.join(columns)}")
    if problems:
        report.add(
            "OMOP tables", "fail",
            f"{where} is not a complete OMOP CDM v5.4: " + "; ".join(problems) + ". `twinfed omop init --db URL` "
            "adds missing tables; missing columns usually mean an older CDM (5.3), to migrate with OHDSI's "
            "CommonDataModel scripts.",
        )  # fmt: skip
        return
    detail = f"all 39 CDM v5.4 tables with every column ({inventory.dialect})"
    if inventory.missing_indexes:
        report.add(
            "OMOP tables", "warn",
            f"{detail}; {len(inventory.missing_indexes)} OHDSI indexes are missing "
            f"({_names(inventory.missing_indexes)}), so cohorts build slowly: `twinfed omop init --db URL` adds them "
            "without touching the data",
        )  # fmt: skip
    else:
        report.add("OMOP tables", "ok", detail + " and the OHDSI indexes")


def _cdm_source(connection: Connection, metadata, report: CdmCheckReport) -> None:
    source = cdm_table(metadata, "cdm_source")
    rows = connection.execute(
        select(source.c.cdm_source_name, source.c.cdm_version, source.c.vocabulary_version).limit(5)
    ).all()
    if not rows:
        report.add(
            "cdm_source", "warn",
            "cdm_source is empty. The tool that loads the database should write one row saying CDM version 5.4 "
            "(twinfed etl does); OHDSI tools such as Achilles and the DataQualityDashboard read it.",
        )  # fmt: skip
        return
    name, version, vocabulary_version = rows[0]
    report.cdm_version, report.vocabulary_version = version, vocabulary_version
    several = f" ({len(rows)} rows; OHDSI expects one)" if len(rows) > 1 else ""
    if not normalised_cdm_version(version):
        report.add(
            "cdm_source", "warn",
            f"cdm_source ('{name}') does not say which CDM version the database is{several}; set cdm_version to "
            "5.4 after checking that it is one.",
        )  # fmt: skip
    elif not normalised_cdm_version(version).startswith(CDM_VERSION):
        report.add(
            "cdm_source", "fail",
            f"cdm_source says CDM version {version}; twinfed reads OMOP CDM v5.4. Migrate the database to 5.4 "
            "(OHDSI's CommonDataModel scripts) or point --db at the 5.4 copy.",
        )  # fmt: skip
    else:
        vocabulary = f", vocabulary {vocabulary_version}" if vocabulary_version else ""
        status: Status = "warn" if several else "ok"
        report.add("cdm_source", status, f"'{name}', CDM {version}{vocabulary}{several}")


def _concepts(connection: Connection, metadata, report: CdmCheckReport, concepts: Mapping[int, str]) -> None:
    concept = cdm_table(metadata, "concept")
    total = connection.execute(select(func.count()).select_from(select(concept.c.concept_id).limit(1).subquery()))
    if not total.scalar():
        report.add(
            "vocabulary", "fail",
            "The concept table is empty: the database has no OMOP vocabulary. Download the vocabularies from "
            "athena.ohdsi.org (at least SNOMED, LOINC, UCUM) and load them with `twinfed vocab load DIR --db URL`.",
        )  # fmt: skip
        return
    if not concepts:
        report.add("vocabulary", "ok", "the concept table holds concepts (no study given to check its concepts)")
        return
    ids = sorted(concepts)
    found = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for concept_id, standard, invalid in connection.execute(
            select(concept.c.concept_id, concept.c.standard_concept, concept.c.invalid_reason).where(
                concept.c.concept_id.in_(chunk)
            )
        ):
            found[int(concept_id)] = (standard, invalid)
    report.missing_concepts = [c for c in ids if c not in found]
    report.non_standard_concepts = [c for c in ids if c in found and (found[c][0] != "S" or found[c][1])]

    def labelled(items: list[int]) -> str:
        return _names([f"{c} ({concepts[c]})" for c in items], limit=40)  # all of them: each one is to be fixed

    problems = []
    if report.missing_concepts:
        problems.append(
            f"lacks {len(report.missing_concepts)} of the {len(ids)} concepts the study uses: "
            f"{labelled(report.missing_concepts)}"
        )
    if report.non_standard_concepts:
        problems.append(
            f"holds {len(report.non_standard_concepts)} of them as non-standard or invalid concepts: "
            f"{labelled(report.non_standard_concepts)}"
        )
    if problems:
        report.add(
            "vocabulary", "fail",
            "The vocabulary " + "; ".join(problems) + ". Load an Athena vocabulary download with SNOMED, LOINC "
            "and UCUM (`twinfed vocab load DIR --db URL`): the study's features are standard concepts, and data "
            "mapped with another vocabulary would not be found.",
        )  # fmt: skip
        return
    version = f" (vocabulary {report.vocabulary_version})" if report.vocabulary_version else ""
    report.add("vocabulary", "ok", f"all {len(ids)} standard concepts the study uses are present and valid{version}")


def _count(connection: Connection, table, report: CdmCheckReport) -> int:
    if connection.dialect.name == "postgresql":
        schema = table.schema or connection.execute(text("SELECT current_schema()")).scalar_one()
        estimate = connection.execute(
            text(
                "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :schema AND c.relname = :name"
            ),
            {"schema": schema, "name": table.name},
        ).scalar()
        if estimate is not None and estimate > EXACT_COUNT_LIMIT:
            report.estimated_counts.append(table.name)
            return int(estimate)
    return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def _row_counts(connection: Connection, metadata, report: CdmCheckReport, present: set[str]) -> None:
    for name in CLINICAL_TABLES:
        if name in present:
            report.row_counts[name] = _count(connection, cdm_table(metadata, name), report)
    if not report.row_counts:
        return
    shown = ", ".join(
        f"{name} {'~' if name in report.estimated_counts else ''}{count:,}" for name, count in report.row_counts.items()
    )
    if report.row_counts.get("person", 0) == 0:
        report.add("clinical rows", "fail", f"{shown}: there are no persons, so no study can run. Load data first.")
    elif report.row_counts.get("visit_occurrence", 0) == 0:
        report.add("clinical rows", "warn", f"{shown}: no visits, so visit-based cohorts (inpatient stays) are empty")
    else:
        report.add("clinical rows", "ok", shown)


def _secret(connection: Connection, schema: str | None, report: CdmCheckReport, secret_file: Path | None) -> None:
    stored = stored_secret_fingerprint(connection, schema)
    report.secret_fingerprint = stored
    fingerprint = None
    if secret_file is not None:
        try:
            secret, _ = load_or_create_secret(secret_file, create=False)
            fingerprint = SiteKeys(secret).fingerprint
        except SecretError as exc:
            status: Status = "fail" if stored or secret_file.exists() else "warn"
            hint = (
                "" if secret_file.exists() else " `twinfed site init` creates one for a database twinfed did not load."
            )
            report.add("site secret", status, str(exc) + ("" if stored else hint))
            return
    if stored is None:
        if fingerprint is None:
            report.add(
                "site secret", "ok",
                "not loaded by twinfed etl (no secret fingerprint stored); the site secret keys only the site "
                "node's train/test split (`twinfed site init` creates it)",
            )  # fmt: skip
        else:
            report.add(
                "site secret", "ok",
                f"{secret_file} is readable (fingerprint {fingerprint[:12]}); the database was not loaded by twinfed "
                "etl, so the secret keys only the train/test split. Back it up with the database.",
            )  # fmt: skip
        return
    if fingerprint is None:
        report.add(
            "site secret", "warn",
            f"loaded by twinfed etl with the secret of fingerprint {stored[:12]}; pass --secret-file (the site "
            "file's secret_file) to check that the site node uses that secret",
        )  # fmt: skip
        return
    report.secret_matches = fingerprint == stored
    if report.secret_matches:
        report.add("site secret", "ok", f"{secret_file} is the secret twinfed etl loaded this database with "
                   f"(fingerprint {stored[:12]})")  # fmt: skip
    else:
        report.add(
            "site secret", "fail",
            f"{secret_file} (fingerprint {fingerprint[:12]}) is not the secret twinfed etl loaded this database with "
            f"(fingerprint {stored[:12]}). Use the secret file of those loads (twinfed etl --secret-file) in the "
            "site file's secret_file, restoring it from backup if needed.",
        )  # fmt: skip
