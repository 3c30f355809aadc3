"""Right to erasure (GDPR art. 17): remove one person from every table, and keep them out of later loads.

Everything linked to the person goes: their rows in every CDM table that has a person_id, their id-map
entries, their quarantined records (which hold raw source data) and the link from the consent registry
to the person. What stays is the keyed hash of their source id in `twinfed_erasure`, so the next
nightly load, which still sees the patient in the hospital's export, excludes them instead of loading
them again. The hash cannot be reversed without the site secret.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from omop_etl.database import open_engine
from omop_etl.identity import ETL_HINT, SiteKeys, load_or_create_secret, secret_path
from omop_etl.load.state import etl_metadata, table
from omop_etl.schema import cdm_metadata


class PersonNotFound(LookupError):
    """Neither the FHIR patient id nor the OMOP person id matches a loaded person."""


@dataclass
class ErasureResult:
    person_id: int | None  # None when the patient was never loaded (the erasure is still recorded)
    removed: dict[str, int] = field(default_factory=dict)


def _person_id(connection: Connection, id_map, patient_key: bytes) -> int | None:
    return connection.execute(
        select(id_map.c.omop_id).where(id_map.c.source_key == patient_key, id_map.c.omop_table == "person")
    ).scalar_one_or_none()


def erase(
    db_url: str,
    *,
    patient_id: str | None = None,
    person_id: int | None = None,
    schema: str | None = None,
    secret_file=None,
) -> ErasureResult:
    """Erase one person, named by FHIR Patient id (preferred) or OMOP person_id. One transaction."""
    if (patient_id is None) == (person_id is None):
        raise ValueError("Name the person either by --patient (the FHIR Patient id) or by --person-id, not both.")
    cdm = cdm_metadata(schema)
    etl = etl_metadata(schema)
    engine = open_engine(db_url)
    try:
        id_map = table(etl, "twinfed_id_map")
        with engine.begin() as connection:
            if patient_id is not None:
                secret, _ = load_or_create_secret(secret_path(secret_file), create=False, hint=ETL_HINT)
                patient_key = SiteKeys(secret).key(f"Patient/{patient_id}")
                person_id = _person_id(connection, id_map, patient_key)
            else:
                patient_key = connection.execute(
                    select(id_map.c.source_key).where(id_map.c.omop_table == "person", id_map.c.omop_id == person_id)
                ).scalar_one_or_none()
                if patient_key is None:
                    raise PersonNotFound(f"No person with person_id {person_id} was loaded by twinfed.")
                patient_key = bytes(patient_key)
            result = ErasureResult(person_id=person_id)
            if person_id is not None:
                for cdm_table in cdm.tables.values():
                    if "person_id" in cdm_table.c:
                        removed = connection.execute(
                            delete(cdm_table).where(cdm_table.c.person_id == person_id)
                        ).rowcount
                        if removed:
                            result.removed[cdm_table.name] = removed
                removed = connection.execute(
                    delete(id_map).where(
                        (id_map.c.person_id == person_id)
                        | ((id_map.c.omop_table == "person") & (id_map.c.omop_id == person_id))
                    )
                ).rowcount
                result.removed["twinfed_id_map"] = removed
            quarantine = table(etl, "twinfed_quarantine")
            removed = connection.execute(delete(quarantine).where(quarantine.c.patient_key == patient_key)).rowcount
            if removed:
                result.removed["twinfed_quarantine"] = removed
            consent = table(etl, "twinfed_consent")
            connection.execute(update(consent).where(consent.c.patient_key == patient_key).values(person_id=None))
            erasure = table(etl, "twinfed_erasure")
            if (
                connection.execute(select(erasure.c.patient_key).where(erasure.c.patient_key == patient_key)).first()
                is None
            ):
                connection.execute(insert(erasure).values(patient_key=patient_key, erased_at=dt.datetime.now()))
        return result
    finally:
        engine.dispose()
