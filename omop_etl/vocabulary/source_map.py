"""Load a hospital's own code mappings (local code -> standard concept) into `source_to_concept_map`.

The file is the CSV that OHDSI's Usagi writes with "Export source_to_concept_map" (comma-separated, a
header row, dates as YYYY-MM-DD), which has exactly the CDM v5.4 columns: source_code, source_concept_id,
source_vocabulary_id, source_code_description, target_concept_id, target_vocabulary_id, valid_start_date,
valid_end_date, invalid_reason. A hand-written file may leave out the optional columns (source_concept_id
0, target_vocabulary_id from the concept, dates 1970-01-01..2099-12-31, as Usagi writes them).

Every row is checked; a bad row is rejected with the file, the line and the rule it broke, and the good
rows still load, in one transaction. Loading is idempotent: for every (source_vocabulary_id, source_code)
in the file, the rows already in the table are replaced by the file's rows; codes the file does not
mention are left alone.

Which FHIR code system a local vocabulary arrives with (Coding.system) is recorded in the CDM itself:
`--system URI --vocabulary-id ID` writes a `vocabulary` row for ID whose vocabulary_reference is the URI
(vocabulary_version LOCAL_VOCABULARY_VERSION marks it as the site's, so an Athena reload keeps it). The
ETL resolves a system it does not know by that row, or else uses the system text itself as the
vocabulary id when it fits varchar(20) (handy for CSV extracts: `code_system: ASTER-LAB`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy import and_, delete, func, insert, inspect, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from omop_etl.bulk import insert_rows
from omop_etl.database import DatabaseUnavailable, missing_sqlite_file, open_engine, redact
from omop_etl.schema import cdm_metadata
from omop_etl.vocabulary import FHIR_SYSTEM_BY_VOCABULARY, VOCABULARY_BY_FHIR_SYSTEM
from omop_etl.vocabulary.bundled import cdm_table

__all__ = [
    "LOCAL_VOCABULARY_VERSION",
    "RejectedRow",
    "SourceMapError",
    "SourceMapReport",
    "load_source_to_concept_map",
    "local_vocabularies",
]

LOCAL_VOCABULARY_VERSION = "site-local (twinfed vocab map)"
STCM_COLUMNS = (
    "source_code", "source_concept_id", "source_vocabulary_id", "source_code_description", "target_concept_id",
    "target_vocabulary_id", "valid_start_date", "valid_end_date", "invalid_reason",
)  # fmt: skip
DEFAULT_START, DEFAULT_END = dt.date(1970, 1, 1), dt.date(2099, 12, 31)  # what Usagi writes
LIMITS = {"source_code": 50, "source_vocabulary_id": 20, "source_code_description": 255, "target_vocabulary_id": 20}
USAGI_SAVE_COLUMNS = {"sourcecode", "sourcename", "conceptid", "mappingstatus"}


class SourceMapError(ValueError):
    """The file or the database cannot be used at all; the message names it and says what to do."""


class RejectedRow(BaseModel):
    """A row that was not loaded, and why."""

    line: int
    source_code: str
    rule: str
    detail: str
    message: str = Field(description="the whole sentence: file, line, what is wrong and the rule")


class SourceMapReport(BaseModel):
    """What `vocab map` did: rows loaded, replaced and rejected, per vocabulary, and the system registered."""

    file: str
    database: str
    rows_read: int = 0
    loaded: int = 0
    replaced: int = Field(0, description="rows already in the table for the file's codes, replaced by the file")
    rejected: list[RejectedRow] = Field(default_factory=list)
    by_vocabulary: dict[str, int] = Field(default_factory=dict, description="source_vocabulary_id -> rows loaded")
    unchecked_targets: int = Field(
        0, description="rows whose target vocabulary the database holds no concepts of (not checked)"
    )
    to_no_concept: int = Field(0, description="rows with target_concept_id 0 (no standard concept; code stays 0)")
    several_targets: int = Field(0, description="source codes with more than one target (the ETL uses the lowest id)")
    registered_system: str | None = None
    registered_vocabulary_id: str | None = None
    created_tables: list[str] = Field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Row:
    line: int
    values: dict[str, object]


class _Reject(Exception):
    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule, self.detail = rule, detail


def _parse_date(value: str, column: str) -> dt.date:
    text = value.strip()
    try:
        if len(text) == 8 and text.isdigit():
            return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
        return dt.date.fromisoformat(text)
    except ValueError:
        raise _Reject("invalid_date", f"{column} '{value}' is not a date (write YYYY-MM-DD, e.g. 1970-01-01)") from None


def _read(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(lower-cased header, [(line, fields)]) of a comma- or tab-separated file with a header row."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SourceMapError(f"There is no file {path}. Pass the CSV Usagi exported (source_to_concept_map).") from None
    except OSError as exc:
        raise SourceMapError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SourceMapError(
            f"{path}, line {line}: the file is not UTF-8 text. Save it as UTF-8 (Usagi writes UTF-8) and load it again."
        ) from None
    first = content.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, strict=True)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise SourceMapError(f"{path} is empty; it should start with a header row (source_code, ...).") from None
    except csv.Error as exc:
        raise SourceMapError(f"{path}, line 1: the header cannot be read ({exc}).") from None
    rows: list[tuple[int, list[str]]] = []
    try:
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise SourceMapError(
            f"{path}, line {reader.line_num}: the line cannot be read ({exc}); fix the quoting and load the file again."
        ) from None
    return header, rows


def _check_header(path: Path, header: list[str], vocabulary_id: str | None) -> None:
    if set(header) >= USAGI_SAVE_COLUMNS:
        raise SourceMapError(
            f"{path} is a Usagi mapping file (sourceCode, conceptId, mappingStatus, ...), not its "
            "source_to_concept_map export. In Usagi, choose File > Export source_to_concept_map, and load the file "
            "it writes."
        )
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise SourceMapError(f"{path}, line 1: the header names the column {duplicated[0]} twice.")
    required = ["source_code", "target_concept_id"] + ([] if vocabulary_id else ["source_vocabulary_id"])
    missing = [c for c in required if c not in header]
    if missing:
        hint = " (or pass --vocabulary-id)" if missing == ["source_vocabulary_id"] else ""
        raise SourceMapError(
            f"{path}, line 1: the header lacks the column(s) {', '.join(missing)}{hint}. The file should have the "
            f"source_to_concept_map columns Usagi exports: {', '.join(STCM_COLUMNS)}."
        )


def _convert(header: list[str], fields: list[str], vocabulary_id: str | None) -> dict[str, object]:
    """The row's values for the table; raises _Reject naming the rule."""
    if len(fields) != len(header):
        raise _Reject("field_count", f"the line has {len(fields)} fields where the header has {len(header)}")
    given = {name: fields[i].strip() for i, name in enumerate(header) if name in STCM_COLUMNS}
    values: dict[str, object] = {}
    for column in ("source_code", "target_concept_id"):
        if not given.get(column):
            raise _Reject("missing_field", f"{column} is empty")
    file_vocabulary = given.get("source_vocabulary_id", "")
    if vocabulary_id and file_vocabulary and file_vocabulary != vocabulary_id:
        raise _Reject(
            "vocabulary_id_mismatch",
            f"source_vocabulary_id is '{file_vocabulary}' but --vocabulary-id says '{vocabulary_id}'",
        )
    source_vocabulary = file_vocabulary or vocabulary_id or ""
    if not source_vocabulary:
        raise _Reject("missing_field", "source_vocabulary_id is empty (fill it in, or pass --vocabulary-id)")
    values["source_code"] = given["source_code"]
    values["source_vocabulary_id"] = source_vocabulary
    values["source_code_description"] = given.get("source_code_description") or None
    values["target_vocabulary_id"] = given.get("target_vocabulary_id") or None
    for column, text in (
        ("source_concept_id", given.get("source_concept_id") or "0"),
        ("target_concept_id", given["target_concept_id"]),
    ):
        try:
            number = int(text)
        except ValueError:
            raise _Reject("not_an_integer", f"{column} '{text}' is not a whole number (a concept id)") from None
        if number < 0:
            raise _Reject("not_an_integer", f"{column} {number} is negative; concept ids are 0 or more")
        values[column] = number
    for column, limit in LIMITS.items():
        value = values.get(column)
        if isinstance(value, str) and len(value) > limit:
            raise _Reject("too_long", f"{column} has {len(value)} characters; the CDM allows at most {limit}")
    start = _parse_date(given["valid_start_date"], "valid_start_date") if given.get("valid_start_date") else None
    end = _parse_date(given["valid_end_date"], "valid_end_date") if given.get("valid_end_date") else None
    if "valid_start_date" in given and start is None:
        raise _Reject("missing_field", "valid_start_date is empty (Usagi writes 1970-01-01)")
    if "valid_end_date" in given and end is None:
        raise _Reject("missing_field", "valid_end_date is empty (Usagi writes 2099-12-31)")
    start, end = start or DEFAULT_START, end or DEFAULT_END
    if end < start:
        raise _Reject("date_order", f"valid_end_date {end} is before valid_start_date {start}")
    values["valid_start_date"], values["valid_end_date"] = start, end
    invalid = given.get("invalid_reason") or None
    if invalid is not None and invalid not in ("D", "U"):
        raise _Reject("invalid_reason", f"invalid_reason '{invalid}' must be empty (valid), D (deleted) or U (updated)")
    values["invalid_reason"] = invalid
    return values


