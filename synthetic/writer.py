"""Writes a site's resources the way a FHIR server's Bulk Data `$export` does: one NDJSON file per type.

Records pass through the defect injector on their way out; the writer numbers the lines so every
injected defect can be reported with its file and line, and writes the `$export` manifest last.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson

from synthetic.defects import DefectInjector, DefectRecord, RecordContext

EXPORT_TYPES = (
    "Organization",
    "Location",
    "Patient",
    "Consent",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "MedicationAdministration",
    "Procedure",
)


class BulkExportWriter:
    """Streams resources into `<directory>/<ResourceType>.ndjson`; memory stays flat however large the site."""

    def __init__(self, directory: Path, injector: DefectInjector, base_url: str) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._injector = injector
        self._base_url = base_url
        self._files: dict[str, IO[bytes]] = {
            t: (directory / f"{t}.ndjson").open("wb", buffering=1 << 20) for t in EXPORT_TYPES
        }
        self.lines: dict[str, int] = dict.fromkeys(EXPORT_TYPES, 0)
        self.records: dict[str, int] = dict.fromkeys(EXPORT_TYPES, 0)
        self.defects: list[DefectRecord] = []

    def write(self, resource: dict[str, Any], context: RecordContext | None = None) -> None:
        """Write one record (possibly as a broken line, or twice when it is duplicated)."""
        resource_type = resource["resourceType"]
        handle = self._files[resource_type]
        self.records[resource_type] += 1
        for payload, kind, detail in self._injector.lines(resource, context or RecordContext()):
            handle.write(payload)
            handle.write(b"\n")
            self.lines[resource_type] += 1
            if kind is not None:
                self.defects.append(
                    DefectRecord(
                        kind=kind,
                        resource_type=resource_type,
                        file=f"{resource_type}.ndjson",
                        line=self.lines[resource_type],
                        resource_id=resource["id"],
                        detail=detail,
                    )
                )

    def close(self, transaction_time: str, export_date: dt.date) -> dict[str, Any]:
        """Close the files and write `manifest.json` (the `$export` completion response)."""
        for handle in self._files.values():
            handle.close()
        manifest = {
            "transactionTime": transaction_time,
            "request": f"{self._base_url}/$export?_type={','.join(EXPORT_TYPES)}",
            "requiresAccessToken": True,
            "output": [
                {"type": t, "url": f"{t}.ndjson", "count": self.lines[t]} for t in EXPORT_TYPES if self.lines[t]
            ],
            "error": [],
            "extension": {"exportDate": export_date.isoformat()},
        }
        (self.directory / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        return manifest

    def __enter__(self) -> BulkExportWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._files.values():
            if not handle.closed:
                handle.close()
