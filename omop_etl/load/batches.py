"""The load's unit of work: a batch of raw records of one input file (NDJSON lines, one Bundle, or CSV rows),
and what became of each of its records once extracted (pending, quarantined with its rule, skipped).

Both extractors (FHIR in omop_etl.fhir.extract, CSV in omop_etl.load.csv_extract) fill an `Extracted`; the
pipeline resolves its pending records. Kept apart from either extractor so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# What became of a record: it produced drafts (the main process decides), it broke a rule, or OMOP takes no such record.
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
    overlong: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # NDJSON: line too long -> (length, prefix)
    damage: tuple[str, str] | None = None  # NDJSON: (rule, reason) when the file cannot be read past these lines
    bundle: bytes | None = None  # a Bundle's bytes; None: the worker reads the file (file_name) itself, entry by entry
    size: int = 0  # bytes of input this batch stands for (progress)
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