def _concepts(connection: Connection, concept, ids: list[int]) -> dict[int, tuple[str, str | None, str | None]]:
    """concept_id -> (vocabulary_id, standard_concept, invalid_reason) for the ids the table holds."""
    found = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        query = select(
            concept.c.concept_id, concept.c.vocabulary_id, concept.c.standard_concept, concept.c.invalid_reason
        ).where(concept.c.concept_id.in_(chunk))
        for concept_id, vocabulary, standard, invalid in connection.execute(query):
            found[int(concept_id)] = (vocabulary, standard, invalid)
    return found


def _vocabularies_held(connection: Connection, concept, vocabulary_ids: set[str]) -> set[str]:
    """Which of these vocabularies the concept table holds any concept of (one indexed probe each)."""
    return {
        v
        for v in vocabulary_ids
        if connection.execute(select(concept.c.concept_id).where(concept.c.vocabulary_id == v).limit(1)).first()
    }


def _check_targets(connection: Connection, metadata, rows: list[_Row], report: SourceMapReport, reject) -> list[_Row]:
    """Targets must be valid standard concepts when the vocabulary holds them (their vocabulary is loaded)."""
    present = set(inspect(connection).get_table_names(schema=metadata.schema))
    if "concept" not in present:
        report.unchecked_targets = sum(1 for r in rows if r.values["target_concept_id"])
        return rows
    concept = cdm_table(metadata, "concept")
    ids = sorted({int(r.values["target_concept_id"]) for r in rows if r.values["target_concept_id"]})
    found = _concepts(connection, concept, ids)
    named = {str(r.values["target_vocabulary_id"]) for r in rows if r.values["target_vocabulary_id"]}
    held = _vocabularies_held(connection, concept, named - {found[i][0] for i in found})
    held |= {found[i][0] for i in found}
    kept = []
    for row in rows:
        target = int(row.values["target_concept_id"])
        vocabulary = row.values["target_vocabulary_id"]
        try:
            if target == 0:
                if not vocabulary:
                    row.values["target_vocabulary_id"] = "None"
                report.to_no_concept += 1
            elif target in found:
                concept_vocabulary, standard, invalid = found[target]
                if vocabulary and vocabulary != concept_vocabulary:
                    raise _Reject(
                        "vocabulary_mismatch",
                        f"target_concept_id {target} is a {concept_vocabulary} concept, but target_vocabulary_id "
                        f"says {vocabulary}",
                    )
                if invalid:
                    raise _Reject(
                        "invalid_concept",
                        f"target concept {target} is no longer valid (invalid_reason {invalid}); map to its "
                        "replacement (CONCEPT_RELATIONSHIP 'Concept replaced by')",
                    )
                if standard != "S":
                    kind = "a classification concept" if standard == "C" else "not a standard concept"
                    raise _Reject(
                        "not_standard",
                        f"target concept {target} is {kind}; map to the standard concept it 'Maps to' "
                        "(Athena shows it)",
                    )
                row.values["target_vocabulary_id"] = concept_vocabulary
            elif vocabulary and vocabulary in held:
                raise _Reject(
                    "unknown_concept",
                    f"target concept {target} is not in the database's {vocabulary} vocabulary; check the id, or load "
                    "the vocabulary release it comes from",
                )
            elif not vocabulary:
                raise _Reject(
                    "missing_field",
                    f"target_vocabulary_id is empty and concept {target} is not in the database's vocabulary to "
                    "take it from",
                )
            else:
                report.unchecked_targets += 1
        except _Reject as problem:
            reject(row.line, str(row.values["source_code"]), problem)
            continue
        kept.append(row)
    return kept


