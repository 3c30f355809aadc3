"""Look at a FHIR Bulk Data export before loading it: what is in it, and what is already visibly wrong.

Hospital IT runs this on an export folder (or on a synthetic consortium) to see resource counts,
patients, encounter classes, the units each lab arrives in, consent records and lines that are not
JSON at all, without touching a database. It reads every line once, streaming, so it works on exports
far larger than memory.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import orjson
from pydantic import BaseModel

NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")
CONSORTIUM_INDEX = "consortium.json"


class NoExportFound(FileNotFoundError):
    """The path holds no NDJSON export that inspect can read."""


class FileSummary(BaseModel):
    file: str
    bytes: int
    lines: int
    malformed_lines: int
    first_malformed: list[int]
    by_resource_type: dict[str, int]


class CodeUnits(BaseModel):
    system: str
    code: str
    display: str
    count: int
    units: dict[str, int]


class ExportSummary(BaseModel):
    label: str
    directory: str
    files: list[FileSummary]
    resources_by_type: dict[str, int]
    malformed_lines: int
    duplicate_ids: int
    patients: int
    encounters_by_class: dict[str, int]
    first_encounter: str | None
    last_encounter: str | None
    observation_codes: list[CodeUnits]
    consent_provisions: dict[str, int]
    manifest_transaction_time: str | None


def find_exports(path: Path) -> list[tuple[str, Path]]:
    """The export folders under `path`: a consortium's sites, a single export, or export subfolders."""
    if not path.exists():
        raise NoExportFound(f"{path} does not exist.")
    index = path / CONSORTIUM_INDEX
    if index.is_file():
        data = orjson.loads(index.read_bytes())
        return [(site["site_id"], path / site["fhir_export"]) for site in data.get("sites", [])]
    if path.is_dir() and _ndjson_files(path):
        return [(path.name, path)]
    found = sorted(p.parent for p in path.glob("**/*.ndjson*") if p.name.endswith(NDJSON_SUFFIXES))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise NoExportFound(
            f"No FHIR NDJSON files (*.ndjson or *.ndjson.gz) found in {path}. "
            "Point inspect at a Bulk Data export folder or at a folder written by 'twinfed synth'."
        )
    return [(str(p.relative_to(path)) if p != path else p.name, p) for p in unique]


def _ndjson_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(NDJSON_SUFFIXES))


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with _open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def inspect_export(label: str, directory: Path, on_progress: Callable[[int], None] | None = None) -> ExportSummary:
    """Summarise one export folder. `on_progress(bytes_read)` is called as files are read."""
    files: list[FileSummary] = []
    by_type: Counter[str] = Counter()
    seen_ids: set[tuple[str, str]] = set()
    duplicates = 0
    patients: set[str] = set()
    classes: Counter[str] = Counter()
    first_start: str | None = None
    last_start: str | None = None
    codes: dict[tuple[str, str], tuple[str, Counter[str]]] = {}
    provisions: Counter[str] = Counter()
    malformed_total = 0
    for path in _ndjson_files(directory):
        size = path.stat().st_size
        counts: Counter[str] = Counter()
        malformed: list[int] = []
        lines = 0
        for number, line in _lines(path):
            lines += 1
            try:
                resource = orjson.loads(line)
            except orjson.JSONDecodeError:
                malformed.append(number)
                continue
            if not isinstance(resource, dict):
                malformed.append(number)
                continue
            resource_type = str(resource.get("resourceType", "(missing resourceType)"))
            counts[resource_type] += 1
            key = (resource_type, str(resource.get("id")))
            if key in seen_ids:
                duplicates += 1
            else:
                seen_ids.add(key)
            if resource_type == "Patient":
                patients.add(key[1])
            elif resource_type == "Encounter":
                cls = resource.get("class")
                classes[cls.get("code", "?") if isinstance(cls, dict) else "?"] += 1
                start = (resource.get("period") or {}).get("start")
                if isinstance(start, str):
                    first_start = start if first_start is None or start < first_start else first_start
                    last_start = start if last_start is None or start > last_start else last_start
            elif resource_type == "Observation":
                _count_code(resource, codes)
            elif resource_type == "Consent":
                provision = (resource.get("provision") or {}).get("type", "?")
                provisions[f"{provision} ({resource.get('status', '?')})"] += 1
        if on_progress:
            on_progress(size)
        malformed_total += len(malformed)
        by_type.update(counts)
        files.append(
            FileSummary(
                file=path.name,
                bytes=size,
                lines=lines,
                malformed_lines=len(malformed),
                first_malformed=malformed[:5],
                by_resource_type=dict(counts),
            )
        )
    manifest = directory / "manifest.json"
    transaction_time = None
    if manifest.is_file():
        try:
            transaction_time = orjson.loads(manifest.read_bytes()).get("transactionTime")
        except orjson.JSONDecodeError:
            transaction_time = None
    top = sorted(codes.items(), key=lambda item: -sum(item[1][1].values()))
    return ExportSummary(
        label=label,
        directory=str(directory),
        files=files,
        resources_by_type=dict(sorted(by_type.items())),
        malformed_lines=malformed_total,
        duplicate_ids=duplicates,
        patients=len(patients),
        encounters_by_class=dict(classes.most_common()),
        first_encounter=first_start,
        last_encounter=last_start,
        observation_codes=[
            CodeUnits(system=system, code=code, display=display, count=sum(units.values()), units=dict(units))
            for (system, code), (display, units) in top
        ],
        consent_provisions=dict(sorted(provisions.items())),
        manifest_transaction_time=transaction_time,
    )


def _count_code(resource: dict, codes: dict[tuple[str, str], tuple[str, Counter[str]]]) -> None:
    codings = (resource.get("code") or {}).get("coding") or []
    if not codings or not isinstance(codings[0], dict):
        return
    coding = codings[0]
    key = (str(coding.get("system", "")), str(coding.get("code", "")))
    if key not in codes:
        codes[key] = (str(coding.get("display", "")), Counter())
    quantity = resource.get("valueQuantity")
    unit = quantity.get("code", quantity.get("unit", "?")) if isinstance(quantity, dict) else "(components)"
    codes[key][1][str(unit)] += 1


def export_size(directory: Path) -> int:
    """Total bytes of the NDJSON files in an export folder (for progress bars)."""
    return sum(p.stat().st_size for p in _ndjson_files(directory))
