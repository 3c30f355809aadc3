"""OMOP rows from resolved drafts: one small function per target table, no state, no database.

The conventions are the OHDSI ones (see docs/etl.md): standard concepts in *_concept_id (0 when
unmapped), source codes in *_source_value and their concepts in *_source_concept_id, type concepts from
how the fact was recorded, dates as local wall-clock time. Ids are filled in by the resolver.
"""

from __future__ import annotations

from typing import Any

from omop_etl.fhir.drafts import CareSiteDraft, EventDraft, PersonDraft, ProviderDraft, VisitDraft
from omop_etl.load.codes import Resolved

GENDER = {"male": 8507, "female": 8532}
RACE = {"2106-3": 8527, "2054-5": 8516, "2028-9": 8515, "1002-5": 8657, "2076-8": 8557}  # CDC race -> OMOP
ETHNICITY = {"2135-2": 38003563, "2186-5": 38003564}
VISIT_CONCEPT = {"IMP": 9201, "ACUTE": 9201, "NONAC": 9201, "AMB": 9202, "EMER": 9203, "OBSENC": 262, "HH": 581476}
TYPE_EHR, TYPE_ENCOUNTER, TYPE_PROBLEM_LIST, TYPE_LAB, TYPE_DERIVED = 32817, 32827, 32840, 32856, 32882
DRUG_TYPE = {
    "prescription": 32838,  # EHR prescription
    "administration": 32818,  # EHR administration record
    "statement": 32865,  # patient self-report
    "immunization": 32818,
    "immunization-reported": 32865,
}
OPERATOR = {"<": 4171756, "<=": 4171754, ">=": 4171755, ">": 4172704}
ID_COLUMN = {
    "person": "person_id",
    "visit_occurrence": "visit_occurrence_id",
    "visit_detail": "visit_detail_id",
    "condition_occurrence": "condition_occurrence_id",
    "drug_exposure": "drug_exposure_id",
    "procedure_occurrence": "procedure_occurrence_id",
    "measurement": "measurement_id",
    "observation": "observation_id",
    "care_site": "care_site_id",
    "location": "location_id",
    "provider": "provider_id",
}
DOMAIN_TABLE = {
    "Condition": "condition_occurrence",
    "Procedure": "procedure_occurrence",
    "Drug": "drug_exposure",
    "Measurement": "measurement",
    "Observation": "observation",
}
DEFAULT_TABLE = {"condition": "condition_occurrence", "procedure": "procedure_occurrence", "drug": "drug_exposure"}

Row = dict[str, Any]


def cut(value: str | None, length: int) -> str | None:
    """Fit a source value into a varchar(n) column."""
    return value if value is None or len(value) <= length else value[:length]


def target_table(draft: EventDraft, concept: Resolved) -> str:
    """Route an event by its concept's domain (OHDSI convention); unmapped codes by what the source says."""
    if draft.kind == "drug":
        return "drug_exposure"
    table = DOMAIN_TABLE.get(concept.domain)
    if table is not None:
        return table
    if draft.kind == "observation":
        return "measurement" if draft.type_hint in ("vital", "lab") else "observation"
    return DEFAULT_TABLE.get(draft.kind, "observation")


def location_row(d: CareSiteDraft) -> Row | None:
    if not any((d.city, d.state, d.zip, d.country)):
        return None
    return {
        "address_1": None,
        "address_2": None,
        "city": cut(d.city, 50),
        "state": cut(d.state, 2),
        "zip": cut(d.zip, 9),
        "county": None,
        "location_source_value": cut(d.name, 50),
        "country_concept_id": None,
        "country_source_value": cut(d.country, 80),
        "latitude": None,
        "longitude": None,
    }


def care_site_row(d: CareSiteDraft) -> Row:
    return {
        "care_site_name": cut(d.name, 255),
        "place_of_service_concept_id": 0,
        "location_id": None,
        "care_site_source_value": cut(f"{d.kind}/{d.source_id}", 50),
        "place_of_service_source_value": cut(d.type_code, 50),
    }


def provider_row(d: ProviderDraft, source_value: str) -> Row:
    return {
        "provider_name": None,
        "npi": None,
        "dea": None,
        "specialty_concept_id": None,
        "care_site_id": None,
        "year_of_birth": None,
        "gender_concept_id": GENDER.get(d.gender or "", 0),
        "provider_source_value": cut(source_value, 50),
        "specialty_source_value": None,
        "specialty_source_concept_id": None,
        "gender_source_value": cut(d.gender, 50),
        "gender_source_concept_id": 0,
    }


