"""Load an OHDSI Athena vocabulary download into the CDM vocabulary tables.

A production site downloads the OMOP Standardized Vocabularies from https://athena.ohdsi.org: a folder of
tab-separated files (CONCEPT.csv, CONCEPT_RELATIONSHIP.csv, ...) with a header row, no quoting and dates
as YYYYMMDD. The full download is tens of millions of rows and several GiB, so this loader streams every
file in chunks (memory stays flat whatever the size) and writes with COPY on PostgreSQL.

Each table is replaced in its own transaction: its rows are deleted and the file's rows inserted, and any
error (a malformed line, a database refusal) rolls that table back to the vocabulary it had before. A
malformed line stops the load with a message naming the file, the line and the column, because a
vocabulary with silently missing concepts would map patient data wrongly.
"""

from __future__ import annotations

import csv
import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Column, Date, Integer, Numeric, String, Table, delete, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from omop_etl.bulk import insert_rows, qualified_name
from omop_etl.schema import cdm_metadata, create_cdm
from omop_etl.vocabulary.bundled import cdm_table

__all__ = [
    "ATHENA_FILES",
    "CHUNK_ROWS",
    "AthenaFormatError",
    "AthenaLoadResult",
    "VocabularyLoadError",
    "find_athena_files",
    "load_athena",
]

# CDM table -> Athena file name, in load order. CONCEPT goes first: it is required, and when it fails
# nothing else has been touched.
ATHENA_FILES: dict[str, str] = {
    "concept": "CONCEPT.csv",
    "vocabulary": "VOCABULARY.csv",
    "domain": "DOMAIN.csv",
    "concept_class": "CONCEPT_CLASS.csv",
    "relationship": "RELATIONSHIP.csv",
    "concept_relationship": "CONCEPT_RELATIONSHIP.csv",
    "concept_synonym": "CONCEPT_SYNONYM.csv",
    "concept_ancestor": "CONCEPT_ANCESTOR.csv",
    "drug_strength": "DRUG_STRENGTH.csv",
}

# Files of the CPT4 step of an Athena download (CPT4 names need the site's own UMLS licence).
_CPT4_TOOL_FILES = frozenset({"cpt4.jar", "cpt.sh", "cpt.bat", "concept_cpt4.csv"})

CHUNK_ROWS = 50_000  # rows per insert round trip: large enough for COPY to shine, small enough for memory

ProgressCallback = Callable[[int, int], None]  # (bytes read so far, total bytes of all files to load)


class AthenaFormatError(ValueError):
    """A line of an Athena file cannot be loaded; the message names the file, the line and the column."""

    def __init__(self, path: Path, line: int, column: str | None, problem: str) -> None:
        where = f"{path.name}, line {line}" + (f", column {column}" if column else "")
        super().__init__(
            f"{where}: {problem}. The file is not a valid Athena vocabulary file ({path}); download it again "
            "from athena.ohdsi.org or fix the line. The previous contents of the table were kept."
        )
        self.path, self.line, self.column = path, line, column


class VocabularyLoadError(RuntimeError):
    """The vocabulary cannot be loaded (folder, file or database problem); the message says what to do."""


