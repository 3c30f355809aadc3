"""Turn batches of raw FHIR records into drafts, in worker processes (no database needed).

A batch is a run of NDJSON lines or the entries of one Bundle. Each record is validated with its
mapper's lean R4B validator straight from the JSON bytes and extracted; the outcome of every record is
kept: pending (it produced drafts; the main process decides loaded/quarantined/excluded), quarantined
(with the rule it broke) or skipped (not something OMOP takes). Nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import ValidationError

from omop_etl.fhir.json_input import (
    IO_ERRORS,
    MAX_LINE_BYTES,
    JsonDamage,
    compact,
    describe_io_error,
    duplicate_keys,
    kind_of,
    read_bundle,
    show,
    sniff_prefix,
)
from omop_etl.fhir.mappers import MAPPERS, Reject, Skip
from omop_etl.load.batches import QUARANTINED, SKIPPED, Batch, Extracted


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


def _bad_type_detail(value: Any) -> str:
    return (
        f"resourceType is {kind_of(value)} ({show(value)}), not the name of a FHIR resource type "
        '(a string such as "Patient")'
    )


def _duplicate_detail(keys: list[str], where: str = "") -> str:
    named = ", ".join(f"'{key}'" for key in keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    return (
        f"the key {named} appears more than once in one JSON object{where}; JSON parsers keep only the last value, "
        "so what the record says is ambiguous. Correct the export so each key appears once."
    )


def _refuse(out: Extracted, position: int, kind: str, ident: str | None, line: bytes, rule: str, detail: str,
            parsed: Any = None) -> None:  # fmt: skip
    """Quarantine one line; a repeated key is named first, as it is often why a value looks wrong."""
    index = out.add(position, kind, ident, line)
    duplicates = duplicate_keys(line, parsed) if rule == "schema_violation" else []
    if duplicates:
        rule, detail = "duplicate_key", _duplicate_detail(duplicates)
    out.quarantine(index, rule, detail)


def _ndjson_line(out: Extracted, position: int, line: bytes, hint: str | None, expected: Any) -> None:
    """Validate and extract one NDJSON line; every outcome is recorded in `out`.

    Fast path: the file's type (from its name) validated straight from the bytes. Only a line that fails
    it is parsed on its own, to tell a line of another type, or not JSON at all, from an invalid record.
    """
    failed: ValidationError | None = None
    if expected is not None:
        try:
            resource = expected.validator.validate_json(line)
        except ValidationError as error:
            rule, detail = _describe(error)
            if rule == "malformed_json":
                _refuse(out, position, hint or "(unknown)", None, line, rule, detail)
                return
            failed = error
        else:
            _accept(out, position, hint or "", resource, line, None)
            return
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        _refuse(out, position, hint or "(unknown)", None, line, "malformed_json", f"not valid JSON ({error})")
        return
    if not isinstance(parsed, dict):
        detail = f"the line holds {kind_of(parsed)}, not a JSON object (each NDJSON line must be one FHIR resource)"
        _refuse(out, position, hint or "(unknown)", None, line, "malformed_json", detail)
        return
    actual, resource_id = parsed.get("resourceType"), parsed.get("id")
    resource_id = resource_id if isinstance(resource_id, str) else None
    if actual is not None and not isinstance(actual, str):
        _refuse(out, position, "(invalid resourceType)", resource_id, line, "schema_violation",
                _bad_type_detail(actual), parsed)  # fmt: skip
        return
    resource_type = (actual or "(missing resourceType)")[:64]
    if resource_type not in MAPPERS:
        index = out.add(position, resource_type, resource_id, b"")
        out.skip(index, f"resource type {resource_type} is not mapped to OMOP")
        return
    if failed is None or resource_type != hint:
        try:
            resource = MAPPERS[resource_type].validator.validate_json(line)
        except ValidationError as error:
            failed = error
        else:
            failed = None
    if failed is not None:
        _refuse(out, position, resource_type, resource_id, line, *_describe(failed), parsed)
        return
    _accept(out, position, resource_type, resource, line, parsed)


def _accept(out: Extracted, position: int, resource_type: str, resource: dict, line: bytes, parsed: Any) -> None:
    """A line that passed validation: extracted, unless one of its keys is repeated."""
    index = out.add(position, resource_type, resource["id"], line)
    duplicates = duplicate_keys(line, parsed)
    if duplicates:
        out.quarantine(index, "duplicate_key", _duplicate_detail(duplicates))
        return
    _extract_one(out, index, resource_type, resource)


def extract_ndjson(batch: Batch) -> Extracted:
    """Validate and extract NDJSON lines; each line is one record, and so is damage that ends the file early."""
    out = Extracted(batch.file_id, batch.file_name, batch.batch_no, "line")
    hint = batch.type_hint
    expected = MAPPERS.get(hint) if hint else None
    name = Path(batch.file_name).name
    for offset, line in enumerate(batch.lines):
        position = batch.first_position + offset
        if offset in batch.overlong:
            _overlong(out, position, batch.overlong[offset], hint, name)
        elif line.strip():
            _ndjson_line(out, position, line, hint, expected)
    if batch.damage is not None:
        rule, reason = batch.damage
        position = batch.first_position + len(batch.lines)
        index = out.add(position, hint or "(unknown)", None, b"")
        read = position - 1
        out.quarantine(
            index,
            rule,
            f"{name} cannot be read from line {position} on: {reason}. The {read:,} line(s) before were read; "
            "copy the file again from the export (or fix it) and re-run the load.",
        )
    for index, status in enumerate(out.status):
        if status != QUARANTINED:
            out.raw.pop(index, None)
    return out


def _overlong(out: Extracted, position: int, line: tuple[int, bytes], hint: str | None, name: str) -> None:
    """A line longer than MAX_LINE_BYTES: never parsed; its type is read from its first bytes."""
    length, prefix = line
    resource_type, resource_id = sniff_prefix(prefix)
    resource_type = resource_type or hint or "(unknown)"
    if resource_type not in MAPPERS and resource_type != "(unknown)":
        index = out.add(position, resource_type, resource_id, b"")
        out.skip(index, f"resource type {resource_type} is not mapped to OMOP")
        return
    index = out.add(position, resource_type, resource_id, b"")  # no raw form: a cut-off line is no record to fix
    out.quarantine(
        index,
        "line_too_long",
        f"line {position} of {name} is {length / 2**20:,.1f} MiB long, over the limit of "
        f"{MAX_LINE_BYTES / 2**20:.0f} MiB for one FHIR resource, and was not read (a file without line breaks, "
        "or a resource with a large embedded attachment); check that line of the export.",
    )


_URN_REFERENCE = re.compile(rb'"reference":"(urn:uuid:[^"]+)"')


def _rewrite_references(raw: bytes, targets: dict[bytes, bytes]) -> bytes:
    """Replace `urn:uuid:` references of a Bundle entry by `Type/id`, in the entry's compact JSON bytes.

    orjson writes `"reference":"..."` without spaces, so one regular expression over the serialised entry
    does what walking the parsed tree would, several times faster.
    """
    if b"urn:uuid:" not in raw:
        return raw
    return _URN_REFERENCE.sub(lambda m: b'"reference":"' + targets.get(m.group(1), m.group(1)) + b'"', raw)


@dataclass
class _Entry:
    """A Bundle entry between the two passes: its compact JSON (or why it has none) and its repeated keys."""

    number: int
    raw: bytes | None
    duplicates: list[str]
    problem: str | None = None  # the entry decoded but cannot be written back as JSON (NaN, huge integer, ...)


def _entry_of(number: int, value: Any, duplicates: list[str], targets: dict[bytes, bytes]) -> _Entry:
    """First pass over one entry: note its urn:uuid target, keep its compact bytes, drop its object tree."""
    if isinstance(value, dict):
        resource, full_url = value.get("resource"), value.get("fullUrl")
        if isinstance(resource, dict) and isinstance(full_url, str) and full_url:
            resource_type = resource.get("resourceType")
            if isinstance(resource_type, str) and resource_type:
                if resource.get("id") is None and full_url.startswith("urn:uuid:"):
                    resource["id"] = full_url[len("urn:uuid:") :]
                target = f"{resource_type}/{resource.get('id')}"
                targets[full_url.encode("utf-8", "surrogatepass")] = target.encode("utf-8", "surrogatepass")
    try:
        return _Entry(number, compact(value), duplicates)
    except TypeError as error:  # orjson.JSONEncodeError: NaN/Infinity, an integer beyond 64 bits, a lone surrogate
        return _Entry(number, json.dumps(value, default=repr).encode(), duplicates, f"not valid FHIR JSON ({error})")


def _bundle_entry(out: Extracted, entry: _Entry, targets: dict[bytes, bytes], ambiguous: str | None) -> None:
    """Second pass over one entry: its resource validated and extracted, or the reason it is not."""
    number = entry.number
    if entry.problem is not None:
        index = out.add(number, "(unknown)", None, entry.raw or b"")
        out.quarantine(index, "malformed_json", entry.problem)
        return
    value = orjson.loads(entry.raw or b"null")
    if not isinstance(value, dict):
        index = out.add(number, "(no resource)", None, entry.raw or b"")
        out.quarantine(index, "schema_violation", f"Bundle entry {number} is {kind_of(value)}, not a JSON object")
        return
    resource = value.get("resource")
    if resource is None:
        index = out.add(number, "(no resource)", None, b"")
        out.skip(index, "Bundle entry without a resource (e.g. a DELETE request)")
        return
    if not isinstance(resource, dict):
        index = out.add(number, "(no resource)", None, entry.raw or b"")
        out.quarantine(
            index,
            "schema_violation",
            f"the resource of Bundle entry {number} is {kind_of(resource)}, not a JSON object",
        )
        return
    resource_type = resource.get("resourceType")
    resource_id = resource.get("id") if isinstance(resource.get("id"), str) else None
    if resource_type is not None and not isinstance(resource_type, str):
        index = out.add(number, "(invalid resourceType)", resource_id, entry.raw or b"")
        out.quarantine(index, "schema_violation", _bad_type_detail(resource_type))
        return
    resource_type = (resource_type or "(missing resourceType)")[:64]
    if resource_type not in MAPPERS:
        index = out.add(number, resource_type, resource_id, b"")
        out.skip(index, f"resource type {resource_type} is not mapped to OMOP")
        return
    raw = _rewrite_references(compact(resource), targets)
    full_url = value.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        index = out.add(number, resource_type, resource_id, raw)
        out.quarantine(
            index,
            "schema_violation",
            f"the fullUrl of Bundle entry {number} is {kind_of(full_url)} "
            f"({show(full_url)}), not a URI string, so references to this resource cannot be resolved",
        )
        return
    if entry.duplicates or ambiguous:  # before validation: a repeated key is often why a value looks wrong
        index = out.add(number, resource_type, resource_id, raw)
        out.quarantine(index, "duplicate_key", ambiguous or _duplicate_detail(entry.duplicates, f" of entry {number}"))
        return
    try:
        validated = MAPPERS[resource_type].validator.validate_json(raw)
    except ValidationError as error:
        index = out.add(number, resource_type, resource_id, raw)
        out.quarantine(index, *_describe(error))
        return
    index = out.add(number, resource_type, validated["id"], raw)
    _extract_one(out, index, resource_type, validated)


def _open_bundle(batch: Batch) -> IO[bytes]:
    if batch.bundle is not None:
        return io.BytesIO(batch.bundle)
    path = Path(batch.file_name)
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def extract_bundle(batch: Batch) -> Extracted:
    """Validate and extract the entries of one Bundle (transaction, collection, searchset, ...).

    The file is read once, one entry at a time (json_input.read_bundle): the first pass keeps each entry's
    compact bytes and its `urn:uuid:` fullUrl (references may point forward), the second resolves the
    references, validates and extracts. A .json file may also hold a single resource rather than a Bundle.
    Damage part-way (a cut-off file, text that stops being JSON) keeps the entries before it and becomes one
    quarantined record at the entry where it starts, naming the file.
    """
    out = Extracted(batch.file_id, batch.file_name, batch.batch_no, "entry")
    name = Path(batch.file_name).name
    targets: dict[bytes, bytes] = {}
    entries: list[_Entry] = []
    members: dict[str, Any] = {}
    member_duplicates: list[str] = []
    top_keys: list[str] = []
    not_array: Any = None
    has_entry_array = False
    damage: JsonDamage | None = None
    entries_read = 0
    try:
        with _open_bundle(batch) as handle:
            for item in read_bundle(handle):
                if item.kind != "entry":
                    top_keys.append(item.key or "")
                if item.kind == "member":
                    members[item.key or ""] = item.value
                    member_duplicates.extend(item.duplicates)
                elif item.kind == "entries":
                    has_entry_array = True
                elif item.kind == "entry_not_array":
                    not_array = (item.value,)
                else:
                    entries.append(_entry_of(len(entries) + 1, item.value, item.duplicates, targets))
                    entries_read = len(entries)
    except JsonDamage as error:
        damage = error
    except IO_ERRORS as error:  # opening the file
        damage = JsonDamage("damaged_file", describe_io_error(error))
    repeated = sorted({key for key in top_keys if top_keys.count(key) > 1})
    resource_type = members.get("resourceType")
    if resource_type == "Bundle" or (resource_type is None and (has_entry_array or not_array is not None)):
        if not_array is not None and not entries:
            index = out.add(1, "Bundle", None, b"")
            out.quarantine(
                index,
                "schema_violation",
                f"Bundle.entry in {name} is {kind_of(not_array[0])}, not an array "
                "of entries, so none of the file could be read as records",
            )
        ambiguous = None
        if repeated or member_duplicates:
            keys = repeated or member_duplicates
            ambiguous = (
                _duplicate_detail(keys, f" at the top of the Bundle {name}") + " Nothing of this Bundle is loaded."
            )
        pending = deque(entries)
        entries_read = len(entries)
        entries.clear()  # each entry's bytes go once it is extracted (pending records keep their resource's own)
        while pending:
            _bundle_entry(out, pending.popleft(), targets, ambiguous)
    elif damage is None:  # a single resource cut off part-way is not loaded in part: the damage record stands for it
        resource = dict(members)
        if has_entry_array:  # e.g. a List resource: its entries were read one by one, put them back
            resource["entry"] = [orjson.loads(e.raw) if e.problem is None else None for e in entries]
        single = _entry_of(1, {"resource": resource}, member_duplicates, {})
        _bundle_entry(out, single, {}, _duplicate_detail(repeated, f" of {name}") if repeated else None)
    if damage is not None:
        position = entries_read + 1
        index = out.add(position, "Bundle", None, b"")
        before = f"; the {entries_read:,} entries before were read" if entries_read else ""
        out.quarantine(
            index,
            damage.rule,
            f"{name} cannot be read from entry {position} on: {damage.reason}{before}. "
            "Copy the file again from the export (or fix it) and re-run the load.",
        )
    for index, status in enumerate(out.status):
        if status == SKIPPED:  # pending records keep their raw form: the main process may still quarantine them
            out.raw.pop(index, None)
    return out


