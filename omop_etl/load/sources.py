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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from omop_etl.fhir.extract import Batch
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
            files.append(InputFile(path, kind, _type_hint(path.name), stat.st_size, stat.st_mtime_ns))
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
                stamp = orjson.loads(manifest.read_bytes()).get("transactionTime")
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(stamp, str) and len(stamp) >= 10:
                dates.append(stamp[:10])
    return max(dates) if dates else dt.date.today().isoformat()


def fingerprint(source: InputFile) -> str:
    """SHA-256 of the input's bytes (a CSV mapping: of the YAML and the CSV together)."""
    digest = hashlib.sha256()
    for path in (source.path, source.data_path):
        if path is None:
            continue
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb", buffering=1 << 20)


def batches(source: InputFile, file_id: int, batch_size: int, committed: set[int]) -> Iterator[Batch]:
    """Batches of a file; those already committed in an interrupted run are read past, not re-sent."""
    if source.kind == "csv":
        yield from _csv_batches(source, file_id, batch_size, committed)
        return
    if source.kind == "bundle":
        if 0 not in committed:
            with _open(source.path) as handle:
                yield Batch(file_id, str(source.path), 0, "bundle", 1, bundle=handle.read())
        return
    with _open(source.path) as handle:
        batch_no, first, lines = 0, 1, []
        for line in handle:
            lines.append(line)
            if len(lines) >= batch_size:
                if batch_no not in committed:
                    yield Batch(
                        file_id, str(source.path), batch_no, "ndjson", first, lines=lines, type_hint=source.type_hint
                    )
                batch_no, first, lines = batch_no + 1, first + len(lines), []
        if lines and batch_no not in committed:
            yield Batch(file_id, str(source.path), batch_no, "ndjson", first, lines=lines, type_hint=source.type_hint)


def _csv_batches(source: InputFile, file_id: int, batch_size: int, committed: set[int]) -> Iterator[Batch]:
    mapping, csv_path = load_mapping(source.path)
    with csv_path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=mapping.delimiter)
        header = next(reader, [])
        batch_no, first, rows = 0, 1, []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            rows.append(row)
            if len(rows) >= batch_size:
                if batch_no not in committed:
                    yield Batch(
                        file_id, str(csv_path), batch_no, "csv", first, header=header, rows=rows, mapping=mapping
                    )
                batch_no, first, rows = batch_no + 1, first + len(rows), []
        if rows and batch_no not in committed:
            yield Batch(file_id, str(csv_path), batch_no, "csv", first, header=header, rows=rows, mapping=mapping)


def consent_denials(files: list[InputFile]) -> set[str]:
    """Patients (FHIR ids) with an active Consent that denies research use, read ahead of the load.

    Used with --exclude-opted-out to keep those patients out of OMOP altogether. Deliberately
    conservative: a Consent that looks like a research denial counts even if it fails validation later.
    """
    denied: set[str] = set()

    def consider(resource: object) -> None:
        if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
            return
        provision = resource.get("provision") or {}
        scopes = {c.get("code") for c in (resource.get("scope") or {}).get("coding") or [] if isinstance(c, dict)}
        reference = (resource.get("patient") or {}).get("reference") or ""
        if resource.get("status") == "active" and provision.get("type") == "deny" and "research" in scopes:
            denied.add(
                reference[len("urn:uuid:") :] if reference.startswith("urn:uuid:") else reference.rsplit("/", 1)[-1]
            )

    for source in files:
        if source.kind == "csv" or (source.kind == "ndjson" and source.type_hint not in (None, "Consent")):
            continue
        with _open(source.path) as handle:
            if source.kind == "bundle":
                try:
                    bundle = orjson.loads(handle.read())
                except orjson.JSONDecodeError:
                    continue
                for entry in (bundle.get("entry") or []) if isinstance(bundle, dict) else []:
                    consider(entry.get("resource") if isinstance(entry, dict) else None)
                continue
            for line in handle:
                if b"Consent" not in line:
                    continue
                try:
                    consider(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
    denied.discard("")
    return denied
