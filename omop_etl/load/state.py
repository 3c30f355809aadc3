"""The ETL's own bookkeeping tables, kept next to the CDM tables (prefix `twinfed_`).

They make loads safe to repeat and to interrupt:

* `twinfed_input_file` / `twinfed_batch`: which input files (by content hash) and which batches of
  them are loaded. A batch's rows and its ledger row commit in one transaction, so a crash leaves no
  half batch and a re-run continues after the last committed one.
* `twinfed_id_map`: source record key (HMAC) -> OMOP table and id, so the same source record always
  gets the same OMOP id and a re-run updates instead of duplicating.
* `twinfed_sequence`: the next id per OMOP table.
* `twinfed_quarantine`: every record that could not be loaded, with file, position, rule and the raw
  record, so a person can fix it and re-run.
* `twinfed_consent`: the research-consent registry the site node reads to exclude patients.
* `twinfed_erasure`: patients erased under the right to erasure (hash only), never loaded again (an
  erasure by person_id records the hash of each MRN too: the id map does not tell them from the id).
* `twinfed_erased_identifier`: the keyed hash of every identifier form of an erased patient (their
  Patient id, their medical record numbers, their encounters' ids), so that a later load recognises
  their records, even broken ones that never name the patient in a resolvable way, and keeps them out
  of OMOP and out of the quarantine.
* `twinfed_site`, `twinfed_run`: the secret fingerprint and the report of every run.

OHDSI tools ignore tables they do not know. None of these tables holds a source identifier in clear.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, LargeBinary, MetaData, String, Table, Text


def etl_metadata(schema: str | None = None) -> MetaData:
    """SQLAlchemy metadata of the bookkeeping tables."""
    metadata = MetaData(schema=schema)
    Table(
        "twinfed_site",
        metadata,
        Column("key", String(64), primary_key=True),
        Column("value", Text, nullable=False),
    )
    Table(
        "twinfed_run",
        metadata,
        Column("run_id", Integer, primary_key=True, autoincrement=False),
        Column("started_at", DateTime, nullable=False),
        Column("finished_at", DateTime),
        Column("status", String(20), nullable=False),
        Column("report", Text),
    )
    Table(
        "twinfed_input_file",
        metadata,
        Column("file_id", Integer, primary_key=True, autoincrement=False),
        Column("fingerprint", String(64), nullable=False, unique=True),
        Column("path", Text, nullable=False),
        Column("size", Integer, nullable=False),
        Column("mtime_ns", String(24), nullable=False),
        Column("kind", String(10), nullable=False),
        Column("status", String(20), nullable=False),
        Column("records", Integer, nullable=False, default=0),
        Column("run_id", Integer, nullable=False),
        Column("completed_at", DateTime),
    )
    Table(
        "twinfed_batch",
        metadata,
        Column("file_id", Integer, primary_key=True, autoincrement=False),
        Column("batch_no", Integer, primary_key=True, autoincrement=False),
        Column("run_id", Integer, nullable=False),
        Column("first_position", Integer, nullable=False),
        Column("last_position", Integer, nullable=False),
        Column("records", Integer, nullable=False),
        Column("counts", Text, nullable=False),  # JSON: status -> resource type -> count
        Column("committed_at", DateTime, nullable=False),
    )
    # One row per loaded source record, so it is kept lean: on SQLite the key is the table's own B-tree
    # (WITHOUT ROWID) and there is no index on person_id (erasure, which is rare, scans the table).
    Table(
        "twinfed_id_map",
        metadata,
        Column("source_key", LargeBinary(16), primary_key=True),
        Column("omop_table", String(40), nullable=False),
        Column("omop_id", Integer, nullable=False),
        Column("person_id", Integer),
        Column("file_id", Integer, nullable=False),
        Column("position", Integer, nullable=False),
        sqlite_with_rowid=False,
    )
    Table(
        "twinfed_sequence",
        metadata,
        Column("omop_table", String(40), primary_key=True),
        Column("next_id", Integer, nullable=False),
    )
    quarantine = Table(
        "twinfed_quarantine",
        metadata,
        Column("quarantine_id", Integer, primary_key=True, autoincrement=False),
        Column("run_id", Integer, nullable=False),
        Column("file_id", Integer, nullable=False),
        Column("file", Text, nullable=False),
        Column("position_kind", String(10), nullable=False),
        Column("position", Integer, nullable=False),
        Column("resource_type", String(64), nullable=False),
        Column("source_key", LargeBinary(16)),
        Column("patient_key", LargeBinary(16)),
        Column("rule", String(40), nullable=False),
        Column("detail", Text, nullable=False),
        Column("raw", Text),
    )
    Index("idx_twinfed_quarantine_patient", quarantine.c.patient_key)
    Index("idx_twinfed_quarantine_file", quarantine.c.file_id, quarantine.c.position)
    consent = Table(
        "twinfed_consent",
        metadata,
        Column("consent_key", LargeBinary(16), primary_key=True),
        Column("patient_key", LargeBinary(16), nullable=False),
        Column("person_id", Integer),
        Column("status", String(20), nullable=False),
        Column("provision", String(10)),
        Column("scope", String(40)),
        Column("policy", String(40)),
        Column("period_start", String(19)),
        Column("period_end", String(19)),
        Column("recorded", String(19)),
        Column("file_id", Integer, nullable=False),
        Column("position", Integer, nullable=False),
    )
    Index("idx_twinfed_consent_patient", consent.c.patient_key)
    Index("idx_twinfed_consent_person", consent.c.person_id)
    Table(
        "twinfed_erasure",
        metadata,
        Column("patient_key", LargeBinary(16), primary_key=True),
        Column("erased_at", DateTime, nullable=False),
    )
    # Added after twinfed_erasure: `twinfed erase` creates it in a database loaded by an earlier twinfed.
    Table(
        "twinfed_erased_identifier",
        metadata,
        Column("identifier_key", LargeBinary(16), primary_key=True),  # keyed hash, as SiteKeys.key makes it
        Column("patient_key", LargeBinary(16), nullable=False),  # the twinfed_erasure row it belongs to
        Column("form", String(20), nullable=False),  # patient | mrn | encounter
    )
    return metadata


def table(metadata: MetaData, name: str) -> Table:
    """The Table called `name` in `metadata`, whatever its schema prefix."""
    for candidate in metadata.tables.values():
        if candidate.name == name:
            return candidate
    raise KeyError(name)
