"""Turn batches of raw FHIR records into drafts, in worker processes (no database needed).

A batch is a run of NDJSON lines or the entries of one Bundle. Each record is validated with its
mapper's lean R4B validator straight from the JSON bytes and extracted; the outcome of every record is
kept: pending (it produced drafts; the main process decides loaded/quarantined/excluded), quarantined
(with the rule it broke) or skipped (not something OMOP takes). Nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from omop_etl.fhir.mappers import MAPPERS, Reject, Skip

PENDING, QUARANTINED, SKIPPED = "pending", "quarantined", "skipped"


@dataclass
class Batch:
    """Raw records of one input file: NDJSON lines, or one Bundle's bytes."""

    file_id: int
    file_name: str
    batch_no: int
    kind: str  # "ndjson" | "bundle" | "csv"
    first_position: int
    lines: list[bytes] = field(default_factory=list)
    bundle: bytes | None = None
    type_hint: str | None = None
    header: list[str] | None = None  # CSV extracts: the header row ...
    rows: list[list[str]] = field(default_factory=list)  # ... and the data rows of this batch
    mapping: Any = None  # ... and their column mapping (omop_etl.load.csv_extract.CsvMapping)
    first_of_file: bool = False  # the first batch of its file still to load in this run


@dataclass
class Extracted:
    """The outcome of every record of a batch, and the drafts of the records still pending."""

    file_id: int
    file_name: str
    batch_no: int
    position_kind: str  # "line" | "entry" | "row"
    positions: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    patients: list[str | None] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    rule: list[str | None] = field(default_factory=list)
    detail: list[str | None] = field(default_factory=list)
    raw: dict[int, bytes] = field(default_factory=dict)
    drafts: list[Any] = field(default_factory=list)

    def add(self, position: int, resource_type: str, resource_id: str | None, raw: bytes) -> int:
        self.positions.append(position)
        self.types.append(resource_type)
        self.ids.append(resource_id)
        self.patients.append(None)
        self.status.append(PENDING)
        self.rule.append(None)
        self.detail.append(None)
        index = len(self.positions) - 1
        self.raw[index] = raw
        return index

    def quarantine(self, index: int, rule: str, detail: str) -> None:
        self.status[index] = QUARANTINED
        self.rule[index] = rule
        self.detail[index] = detail

    def skip(self, index: int, reason: str) -> None:
        self.status[index] = SKIPPED
        self.rule[index] = "not_mapped"
        self.detail[index] = reason

    def __len__(self) -> int:
        return len(self.positions)


def _describe(error: ValidationError, limit: int = 3) -> tuple[str, str]:
    """(rule, detail) for a validation error: malformed JSON or the R4 elements that are wrong."""
    errors = error.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        message = next(e["msg"] for e in errors if e["type"] == "json_invalid")
        return "malformed_json", f"not valid JSON ({message})"
    parts = []
    for e in errors[:limit]:
        location = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "(resource)"
        parts.append(f"{location}: {e['msg']}")
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "schema_violation", "FHIR R4: " + "; ".join(parts) + more


def _patient_of(drafts: list) -> str | None:
    for d in drafts:
        ref = getattr(d, "patient_ref", None) or getattr(d, "patient_id", None)
        if ref:
            return ref
    return None


def _extract_one(out: Extracted, index: int, resource_type: str, resource: dict) -> None:
    mapper = MAPPERS[resource_type]
    try:
        drafts = mapper.extract(resource, index)
    except Reject as reject:
        out.quarantine(index, reject.rule, reject.detail)
        return
    except Skip as skip:
        out.skip(index, skip.reason)
        return
    out.patients[index] = _patient_of(drafts)
    out.drafts.extend(drafts)


def _sniff_type(raw: bytes) -> tuple[str | None, str | None, dict | None]:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None, None
    if not isinstance(parsed, dict):
        return None, None, None
    return parsed.get("resourceType"), parsed.get("id"), parsed