@dataclass
class AthenaLoadResult:
    """What a load wrote: rows per CDM table, seconds per table and in all, and anything worth a look."""

    directory: Path
    rows: dict[str, int] = field(default_factory=dict)
    table_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_read: int = 0
    missing: list[str] = field(default_factory=list)  # Athena files not in the folder; their tables untouched
    notes: list[str] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def find_athena_files(directory: Path) -> dict[str, Path]:
    """The Athena files present in `directory`, by CDM table; names are matched case-insensitively.

    Raises VocabularyLoadError when the folder does not exist or has no CONCEPT.csv.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise VocabularyLoadError(
            f"{directory} is not a folder. Pass the folder you unzipped the Athena vocabulary download into."
        )
    by_name = {p.name.lower(): p for p in sorted(directory.iterdir()) if p.is_file()}
    found = {t: by_name[f.lower()] for t, f in ATHENA_FILES.items() if f.lower() in by_name}
    if "concept" not in found:
        raise VocabularyLoadError(
            f"There is no CONCEPT.csv in {directory}. Pass the folder you unzipped the Athena vocabulary "
            "download into (it holds CONCEPT.csv, CONCEPT_RELATIONSHIP.csv, VOCABULARY.csv, ...)."
        )
    return found


# --- converters: Athena text -> the Python value the database column takes ------------------------------


def _parse_date(value: str) -> str:
    """YYYYMMDD (Athena) or YYYY-MM-DD -> ISO text; ValueError says what is wrong with the value."""
    digits = value.replace("-", "") if len(value) == 10 and value[4] == value[7] == "-" else value
    if len(digits) != 8 or not digits.isdigit():
        raise ValueError(f"'{value}' is not a date in the form YYYYMMDD")
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        raise ValueError(f"'{value}' is not a calendar date") from None


class _IsoDates(dict):
    """Date text -> ISO text, each distinct value parsed once: a vocabulary has only a few thousand dates."""

    def __missing__(self, value: str) -> str:
        iso = self[value] = _parse_date(value)
        return iso


def _too_long() -> None:
    raise ValueError("value longer than its column allows")


def _row_converter(table: Table, columns: list[str], positions: list[int]) -> Callable[[list[str]], tuple]:
    """One function converting a whole line's fields, generated for this file's columns.

    The full download is over 100 million rows, and a function call per field would double the time spent
    in Python. So the conversion of a line is generated as one expression per column (only column
    positions and length limits, both integers, enter the generated source). It raises ValueError or
    KeyError on any bad field; `_converter` then finds the field and says what is wrong with it, by the
    same rules.
    """
    parts = []
    for name, i in zip(columns, positions, strict=True):
        column, v = table.c[name], f"f[{int(i)}]"
        kind, nullable = column.type, bool(column.nullable)
        if isinstance(kind, Integer):
            value = f"int({v})"
        elif isinstance(kind, Numeric):
            value = f"float({v})"
        elif isinstance(kind, Date):
            value = f"dates[{v}]"  # parsed once per distinct text
        else:
            value = f"({v} or None)" if nullable else v
            if isinstance(kind, String) and kind.length is not None:
                value = f"({value} if len({v}) <= {int(kind.length)} else too_long())"
            parts.append(value)
            continue
        parts.append(f"({value} if {v} else None)" if nullable else value)
    namespace: dict[str, object] = {"dates": _IsoDates(), "too_long": _too_long}
    exec(f"def convert(f):\n    return ({', '.join(parts)},)\n", namespace)  # only integers enter the source
    return namespace["convert"]  # type: ignore[return-value]


def _converter(column: Column) -> Callable[[str], object]:
    """The function turning one field of `column` into its value; raises ValueError on a bad field."""
    nullable = bool(column.nullable)
    kind = column.type
    if isinstance(kind, Integer):

        def to_int(value: str) -> int | None:
            if not value and nullable:
                return None
            if not value:
                raise ValueError("the value is empty but the column is required")
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"'{value}' is not an integer") from None

        return to_int
    if isinstance(kind, Numeric):

        def to_float(value: str) -> float | None:
            if not value and nullable:
                return None
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"'{value}' is not a number") from None

        return to_float
    if isinstance(kind, Date):

        def to_date(value: str) -> str | None:
            if not value and nullable:
                return None
            return _parse_date(value)

        return to_date
    limit = kind.length if isinstance(kind, String) else None

    def to_text(value: str) -> str | None:
        if limit is not None and len(value) > limit:
            raise ValueError(f"the value has {len(value)} characters; the CDM allows at most {limit}")
        if not value and nullable:
            return None
        return value

    return to_text


class _AthenaFile:
    """One Athena file opened for streaming: its checked header, then its converted rows in chunks.

    The header is read and checked on opening, so a wrong file fails before its table is touched. Rows
    are read lazily, one chunk at a time, and the bytes consumed so far are known for the progress bar.
    """

    def __init__(self, path: Path, table: Table, notes: list[str]) -> None:
        self.path = path
        self._raw = path.open("rb")
        try:
            self._reader = csv.reader(self._lines(), delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
            self._read_header(table, notes)
        except BaseException:
            self.close()
            raise

    def _read_header(self, table: Table, notes: list[str]) -> None:
        path = self.path
        try:
            raw_header = next(self._reader)
        except StopIteration:
            raise AthenaFormatError(path, 1, None, "the file is empty; it should start with a header row") from None
        except csv.Error as exc:
            raise AthenaFormatError(path, 1, None, f"the header cannot be read ({exc})") from None
        header = [h.strip().lower() for h in raw_header]
        if header:
            header[0] = header[0].lstrip("\ufeff")  # a byte-order mark, as some editors write
        duplicated = sorted({h for h in header if header.count(h) > 1})
        if duplicated:
            raise AthenaFormatError(path, 1, duplicated[0], "the header names this column twice")
        missing = [c.name for c in table.columns if c.name not in header and not c.nullable]
        if missing:
            raise AthenaFormatError(
                path, 1, missing[0], f"the header lacks the required column(s) {', '.join(missing)} of {table.name}"
            )
        known = {c.name for c in table.columns}
        unknown = [h for h in header if h not in known]
        if unknown:
            notes.append(f"{path.name}: ignored column(s) that {table.name} does not have: {', '.join(unknown)}")
        self._keep = [i for i, h in enumerate(header) if h in known]
        self.columns = [header[i] for i in self._keep]
        self._converters = [_converter(table.c[name]) for name in self.columns]
        self._convert = _row_converter(table, self.columns, self._keep)
        self._width = len(header)

    def _lines(self) -> Iterator[str]:
        """The file's lines as text, decoded one by one so that a bad byte is reported with its line."""
        for number, raw in enumerate(self._raw, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise AthenaFormatError(
                    self.path, number, None,
                    f"byte {exc.start + 1} of the line is not UTF-8 text (Athena files are UTF-8; was the file "
                    "opened and saved in another program?)",
                ) from None  # fmt: skip

    def position(self) -> int:
        """Bytes of the file consumed so far (read ahead by at most one buffer)."""
        return self._raw.tell()

    def chunks(self, size: int) -> Iterator[tuple[int, int, list[tuple]]]:
        """(first line, last line, rows) per chunk of at most `size` converted rows."""
        path, reader, convert, width = self.path, self._reader, self._convert, self._width
        chunk: list[tuple] = []
        first = line = 2
        try:
            for fields in reader:
                try:
                    chunk.append(convert(fields))
                except (ValueError, KeyError, IndexError):
                    line = reader.line_num
                    if not fields or fields == [""]:
                        continue  # a blank line, e.g. at the end of the file
                    raise self._explain(line, fields) from None
                if len(fields) != width:
                    raise AthenaFormatError(
                        path, reader.line_num, None,
                        f"the line has {len(fields)} tab-separated fields where the header has {width}",
                    )  # fmt: skip
                if len(chunk) >= size:
                    line = reader.line_num
                    yield first, line, chunk
                    chunk, first = [], line + 1
        except csv.Error as exc:
            raise AthenaFormatError(path, reader.line_num, None, f"the line cannot be read ({exc})") from None
        if chunk:
            yield first, reader.line_num, chunk

    def _explain(self, line: int, fields: list[str]) -> AthenaFormatError:
        """Say which field of a line that failed conversion is at fault (runs only on the error path)."""
        if len(fields) != self._width:
            return AthenaFormatError(
                self.path,
                line,
                None,
                f"the line has {len(fields)} tab-separated fields where the header has {self._width}",
            )
        for name, i, convert in zip(self.columns, self._keep, self._converters, strict=True):
            try:
                convert(fields[i])
            except ValueError as exc:
                return AthenaFormatError(self.path, line, name, str(exc))
        return AthenaFormatError(self.path, line, None, "the line cannot be read")

    def close(self) -> None:
        self._raw.close()


def _database_reason(exc: BaseException) -> str:
    """The first line of a database error, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _load_table(
    engine: Engine,
    table: Table,
    path: Path,
    notes: list[str],
    on_bytes: Callable[[int], None],
    chunk_rows: int,
    keep: Callable[[Connection], Callable[[Connection], None]] | None = None,
) -> int:
    """Replace the rows of `table` with the rows of `path` in one transaction; returns rows written.

    `keep`, if given, runs before the rows are deleted and returns what to run after the file's rows are in,
    in the same transaction (how the site's own vocabulary rows survive a reload).
    """
    dbapi_error = engine.dialect.loaded_dbapi.Error
    source = _AthenaFile(path, table, notes)
    written = 0
    lines = "its first lines"
    try:
        with engine.begin() as connection:
            restore = keep(connection) if keep is not None else None
            connection.execute(delete(table))
            for first, last, chunk in source.chunks(chunk_rows):
                lines = f"lines {first}-{last}"
                written += insert_rows(connection, table, chunk, source.columns, plain=True)
                on_bytes(source.position())
            if restore is not None:
                restore(connection)
            if written == 0 and table.name == "concept":
                raise VocabularyLoadError(
                    f"{path} holds no concepts, only a header. The concept table was left as it was: the download "
                    "looks incomplete, so download the vocabulary again from athena.ohdsi.org."
                )
    except (SQLAlchemyError, dbapi_error) as exc:
        raise VocabularyLoadError(
            f"The database refused {path.name} ({lines}) for table {table.name}: {_database_reason(exc)}. "
            f"The previous contents of {table.name} were kept."
        ) from None
    finally:
        source.close()
    if engine.dialect.name == "postgresql":
        # Fresh statistics, so the planner uses the concept indexes when the ETL resolves codes.
        with engine.begin() as connection:
            connection.execute(text(f"ANALYZE {qualified_name(table, 'postgresql')}"))
    return written


def _keep_local_vocabularies(metadata, notes: list[str]) -> Callable[[Connection], Callable[[Connection], None]]:
    """The site's own vocabulary rows (`twinfed vocab map --system`) survive replacing the vocabulary table.

    They say which FHIR system a local vocabulary's codes arrive with; Athena's VOCABULARY.csv cannot know
    them. A row of the same id in the download wins (and is noted).
    """
    from omop_etl.vocabulary.source_map import LOCAL_VOCABULARY_VERSION

    vocabulary = cdm_table(metadata, "vocabulary")

    def save(connection: Connection) -> Callable[[Connection], None]:
        kept = [dict(row._mapping) for row in connection.execute(
            select(vocabulary).where(vocabulary.c.vocabulary_version == LOCAL_VOCABULARY_VERSION))]  # fmt: skip

        def restore(connection: Connection) -> None:
            if not kept:
                return
            now = set(connection.execute(select(vocabulary.c.vocabulary_id)).scalars())
            missing = [row for row in kept if row["vocabulary_id"] not in now]
            clashing = sorted(row["vocabulary_id"] for row in kept if row["vocabulary_id"] in now)
            if missing:
                connection.execute(insert(vocabulary), missing)
            if clashing:
                notes.append(
                    "The download has its own VOCABULARY row for the site-local vocabulary id(s) "
                    f"{', '.join(clashing)}; register the FHIR system again with `twinfed vocab map --system`."
                )

        return restore

    return save


def load_athena(
    engine: Engine,
    directory: Path | str,
    schema: str | None = None,
    on_progress: ProgressCallback | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> AthenaLoadResult:
    """Replace the CDM vocabulary tables with the Athena files found in `directory`.

    CONCEPT.csv is required; each other table is replaced only when its file is present. The CDM tables
    are created first when they do not exist yet. Raises AthenaFormatError (a ValueError) for a malformed
    line and VocabularyLoadError for a missing folder or file or a database refusal; tables loaded before
    the failure keep their new rows, the failing table and those after it keep their previous rows.
    `chunk_rows` bounds memory: rows are converted and sent to the database that many at a time.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    began = time.perf_counter()
    directory = Path(directory)
    files = find_athena_files(directory)
    result = AthenaLoadResult(directory=directory)
    result.missing = [f for t, f in ATHENA_FILES.items() if t not in files]
    if any(p.name.lower() in _CPT4_TOOL_FILES for p in directory.iterdir()):
        result.notes.append(
            "The folder holds Athena's CPT4 tool (cpt4.jar / cpt.sh): CPT4 concepts are complete only after that "
            "tool has run with your UMLS API key, as the readme of the download explains. If your data uses CPT4 "
            "codes and you have not run it yet, run it and load the folder again."
        )
    total = sum(p.stat().st_size for p in files.values())
    try:
        create_cdm(engine, schema)
    except SQLAlchemyError as exc:
        raise VocabularyLoadError(
            f"Cannot create the CDM tables{f' in schema {schema}' if schema else ''}: {_database_reason(exc)}. "
            "Check that the database is reachable and the user may create tables."
        ) from None
    metadata = cdm_metadata(schema)
    done = 0
    for table_name, path in files.items():
        table_began = time.perf_counter()

        def on_bytes(position: int, offset: int = done) -> None:
            if on_progress is not None:
                on_progress(offset + position, total)

        keep = _keep_local_vocabularies(metadata, result.notes) if table_name == "vocabulary" else None
        result.rows[table_name] = _load_table(
            engine, cdm_table(metadata, table_name), path, result.notes, on_bytes, chunk_rows, keep
        )
        result.table_seconds[table_name] = time.perf_counter() - table_began
        done += path.stat().st_size
        if on_progress is not None:
            on_progress(done, total)
    result.bytes_read = done
    result.seconds = time.perf_counter() - began
    return result
