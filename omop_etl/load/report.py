"""The ETL report: every input record accounted for, and what the load wrote.

input = loaded + quarantined + skipped + excluded, in total and per resource type. The report is
written as JSON (`--report`) and stored with the run in `twinfed_run`; the console shows the same.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, Field


class Tally(BaseModel):
    total: int = 0
    by_resource_type: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def of(cls, counts: Counter) -> Tally:
        return cls(total=sum(counts.values()), by_resource_type=dict(sorted(counts.items())))


class FileOutcome(BaseModel):
    path: str
    kind: str
    status: str = Field(
        description="loaded | resumed | unchanged (loaded by an earlier run) | duplicate (same content "
        "as another input file of this run, loaded once)"
    )
    records: int
    fingerprint: str


class CodeCount(BaseModel):
    system: str
    code: str
    count: int


class UnitCount(BaseModel):
    code: str
    unit: str
    count: int


class EtlReport(BaseModel):
    run_id: int
    database: str
    export_date_limit: str
    input: Tally
    loaded: Tally
    quarantined: Tally
    skipped: Tally
    excluded: Tally
    reconciles: bool
    quarantine_by_rule: dict[str, int]
    skipped_by_reason: dict[str, int]
    excluded_by_reason: dict[str, int]
    rows_by_table: dict[str, int]
    unmapped_codes: list[CodeCount]
    site_mapped_codes: list[CodeCount] = Field(
        default_factory=list,
        description="the most frequent codes mapped by the site's source_to_concept_map (`twinfed vocab map`)",
    )
    site_mapped_events: int = Field(
        0, description="clinical events whose concept came from the site's source_to_concept_map"
    )
    unconverted_units: list[UnitCount]
    unlinked_visit_references: int
    files: list[FileOutcome]
    seconds: float
    records_per_second: float