def _ensure_tables(connection: Connection, metadata, report: SourceMapReport) -> None:
    present = set(inspect(connection).get_table_names(schema=metadata.schema))
    for name in ("source_to_concept_map", "vocabulary"):
        if name not in present:
            cdm_table(metadata, name).create(connection)
            report.created_tables.append(name)


def _register_system(connection: Connection, metadata, system: str, vocabulary_id: str, where: str) -> None:
    """Record in `vocabulary` that codes of FHIR system `system` belong to `vocabulary_id`."""
    vocabulary = cdm_table(metadata, "vocabulary")
    taken = connection.execute(
        select(vocabulary.c.vocabulary_id).where(
            vocabulary.c.vocabulary_reference == system, vocabulary.c.vocabulary_id != vocabulary_id
        )
    ).first()
    if taken is not None:
        raise SourceMapError(
            f"{where}: the system {system} is already registered for vocabulary {taken[0]}. A system belongs to one "
            f"vocabulary; load this file with --vocabulary-id {taken[0]}, or remove that registration first."
        )
    row = connection.execute(
        select(vocabulary.c.vocabulary_reference, vocabulary.c.vocabulary_version).where(
            vocabulary.c.vocabulary_id == vocabulary_id
        )
    ).first()
    if row is None:
        connection.execute(
            insert(vocabulary).values(
                vocabulary_id=vocabulary_id,
                vocabulary_name=f"{vocabulary_id}: site-local codes of {system}"[:255],
                vocabulary_reference=system,
                vocabulary_version=LOCAL_VOCABULARY_VERSION,
                vocabulary_concept_id=0,
            )
        )
    elif row.vocabulary_reference != system:
        if row.vocabulary_reference and row.vocabulary_version != LOCAL_VOCABULARY_VERSION:
            raise SourceMapError(
                f"{where}: vocabulary {vocabulary_id} already exists with reference {row.vocabulary_reference} "
                f"(version {row.vocabulary_version}), which twinfed did not write; it will not overwrite it. Choose "
                "another --vocabulary-id for the local codes."
            )
        connection.execute(
            update(vocabulary).where(vocabulary.c.vocabulary_id == vocabulary_id).values(vocabulary_reference=system)
        )


