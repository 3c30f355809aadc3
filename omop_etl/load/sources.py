"""Find the input files of a load, fingerprint them, and cut them into batches.

Inputs are FHIR Bulk Data NDJSON files (one resource type per file, plain or .gz) and FHIR Bundles
(.json/.json.gz: transaction, collection, searchset). Files are processed in dependency order
(organisations and patients before what refers to them). A file is identified by the SHA-256 of its
content, so a renamed or re-copied file is still recognised as already loaded.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from omop_etl.fhir.json_input import IO_ERRORS, JsonDamage, describe_io_error, read_bundle, read_lines
from omop_etl.load.batches import Batch
from omop_etl.load.csv_extract import is_mapping_file, load_mapping

TYPE_ORDER = (
    "Organization",
    "Location",
    "Practitioner",
    "Patient",
    "Consent",
    "Encounter",
    "Condition",
    "Procedure",
    "Observation",
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationStatement",
    "Immunization",
)
_TOKEN = re.compile(r"[A-Z][A-Za-z]+")


class InputError(ValueError):
    """The input path holds nothing the ETL can read; the message says what was expected."""


@dataclass
class InputFile:
    path: Path
    kind: str  # "ndjson" | "bundle" | "csv" (path is then the YAML mapping)
    type_hint: str | None
    size: int
    mtime_ns: int
    fingerprint: str = ""
    data_path: Path | None = None  # the CSV a mapping describes
    file_id: int = 0  # set when the load plan is made
    resumed: bool = False
    unreadable: str | None = None  # why the file cannot be opened (then it is one quarantined record, every run)

    @property
    def order(self) -> tuple[int, int, str]:
        if self.kind == "csv":
            return (2, 0, str(self.path))
        if self.kind == "bundle":
            return (1, 0, str(self.path))
        rank = TYPE_ORDER.index(self.type_hint) if self.type_hint in TYPE_ORDER else len(TYPE_ORDER)
        return (0, rank, str(self.path))


def _type_hint(name: str) -> str | None:
    for token in _TOKEN.findall(name):
        if token in TYPE_ORDER:
            return token
    return None


def discover(paths: list[Path]) -> list[InputFile]:
    """All NDJSON and Bundle files under the given files or folders, in processing order."""
    files: list[InputFile] = []
    for root in paths:
        if not root.exists():
            raise InputError(f"{root} does not exist.")
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in candidates:
            name = path.name.lower()
            if name.endswith((".ndjson", ".ndjson.gz")):
                kind = "ndjson"
            elif name.endswith((".json", ".json.gz")) and name != "manifest.json":
                kind = "bundle"
            elif name.endswith((".yaml", ".yml")) and is_mapping_file(path):
                _, csv_path = load_mapping(path)
                stat, data = path.stat(), csv_path.stat()
                files.append(
                    InputFile(
                        path,
                        "csv",
                        None,
                        stat.st_size + data.st_size,
                        max(stat.st_mtime_ns, data.st_mtime_ns),
                        data_path=csv_path,
                    )
                )
                continue
            else:
                continue
            stat = path.stat()
            source = InputFile(path, kind, _type_hint(path.name), stat.st_size, stat.st_mtime_ns)
            try:
                path.open("rb").close()
            except OSError as error:
                # Reported as a quarantined record of the file at every run until it can be read; a mark of its
                # own in the ledger (not its size and time) so that the run after the fix reads it.
                source.unreadable = describe_io_error(error)
                source.mtime_ns = -time.time_ns()
            files.append(source)
    if not files:
        raise InputError(
            f"No input found in {', '.join(str(p) for p in paths)}: expected Bulk Data NDJSON files "
            "(*.ndjson, *.ndjson.gz), FHIR Bundles (*.json, *.json.gz) or CSV mappings (*.yaml, see docs/etl.md)."
        )
    return sorted(files, key=lambda f: f.order)


def export_date(paths: list[Path]) -> str:
    """The latest `transactionTime` of any Bulk Data manifest in the inputs, else today (YYYY-MM-DD).

    No event can lie after the moment the data were exported; later dates are impossible.
    """
    dates = []
    for root in paths:
        manifests = [root] if root.name == "manifest.json" else (root.rglob("manifest.json") if root.is_dir() else [])
        for manifest in manifests:
            try:
                parsed = orjson.loads(manifest.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            stamp = parsed.get("transactionTime") if isinstance(parsed, dict) else None
            if isinstance(stamp, str) and len(stamp) >= 10:
                dates.append(stamp[:10])
    return max(dates) if dates else dt.date.today().isoformat()


def fingerprint(source: InputFile) -> str:
    """SHA-256 of the input's bytes (a CSV mapping: of the YAML and the CSV together).

    A file that cannot be read gets a fingerprint of this attempt only: it is then loaded as a new file
    whose one record says why it cannot be read, and any later run tries it again.
    """
    digest = hashlib.sha256()
    try:
        for path in (source.path, source.data_path):
            if path is None:
                continue
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    except OSError as error:
        source.unreadable = source.unreadable or describe_io_error(error)
        source.mtime_ns = source.mtime_ns if source.mtime_ns < 0 else -time.time_ns()
        return hashlib.sha256(f"unreadable {source.path} {source.mtime_ns}".encode()).hexdigest()
    return digest.hexdigest()


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb", buffering=1 << 20)


def batches(source: InputFile, file_id: int, batch_size: int, committed: set[int]) -> Iterator[Batch]:
    """Batches of a file; those already committed in an interrupted run are read past, not re-sent.

    A Bundle is one batch that the worker reads itself, entry by entry (its bytes never cross the process
    boundary). An NDJSON file is cut into runs of lines; a line too long to be a FHIR resource is measured
    and dropped, and damage that ends the file early (a cut-off gzip stream, a read error) ends its last
    batch with a note of it: the lines before are loaded, and the damage is one quarantined record.
    """
    if source.kind == "csv":
        yield from _csv_batches(source, file_id, batch_size, committed)
        return
    if source.kind == "bundle":
        if 0 not in committed:
            yield Batch(file_id, str(source.path), 0, "bundle", 1, size=max(source.size, 0))
        return
    batch_no, first = 0, 1
    lines: list[bytes] = []
    overlong: dict[int, tuple[int, bytes]] = {}

    def cut(damage: tuple[str, str] | None = None) -> Batch:
        return Batch(file_id, str(source.path), batch_no, "ndjson", first, lines=lines, overlong=overlong,
                     damage=damage, type_hint=source.type_hint, size=sum(map(len, lines)))  # fmt: skip

    try:
        if source.unreadable:
            raise JsonDamage("damaged_file", source.unreadable)
        if source.size == 0 and source.path.name.lower().endswith(".gz"):  # gzip reads 0 bytes as an empty stream
            raise JsonDamage("damaged_file", "it is empty (0 bytes), not a gzip file (the copy probably failed)")
        with _open(source.path) as handle:
            for line, length in read_lines(handle):
                if length is not None:  # kept apart: the line itself is no record to store or export
                    overlong[len(lines)], line = (length, line), b""
                lines.append(line)
                if len(lines) >= batch_size:
                    if batch_no not in committed:
                        yield cut()
                    batch_no, first, lines, overlong = batch_no + 1, first + len(lines), [], {}
    except JsonDamage as damage:
        damage_note: tuple[str, str] | None = (damage.rule, damage.reason)
    except IO_ERRORS as error:
        damage_note = ("damaged_file", describe_io_error(error))
    else:
        damage_note = None
    if (lines or damage_note) and batch_no not in committed:
        yield cut(damage_note)


def _csv_batches(source: InputFile, file_id: int, batch_size: int, committed: set[int]) -> Iterator[Batch]:
    """Batches of CSV rows; a file that stops being readable (a read error, a field over the csv module's limit)
    ends with a note of it. Bytes that are not UTF-8 stay in their row (surrogate escapes): extract_csv
    quarantines that row alone."""
    mapping, csv_path = load_mapping(source.path)
    batch_no, first, rows = 0, 1, []
    damage: tuple[str, str] | None = None

    def cut() -> Batch:
        return Batch(file_id, str(csv_path), batch_no, "csv", first, header=header, rows=rows, mapping=mapping,
                     damage=damage)  # fmt: skip

    header: list[str] = []
    try:
        with csv_path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            reader = csv.reader(handle, delimiter=mapping.delimiter)
            header = next(reader, [])
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                rows.append(row)
                if len(rows) >= batch_size:
                    if batch_no not in committed:
                        yield cut()
                    batch_no, first, rows = batch_no + 1, first + len(rows), []
    except (csv.Error, OSError) as error:
        damage = ("damaged_file", describe_io_error(error) if isinstance(error, OSError) else f"{error}")
    if (rows or damage) and batch_no not in committed:
        yield cut()


def _get(value: object, key: str) -> object:
    """value[key] when value is a JSON object, else None: a Consent read ahead of validation may be any shape."""
    return value.get(key) if isinstance(value, dict) else None


def consent_denials(files: list[InputFile]) -> set[str]:
    """Patients (FHIR ids) with an active Consent that denies research use, read ahead of the load.

    Used with --exclude-opted-out to keep those patients out of OMOP altogether. Deliberately
    conservative: a Consent that looks like a research denial counts even if it fails validation later.
    Damaged files are read as far as they go; the load itself reports the damage.
    """
    denied: set[str] = set()

    def consider(resource: object) -> None:
        if _get(resource, "resourceType") != "Consent":
            return
        codings = _get(_get(resource, "scope"), "coding")
        scopes = [_get(c, "code") for c in codings] if isinstance(codings, list) else []
        reference = _get(_get(resource, "patient"), "reference")
        reference = reference if isinstance(reference, str) else ""
        denies = _get(resource, "status") == "active" and _get(_get(resource, "provision"), "type") == "deny"
        if denies and "research" in scopes:
            denied.add(
                reference[len("urn:uuid:") :] if reference.startswith("urn:uuid:") else reference.rsplit("/", 1)[-1]
            )

    for source in files:
        if source.kind == "csv" or source.unreadable:
            continue
        if source.kind == "ndjson" and source.type_hint not in (None, "Consent"):
            continue
        try:
            with _open(source.path) as handle:
                if source.kind == "bundle":
                    for item in read_bundle(handle):
                        if item.kind == "entry":
                            consider(_get(item.value, "resource"))
                    continue
                for line, length in read_lines(handle):
                    if length is not None or b"Consent" not in line:
                        continue
                    try:
                        consider(orjson.loads(line))
                    except orjson.JSONDecodeError:
                        continue
        except (JsonDamage, *IO_ERRORS):
            continue
    denied.discard("")
    return denied