def person_row(d: PersonDraft, source_value: str, provider_id: int | None, care_site_id: int | None) -> Row:
    year, month, day = (int(p) for p in (d.birth_date or "").split("-"))
    return {
        "gender_concept_id": GENDER.get(d.gender or "", 0),
        "year_of_birth": year,
        "month_of_birth": month,
        "day_of_birth": day,
        "birth_datetime": d.birth_datetime,
        "race_concept_id": RACE.get(d.race[0], 0) if d.race else 0,
        "ethnicity_concept_id": ETHNICITY.get(d.ethnicity[0], 0) if d.ethnicity else 0,
        "location_id": None,
        "provider_id": provider_id,
        "care_site_id": care_site_id,
        "person_source_value": source_value,
        "gender_source_value": cut(d.gender, 50),
        "gender_source_concept_id": 0,
        "race_source_value": cut(d.race[0], 50) if d.race else None,
        "race_source_concept_id": 0,
        "ethnicity_source_value": cut(d.ethnicity[0], 50) if d.ethnicity else None,
        "ethnicity_source_concept_id": 0,
    }


def death_row(d: PersonDraft) -> Row | None:
    if not d.deceased:
        return None
    return {
        "death_date": d.deceased[:10],
        "death_datetime": d.deceased if len(d.deceased) > 10 else None,
        "death_type_concept_id": TYPE_EHR,
        "cause_concept_id": None,
        "cause_source_value": None,
        "cause_source_concept_id": None,
    }


def visit_rows(
    d: VisitDraft,
    person_id: int,
    end_of_data: str,
    care_site_id: int | None,
    provider_id: int | None,
    location_sites: list[int | None],
) -> tuple[Row, list[Row]]:
    """The visit_occurrence row and one visit_detail row per location stay."""
    end = d.end or (d.start if d.status == "finished" else max(d.start, end_of_data))
    end_datetime = d.end_datetime if d.end else None
    concept = VISIT_CONCEPT.get(d.class_code or "", 0)
    visit = {
        "person_id": person_id,
        "visit_concept_id": concept,
        "visit_start_date": d.start,
        "visit_start_datetime": d.start_datetime,
        "visit_end_date": end,
        "visit_end_datetime": end_datetime,
        "visit_type_concept_id": TYPE_ENCOUNTER,
        "provider_id": provider_id,
        "care_site_id": care_site_id,
        "visit_source_value": cut(d.class_code, 50),
        "visit_source_concept_id": 0,
        "admitted_from_concept_id": 0 if d.admit_source else None,
        "admitted_from_source_value": cut(d.admit_source, 50),
        "discharged_to_concept_id": 0 if d.discharge_disposition else None,
        "discharged_to_source_value": cut(d.discharge_disposition, 50),
        "preceding_visit_occurrence_id": None,
    }
    details = []
    for (_, start, start_dt, stay_end, stay_end_dt), site in zip(d.locations, location_sites, strict=True):
        details.append(
            {
                "person_id": person_id,
                "visit_detail_concept_id": concept,
                "visit_detail_start_date": start,
                "visit_detail_start_datetime": start_dt,
                "visit_detail_end_date": stay_end or end,
                "visit_detail_end_datetime": stay_end_dt if stay_end else end_datetime,
                "visit_detail_type_concept_id": TYPE_ENCOUNTER,
                "provider_id": None,
                "care_site_id": site,
                "visit_detail_source_value": None,
                "visit_detail_source_concept_id": 0,
                "admitted_from_concept_id": None,
                "admitted_from_source_value": None,
                "discharged_to_source_value": None,
                "discharged_to_concept_id": None,
                "preceding_visit_detail_id": None,
                "parent_visit_detail_id": None,
                "visit_occurrence_id": None,
            }
        )
    return visit, details


def condition_row(d: EventDraft, c: Resolved, person_id: int, visit_id: int | None, provider_id: int | None) -> Row:
    return {
        "person_id": person_id,
        "condition_concept_id": c.concept_id,
        "condition_start_date": d.start,
        "condition_start_datetime": d.start_datetime,
        "condition_end_date": d.end,
        "condition_end_datetime": d.end_datetime,
        "condition_type_concept_id": TYPE_PROBLEM_LIST if d.type_hint == "problem-list" else TYPE_ENCOUNTER,
        "condition_status_concept_id": None,  # status concepts are not in the bundled vocabulary
        "stop_reason": None,
        "provider_id": provider_id,
        # a problem-list entry is history recorded at a visit, not something that happened during it
        "visit_occurrence_id": None if d.type_hint == "problem-list" else visit_id,
        "visit_detail_id": None,
        "condition_source_value": cut(d.code[1], 50),
        "condition_source_concept_id": c.source_concept_id,
        "condition_status_source_value": cut(d.status_concept, 50),
    }