def local_vocabularies(connection: Connection, metadata, systems: set[str]) -> dict[str, str]:
    """FHIR system URI -> vocabulary_id, for the systems registered with `vocab map --system` (or by hand)."""
    vocabulary = cdm_table(metadata, "vocabulary")
    found: dict[str, str] = {}
    names = sorted(systems)
    for start in range(0, len(names), 500):
        query = select(vocabulary.c.vocabulary_reference, vocabulary.c.vocabulary_id).where(
            vocabulary.c.vocabulary_reference.in_(names[start : start + 500])
        )
        for reference, vocabulary_id in connection.execute(query.order_by(vocabulary.c.vocabulary_id)):
            found.setdefault(reference, vocabulary_id)
    return found


def _check_options(system: str | None, vocabulary_id: str | None) -> None:
    if vocabulary_id is not None and not 0 < len(vocabulary_id) <= 20:
        raise SourceMapError(f"--vocabulary-id '{vocabulary_id}' must have 1 to 20 characters (varchar(20) in OMOP).")
    if system is None:
        return
    if not system.strip() or len(system) > 255:
        raise SourceMapError(
            "--system must be the Coding.system URI your FHIR resources carry (at most 255 characters)."
        )
    known = VOCABULARY_BY_FHIR_SYSTEM.get(system)
    if known is not None:
        raise SourceMapError(
            f"{system} is the system of {known}, which twinfed already maps through the OMOP vocabulary. --system is "
            f"for the hospital's own code systems; load mappings of {known} codes without --system."
        )
    if vocabulary_id in FHIR_SYSTEM_BY_VOCABULARY or vocabulary_id in set(VOCABULARY_BY_FHIR_SYSTEM.values()):
        raise SourceMapError(
            f"{vocabulary_id} is an OMOP vocabulary with its own FHIR system; give the local code system its own "
            "--vocabulary-id (e.g. ASTER-LAB)."
        )