def extract_ndjson(batch: Batch) -> Extracted:
    """Validate and extract NDJSON lines; each line is one record."""
    out = Extracted(batch.file_id, batch.file_name, batch.batch_no, "line")
    hint = batch.type_hint
    expected = MAPPERS.get(hint) if hint else None
    for offset, line in enumerate(batch.lines):
        position = batch.first_position + offset
        if not line.strip():
            continue
        resource = None
        if expected is not None:
            try:
                resource = expected.validator.validate_json(line)
                resource_type = hint
            except ValidationError as error:
                rule, detail = _describe(error)
                if rule == "malformed_json":
                    index = out.add(position, hint or "(unknown)", None, line)
                    out.quarantine(index, rule, detail)
                    continue
                actual, resource_id, _ = _sniff_type(line)
                if actual == hint:  # the right type, but invalid
                    index = out.add(position, hint, resource_id, line)
                    out.quarantine(index, rule, detail)
                    continue
                resource = None
        if resource is None:
            actual, resource_id, parsed = _sniff_type(line)
            if parsed is None:
                index = out.add(position, hint or "(unknown)", None, line)
                out.quarantine(index, "malformed_json", "not valid JSON (or not a JSON object)")
                continue
            resource_type = actual or "(missing resourceType)"
            if resource_type not in MAPPERS:
                index = out.add(position, resource_type, resource_id, b"")
                out.skip(index, f"resource type {resource_type} is not mapped to OMOP")
                continue
            try:
                resource = MAPPERS[resource_type].validator.validate_json(line)
            except ValidationError as error:
                index = out.add(position, resource_type, resource_id, line)
                out.quarantine(index, *_describe(error))
                continue
        index = out.add(position, resource_type, resource["id"], line)
        _extract_one(out, index, resource_type, resource)
    for index, status in enumerate(out.status):
        if status != QUARANTINED:
            out.raw.pop(index, None)
    return out


_URN_REFERENCE = re.compile(rb'"reference":"(urn:uuid:[^"]+)"')


def _rewrite_references(raw: bytes, targets: dict[bytes, bytes]) -> bytes:
    """Replace `urn:uuid:` references of a Bundle entry by `Type/id`, in the entry's compact JSON bytes.

    orjson writes `"reference":"..."` without spaces, so one regular expression over the serialised entry
    does what walking the parsed tree would, several times faster.
    """
    if b"urn:uuid:" not in raw:
        return raw
    return _URN_REFERENCE.sub(lambda m: b'"reference":"' + targets.get(m.group(1), m.group(1)) + b'"', raw)


def extract_bundle(batch: Batch) -> Extracted:
    """Validate and extract the entries of one Bundle (transaction, collection, searchset, ...)."""
    out = Extracted(batch.file_id, batch.file_name, batch.batch_no, "entry")
    try:
        bundle = orjson.loads(batch.bundle or b"")
    except orjson.JSONDecodeError as error:
        index = out.add(0, "Bundle", None, (batch.bundle or b"")[:100_000])
        out.quarantine(index, "malformed_json", f"the file is not valid JSON ({error})")
        return out
    if not isinstance(bundle, dict):
        index = out.add(0, "Bundle", None, b"")
        out.quarantine(index, "malformed_json", "the file does not hold a JSON object")
        return out
    # A .json file may also hold a single resource rather than a Bundle.
    entries = bundle.get("entry") or [] if bundle.get("resourceType") == "Bundle" else [{"resource": bundle}]
    targets: dict[bytes, bytes] = {}
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and full_url and resource.get("resourceType"):
            if not resource.get("id") and full_url.startswith("urn:uuid:"):
                resource["id"] = full_url[len("urn:uuid:") :]
            targets[full_url.encode()] = f"{resource['resourceType']}/{resource.get('id')}".encode()
    for number, entry in enumerate(entries, start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            index = out.add(number, "(no resource)", None, b"")
            out.skip(index, "Bundle entry without a resource (e.g. a DELETE request)")
            continue
        resource_type = str(resource.get("resourceType") or "(missing resourceType)")
        resource_id = resource.get("id")
        if resource_type not in MAPPERS:
            index = out.add(number, resource_type, resource_id, b"")
            out.skip(index, f"resource type {resource_type} is not mapped to OMOP")
            continue
        raw = _rewrite_references(orjson.dumps(resource), targets)
        try:
            validated = MAPPERS[resource_type].validator.validate_json(raw)
        except ValidationError as error:
            index = out.add(number, resource_type, resource_id, raw)
            out.quarantine(index, *_describe(error))
            continue
        index = out.add(number, resource_type, validated["id"], raw)
        _extract_one(out, index, resource_type, validated)
    for index, status in enumerate(out.status):
        if status == SKIPPED:  # pending records keep their raw form: the main process may still quarantine them
            out.raw.pop(index, None)
    return out


def extract_batch(batch: Batch) -> Extracted:
    """Worker entry point."""
    if batch.kind == "csv":
        from omop_etl.load.csv_extract import extract_csv

        return extract_csv(batch, batch.mapping)
    return extract_bundle(batch) if batch.kind == "bundle" else extract_ndjson(batch)