def procedure_row(d: EventDraft, c: Resolved, person_id: int, visit_id: int | None, provider_id: int | None) -> Row:
    return {
        "person_id": person_id,
        "procedure_concept_id": c.concept_id,
        "procedure_date": d.start,
        "procedure_datetime": d.start_datetime,
        "procedure_end_date": d.end,
        "procedure_end_datetime": d.end_datetime,
        "procedure_type_concept_id": TYPE_EHR,
        "modifier_concept_id": None,
        "quantity": None,
        "provider_id": provider_id,
        "visit_occurrence_id": visit_id,
        "visit_detail_id": None,
        "procedure_source_value": cut(d.code[1], 50),
        "procedure_source_concept_id": c.source_concept_id,
        "modifier_source_value": None,
    }


def drug_row(d: EventDraft, c: Resolved, person_id: int, visit_id: int | None, provider_id: int | None) -> Row:
    return {
        "person_id": person_id,
        "drug_concept_id": c.concept_id,
        "drug_exposure_start_date": d.start,
        "drug_exposure_start_datetime": d.start_datetime,
        "drug_exposure_end_date": d.end or d.start,
        "drug_exposure_end_datetime": d.end_datetime,
        "verbatim_end_date": d.end if d.type_hint == "prescription" else None,
        "drug_type_concept_id": DRUG_TYPE.get(d.type_hint, TYPE_EHR),
        "stop_reason": None,
        "refills": d.refills,
        "quantity": d.quantity,
        "days_supply": d.days_supply,
        "sig": d.sig,
        "route_concept_id": 0 if d.route else None,
        "lot_number": cut(d.lot_number, 50),
        "provider_id": provider_id,
        "visit_occurrence_id": visit_id,
        "visit_detail_id": None,
        "drug_source_value": cut(d.code[1], 50),
        "drug_source_concept_id": c.source_concept_id,
        "route_source_value": cut(d.route, 50),
        "dose_unit_source_value": None,
    }


def measurement_row(
    d: EventDraft,
    c: Resolved,
    person_id: int,
    visit_id: int | None,
    provider_id: int | None,
    value: float | None,
    unit: Resolved | None,
    value_concept: int | None,
) -> Row:
    return {
        "person_id": person_id,
        "measurement_concept_id": c.concept_id,
        "measurement_date": d.start,
        "measurement_datetime": d.start_datetime,
        "measurement_time": None,
        "measurement_type_concept_id": TYPE_LAB if d.type_hint == "lab" else TYPE_EHR,
        "operator_concept_id": OPERATOR.get(d.operator or ""),
        "value_as_number": value,
        "value_as_concept_id": value_concept,
        "unit_concept_id": unit.concept_id if unit else None,
        "range_low": d.range_low,
        "range_high": d.range_high,
        "provider_id": provider_id,
        "visit_occurrence_id": visit_id,
        "visit_detail_id": None,
        "measurement_source_value": cut(d.code[1], 50),
        "measurement_source_concept_id": c.source_concept_id,
        "unit_source_value": cut(d.unit_code or d.unit_text, 50),
        "unit_source_concept_id": unit.source_concept_id if unit else None,
        "value_source_value": cut(_value_source(d), 50),
        "measurement_event_id": None,
        "meas_event_field_concept_id": None,
    }


def observation_row(
    d: EventDraft,
    c: Resolved,
    person_id: int,
    visit_id: int | None,
    provider_id: int | None,
    value: float | None,
    unit: Resolved | None,
    value_concept: int | None,
) -> Row:
    return {
        "person_id": person_id,
        "observation_concept_id": c.concept_id,
        "observation_date": d.start,
        "observation_datetime": d.start_datetime,
        "observation_type_concept_id": TYPE_EHR,
        "value_as_number": value,
        "value_as_string": cut(d.value_string, 60),
        "value_as_concept_id": value_concept,
        "qualifier_concept_id": None,
        "unit_concept_id": unit.concept_id if unit else None,
        "provider_id": provider_id,
        "visit_occurrence_id": visit_id,
        "visit_detail_id": None,
        "observation_source_value": cut(d.code[1], 50),
        "observation_source_concept_id": c.source_concept_id,
        "unit_source_value": cut(d.unit_code or d.unit_text, 50),
        "qualifier_source_value": None if d.kind == "observation" else cut(d.type_hint, 50),
        "value_source_value": cut(_value_source(d), 50),
        "observation_event_id": None,
        "obs_event_field_concept_id": None,
    }


def _value_source(d: EventDraft) -> str | None:
    if d.value is not None:
        return f"{d.value:g}"
    if d.value_code:
        return d.value_code[1]
    return d.value_string
