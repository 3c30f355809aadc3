"""Drafts: what extraction makes of one FHIR record, before references, codes and ids are resolved.

Extraction runs in worker processes and needs no database; a draft therefore carries source
references (FHIR ids) and source codes (system, code), and the main process turns it into OMOP rows.
`record` is the index of the source record within its batch, so a draft that fails resolution takes
its whole record into quarantine (a blood-pressure panel is loaded with both components or not at all).
Dates are ISO strings (`YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS`, local wall-clock time as sent).
"""

from __future__ import annotations

from typing import NamedTuple

Code = tuple[str, str, str]  # (system, code, display) of the coding chosen for mapping


class PersonDraft(NamedTuple):
    record: int
    patient_id: str
    gender: str | None
    birth_date: str | None
    birth_datetime: str | None
    deceased: str | None  # death date-time, or None
    race: tuple[str, str] | None  # (code, display) from the US Core race extension
    ethnicity: tuple[str, str] | None
    organization_ref: str | None
    practitioner_ref: str | None
    mrn: str | None  # medical record number, only ever stored hashed (to join CSV extracts)


class VisitDraft(NamedTuple):
    record: int
    encounter_id: str
    patient_ref: str
    class_code: str | None
    status: str
    start: str
    start_datetime: str | None
    end: str | None
    end_datetime: str | None
    admit_source: str | None
    discharge_disposition: str | None
    organization_ref: str | None
    practitioner_ref: str | None
    locations: tuple[tuple[str, str, str | None, str | None, str | None], ...]
    # (location ref, start date, start datetime, end date, end datetime)


class EventDraft(NamedTuple):
    """A condition, procedure, drug exposure or measurement/observation (the table is chosen later)."""

    record: int
    kind: str  # condition | procedure | drug | observation
    key: str  # source key, e.g. "Observation/abc#8480-6"
    patient_ref: str
    encounter_ref: str | None
    code: Code
    start: str
    start_datetime: str | None
    end: str | None
    end_datetime: str | None
    type_hint: str  # how the fact was recorded: lab, vital, problem-list, prescription, administration, ...
    value: float | None = None
    unit_code: str | None = None
    unit_text: str | None = None
    operator: str | None = None
    value_code: Code | None = None
    value_string: str | None = None
    range_low: float | None = None
    range_high: float | None = None
    quantity: float | None = None
    route: str | None = None
    sig: str | None = None
    refills: int | None = None
    days_supply: int | None = None
    lot_number: str | None = None
    practitioner_ref: str | None = None
    status_concept: str | None = None  # condition clinical status, kept as a source value


class ConsentDraft(NamedTuple):
    record: int
    consent_id: str
    patient_ref: str
    status: str
    provision: str | None  # permit | deny
    scope: str | None
    policy: str | None
    period_start: str | None
    period_end: str | None
    recorded: str | None


class CareSiteDraft(NamedTuple):
    record: int
    kind: str  # Organization | Location
    source_id: str
    name: str | None
    type_code: str | None
    parent_ref: str | None
    city: str | None
    state: str | None
    zip: str | None
    country: str | None


class ProviderDraft(NamedTuple):
    record: int
    practitioner_id: str
    gender: str | None