def load_source_to_concept_map(
    url: str,
    path: Path,
    schema: str | None = None,
    *,
    vocabulary_id: str | None = None,
    system: str | None = None,
) -> SourceMapReport:
    """Check every row of `path` and load the good ones into source_to_concept_map (see the module docstring).

    Raises SourceMapError when the file or the options cannot be used at all, DatabaseUnavailable when the
    database cannot be reached; bad rows are in the report, never raised.
    """
    began = time.perf_counter()
    path = Path(path)
    where = redact(url) + (f" (schema {schema})" if schema else "")
    _check_options(system, vocabulary_id)
    header, lines = _read(path)
    _check_header(path, header, vocabulary_id)
    report = SourceMapReport(file=str(path), database=where, rows_read=len(lines))

    def reject(line: int, code: str, problem: _Reject) -> None:
        message = f"{path.name}, line {line}: {problem.detail} (rule {problem.rule}); the row was not loaded."
        report.rejected.append(
            RejectedRow(line=line, source_code=code, rule=problem.rule, detail=problem.detail, message=message)
        )

    rows: list[_Row] = []
    seen: dict[tuple, int] = {}
    code_of = header.index("source_code")
    for line, fields in lines:
        try:
            values = _convert(header, fields, vocabulary_id)
        except _Reject as problem:
            reject(line, fields[code_of].strip() if code_of < len(fields) else "", problem)
            continue
        key = (
            values["source_vocabulary_id"],
            values["source_code"],
            values["target_concept_id"],
            values["valid_end_date"],
        )  # the table's OMOP primary key
        if key in seen:
            reject(
                line,
                str(values["source_code"]),
                _Reject(
                    "duplicate", f"the same source code, target concept and valid_end_date are on line {seen[key]}"
                ),
            )
            continue
        seen[key] = line
        rows.append(_Row(line, values))
    file_vocabularies = sorted({str(r.values["source_vocabulary_id"]) for r in rows})
    if system is not None and vocabulary_id is None:
        if len(file_vocabularies) != 1:
            raise SourceMapError(
                f"--system {system} needs --vocabulary-id: {path.name} holds "
                + (f"the vocabularies {', '.join(file_vocabularies)}" if file_vocabularies else "no loadable row")
                + ", so which one arrives with that system is not clear."
            )
        vocabulary_id = file_vocabularies[0]
        _check_options(system, vocabulary_id)

    if missing_sqlite_file(url) is not None:
        raise SourceMapError(
            f"There is no database file {missing_sqlite_file(url)}. Check --db, or create the OMOP database first "
            "(`twinfed omop init --db URL`)."
        )
    engine = open_engine(url)
    metadata = cdm_metadata(schema)
    try:
        with engine.begin() as connection:
            _ensure_tables(connection, metadata, report)
            rows = _check_targets(connection, metadata, rows, report, reject)
            if system is not None and vocabulary_id is not None:
                _register_system(connection, metadata, system, vocabulary_id, where)
                report.registered_system, report.registered_vocabulary_id = system, vocabulary_id
            stcm = cdm_table(metadata, "source_to_concept_map")
            codes: dict[str, list[str]] = {}
            for row in rows:
                codes.setdefault(str(row.values["source_vocabulary_id"]), []).append(str(row.values["source_code"]))
            for vocabulary, code_list in codes.items():
                unique = sorted(set(code_list))
                for start in range(0, len(unique), 1000):
                    result = connection.execute(
                        delete(stcm).where(
                            and_(
                                stcm.c.source_vocabulary_id == vocabulary,
                                stcm.c.source_code.in_(unique[start : start + 1000]),
                            )
                        )
                    )
                    report.replaced += int(result.rowcount or 0)
            if rows:
                insert_rows(connection, stcm, [tuple(r.values[c] for c in STCM_COLUMNS) for r in rows], STCM_COLUMNS)
            report.loaded = len(rows)
            for row in rows:
                name = str(row.values["source_vocabulary_id"])
                report.by_vocabulary[name] = report.by_vocabulary.get(name, 0) + 1
            per_code = connection.execute(
                select(func.count()).select_from(
                    select(stcm.c.source_vocabulary_id, stcm.c.source_code)
                    .where(stcm.c.invalid_reason.is_(None), stcm.c.source_vocabulary_id.in_(sorted(codes) or [""]))
                    .group_by(stcm.c.source_vocabulary_id, stcm.c.source_code)
                    .having(func.count() > 1)
                    .subquery()
                )
            ).scalar_one()
            report.several_targets = int(per_code)
    except OperationalError as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["error"])[0]
        raise DatabaseUnavailable(
            f"Cannot use {where}: {reason}. Nothing was loaded; check that the server is running and the URL, "
            "user and --schema are right."
        ) from None
    except SQLAlchemyError as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["error"])[0]
        raise DatabaseUnavailable(
            f"{where} refused the mappings of {path.name}: {reason}. Nothing was loaded; check --db and --schema and "
            "that this user may write source_to_concept_map."
        ) from None
    finally:
        engine.dispose()
    report.rejected.sort(key=lambda r: r.line)
    report.seconds = round(time.perf_counter() - began, 3)
    return report
