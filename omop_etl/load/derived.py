"""Tables derived after the load: observation_period (per person, from the events) and cdm_source.

observation_period follows ETL-Synthea's rule generalised to FHIR: from a person's first to last
recorded event (visits, diagnoses, drugs, procedures, measurements, observations, death). Problem-list
conditions are left out: their onset can lie decades before the hospital saw the patient, and an
observation period is the time during which events would have been recorded. One period per person,
with the person's id as its id (stable across re-runs).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import MetaData, delete, func, insert, select, text
from sqlalchemy.engine import Connection

from omop_etl.bulk import qualified_name
from omop_etl.schema import CDM_VERSION, CDM_VERSION_CONCEPT_ID

PERIOD_TYPE_DERIVED = 32882  # "Standard algorithm from EHR"
PROBLEM_LIST = 32840


def _table(metadata: MetaData, name: str):
    return next(t for t in metadata.tables.values() if t.name == name)


def missing(connection: Connection, cdm: MetaData) -> bool:
    """True when persons exist but derived tables were never written (e.g. after an interrupted run)."""
    persons = connection.execute(select(func.count()).select_from(_table(cdm, "person"))).scalar()
    sources = connection.execute(select(func.count()).select_from(_table(cdm, "cdm_source"))).scalar()
    return bool(persons) and not sources


def observation_periods(connection: Connection, cdm: MetaData) -> int:
    """Rebuild observation_period; returns the number of periods."""
    dialect = connection.dialect.name

    def q(name: str) -> str:
        return qualified_name(_table(cdm, name), dialect)

    period = _table(cdm, "observation_period")
    connection.execute(delete(period))
    events = f"""
        SELECT person_id, visit_start_date AS first_day, visit_end_date AS last_day FROM {q("visit_occurrence")}
        UNION ALL SELECT person_id, condition_start_date, COALESCE(condition_end_date, condition_start_date)
            FROM {q("condition_occurrence")} WHERE condition_type_concept_id <> {PROBLEM_LIST}
        UNION ALL SELECT person_id, drug_exposure_start_date, drug_exposure_end_date FROM {q("drug_exposure")}
        UNION ALL SELECT person_id, procedure_date, COALESCE(procedure_end_date, procedure_date)
            FROM {q("procedure_occurrence")}
        UNION ALL SELECT person_id, measurement_date, measurement_date FROM {q("measurement")}
        UNION ALL SELECT person_id, observation_date, observation_date FROM {q("observation")}
        UNION ALL SELECT person_id, death_date, death_date FROM {q("death")}
    """
    result = connection.execute(
        text(f"""
        INSERT INTO {q("observation_period")} (observation_period_id, person_id, observation_period_start_date,
            observation_period_end_date, period_type_concept_id)
        SELECT e.person_id, e.person_id, MIN(e.first_day), MAX(e.last_day), {PERIOD_TYPE_DERIVED}
        FROM ({events}) e JOIN {q("person")} p ON p.person_id = e.person_id
        GROUP BY e.person_id
    """)
    )
    return int(result.rowcount or 0)


def cdm_source(connection: Connection, cdm: MetaData, source_release: str, name: str | None = None) -> None:
    """Write the single cdm_source row describing this database."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        etl_version = version("twinfed")
    except PackageNotFoundError:
        etl_version = "source tree"
    source = _table(cdm, "cdm_source")
    vocabulary = _table(cdm, "vocabulary")
    version = connection.execute(
        select(vocabulary.c.vocabulary_version).where(vocabulary.c.vocabulary_id == "None")
    ).scalar_one_or_none()
    care_site = _table(cdm, "care_site")
    site_name = (
        name
        or connection.execute(
            select(care_site.c.care_site_name).where(care_site.c.care_site_source_value.like("Organization/%")).limit(1)
        ).scalar_one_or_none()
    )
    connection.execute(delete(source))
    connection.execute(
        insert(source).values(
            cdm_source_name=(site_name or "twinfed site")[:255],
            cdm_source_abbreviation=(site_name or "twinfed")[:25],
            cdm_holder=(site_name or "twinfed site")[:255],
            source_description="EHR data mapped from FHIR R4 by twinfed at the hospital site node",
            source_documentation_reference=None,
            cdm_etl_reference=f"twinfed {etl_version}",
            source_release_date=dt.date.fromisoformat(source_release),
            cdm_release_date=dt.date.today(),
            cdm_version=CDM_VERSION,
            cdm_version_concept_id=CDM_VERSION_CONCEPT_ID,
            vocabulary_version=(version or "unknown")[:20],
        )
    )
