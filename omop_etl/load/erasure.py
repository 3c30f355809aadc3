"""Right to erasure (GDPR art. 17): remove one person from every table, and keep them out of later loads.

Everything linked to the person goes: their rows in every CDM table that has a person_id, their id-map
entries, their quarantined records (which hold raw source data) and the link from the consent registry
to the person.

Quarantined records are found by what they say, not only by the patient key the load could attach: a
record quarantined before its patient was resolved (a cut-off line, a bad code, a Patient record that
failed validation itself) has no patient key, but its raw JSON or CSV row still names the patient. Each
row is searched for the patient's identifier forms: their Patient id (`Patient/ID`, a server's
`.../Patient/ID`, `urn:uuid:ID` as Synthea bundles refer to it, the Patient record's own id), their
medical record numbers (how CSV extracts name them) and their encounters' ids (a record without a subject
still names its encounter). The comparison is between keyed hashes, never between ids in clear.

What stays is the keyed hash of their source id in `twinfed_erasure` and of each identifier form in
`twinfed_erased_identifier`, so the next nightly load, which still sees the patient in the hospital's
export, excludes them instead of loading them again, and counts their defective records as excluded
instead of storing them in the quarantine. The hashes cannot be reversed without the site secret.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from sqlalchemy import MetaData, delete, insert, or_, select, update
from sqlalchemy.engine import Connection

from omop_etl.database import open_engine
from omop_etl.identity import ETL_HINT, SecretError, SiteKeys, load_or_create_secret, secret_path
from omop_etl.load.state import etl_metadata, table
from omop_etl.schema import cdm_metadata

ERASED_REASON = "erased on request (right to erasure)"  # the report's exclusion reason
PATIENT, MRN, ENCOUNTER = "patient", "mrn", "encounter"  # the identifier forms kept per erased patient
EARLIER = "twinfed_quarantine (of earlier erasures)"  # ErasureResult.removed: rows earlier erasures missed

# `Patient/ID`, also inside `https://server/fhir/Patient/ID/_history/2` and JSON's escaped `Patient\/ID`. The
# id ends where a reference, a JSON string or a sentence does; FHIR ids never hold those characters. One
# pattern per type: a pattern that starts with a literal is searched for several times faster.
_ID = r"([^\s\"'/\\?#|,;()\[\]{}<>]+)"
_REFERENCES = {kind: re.compile(kind + r"\\?/" + _ID) for kind in ("Patient", "Encounter")}
_URN_UUID = re.compile(r"urn:uuid:([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})")
# A Patient or Encounter record's own id, where its JSON cannot be parsed (a cut-off line, a broken Bundle).
_OWN_ID = re.compile(r'"resourceType"\s*:\s*"(Patient|Encounter)"\s*,\s*"id"\s*:\s*"([^"\\]+)"')
_CSV_FIELD = re.compile(r"[,;|\t]")


class PersonNotFound(LookupError):
    """Neither the FHIR patient id nor the OMOP person id matches a loaded person."""


@dataclass
class ErasureResult:
    person_id: int | None  # None when the patient was never loaded (the erasure is still recorded)
    removed: dict[str, int] = field(default_factory=dict)
    identifiers: int = 0  # identifier forms now recorded for the patient (Patient id, MRNs, encounters)


def _mrn_keys(keys: SiteKeys, patient: dict) -> set[bytes]:
    """Keys of a Patient record's medical record numbers, chosen as the Patient mapper chooses its MRN alias."""
    found = set()
    for identifier in patient.get("identifier") or []:
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            continue
        kind = identifier.get("type")
        codings = (kind.get("coding") or []) if isinstance(kind, dict) else []
        if any(isinstance(c, dict) and c.get("code") == "MR" for c in codings):
            found.add(keys.key(f"Patient/MRN:{identifier['value']}"))
    return found


def _text_keys(keys: SiteKeys, resource_type: str, text: str) -> set[bytes]:
    """Keys of every Patient or Encounter identifier written in one raw record or quarantine detail."""
    found: set[bytes] = set()
    for kind, pattern in _REFERENCES.items():
        if kind not in text:
            continue
        for match in pattern.finditer(text):
            if match.start() and text[match.start() - 1].isalpha():  # e.g. a profile's "MyPatient/..."
                continue
            identifier = match.group(1)
            found.add(keys.key(f"{kind}/{identifier}"))
            trimmed = identifier.rstrip(".:")  # "... than Patient/p1." in a sentence
            if trimmed and trimmed != identifier:
                found.add(keys.key(f"{kind}/{trimmed}"))
    for identifier in _URN_UUID.findall(text):  # Synthea: a bundle's patient is urn:uuid:<Patient.id>
        found.add(keys.key(f"Patient/{identifier}"))
        found.add(keys.key(f"Encounter/{identifier}"))
    for kind, identifier in _OWN_ID.findall(text):
        found.add(keys.key(f"{kind}/{identifier}"))
    if resource_type.startswith("CSV:"):  # a warehouse row: any field may be the patient (id or MRN) or encounter
        for value in {v.strip() for v in _CSV_FIELD.split(text) if v.strip()}:
            found.update(
                (keys.key(f"Patient/{value}"), keys.key(f"Patient/MRN:{value}"), keys.key(f"Encounter/{value}"))
            )
    elif resource_type in ("Patient", "Encounter") and text.lstrip().startswith("{"):  # its id in any key order
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("resourceType") == resource_type:
            if isinstance(parsed.get("id"), str):
                found.add(keys.key(f"{parsed['resourceType']}/{parsed['id']}"))
            if parsed["resourceType"] == "Patient":
                found |= _mrn_keys(keys, parsed)
    return found


def quarantine_keys(
    keys: SiteKeys,
    resource_type: str,
    source_key: bytes | None,
    patient_key: bytes | None,
    raw: str | None,
    detail: str | None,
) -> set[bytes]:
    """Keyed hashes of every patient and encounter identifier one quarantined record holds.

    Used twice with the same rules: by erasure, to find an erased patient's rows in the quarantine, and by
    the load, to recognise a defective record of an erased patient before it would be stored.
    `source_key` is the key of the record's own id (`Type/id`), `patient_key` the key of the patient the
    load resolved for it, if any.
    """
    found = {patient_key} if patient_key else set()
    if source_key and resource_type in ("Patient", "Encounter"):
        found.add(source_key)  # a Patient that failed validation is its patient; an Encounter, an encounter
    for text in (raw, detail):
        if text:
            found |= _text_keys(keys, resource_type, text)
    return found


@dataclass
class ErasedIdentifiers:
    """The identifier forms of every erased patient (keyed hash -> form), as a load checks records against."""

    forms: dict[bytes, str] = field(default_factory=dict)

    def exclusions(self) -> dict[bytes, str]:
        """Patient keys (Patient ids and MRNs) -> the report's reason, for the resolver's patient check."""
        return {key: ERASED_REASON for key, form in self.forms.items() if form != ENCOUNTER}

    def names(self, found: Iterable[bytes]) -> bool:
        """Whether any of these keys (from quarantine_keys) is an identifier of an erased patient."""
        return not self.forms.keys().isdisjoint(found)

    def __bool__(self) -> bool:
        return bool(self.forms)


def erased_identifiers(connection: Connection, etl: MetaData) -> ErasedIdentifiers:
    """Every erased patient's identifier forms. Erasures recorded by an earlier twinfed have their Patient key only."""
    erasure, identifiers = table(etl, "twinfed_erasure"), table(etl, "twinfed_erased_identifier")
    forms = {bytes(key): PATIENT for key in connection.execute(select(erasure.c.patient_key)).scalars()}
    for key, form in connection.execute(select(identifiers.c.identifier_key, identifiers.c.form)):
        forms[bytes(key)] = form
    return ErasedIdentifiers(forms)


def _check_secret(connection: Connection, etl: MetaData, keys: SiteKeys) -> None:
    """Refuse a secret other than the loads': every key would differ, and the erasure would find nothing."""
    site = table(etl, "twinfed_site")
    stored = connection.execute(select(site.c.value).where(site.c.key == "secret_fingerprint")).scalar_one_or_none()
    if stored is not None and stored != keys.fingerprint:
        raise SecretError(
            "This database was loaded with a different site secret, so erasure could not recognise the patient in "
            f"any table. {ETL_HINT}."
        )


def _person_id(connection: Connection, id_map, patient_key: bytes) -> int | None:
    return connection.execute(
        select(id_map.c.omop_id).where(id_map.c.source_key == patient_key, id_map.c.omop_table == "person")
    ).scalar_one_or_none()


def _identifier_forms(
    connection: Connection, etl: MetaData, keys: SiteKeys, patient_keys: list[bytes], person_id: int | None
) -> dict[bytes, str]:
    """The patient's identifier forms, read before their id-map rows are deleted.

    The id map holds, for a loaded person, their Patient key, the keys of their MRNs (aliases for CSV
    extracts) and of their encounters; a Patient record that only reached the quarantine gives its MRNs,
    and a quarantined Encounter that names the patient gives its own id.
    """
    forms = dict.fromkeys(patient_keys, PATIENT)
    identifiers = table(etl, "twinfed_erased_identifier")
    stored = select(identifiers.c.identifier_key, identifiers.c.form).where(identifiers.c.patient_key.in_(patient_keys))
    for key, form in connection.execute(stored):
        forms[bytes(key)] = form
    if person_id is not None:
        id_map = table(etl, "twinfed_id_map")
        aliases = select(id_map.c.source_key).where(id_map.c.omop_table == "person", id_map.c.omop_id == person_id)
        for key in connection.execute(aliases).scalars():
            forms.setdefault(bytes(key), MRN)
        visits = select(id_map.c.source_key).where(
            id_map.c.omop_table == "visit_occurrence", id_map.c.person_id == person_id
        )
        for key in connection.execute(visits).scalars():
            forms.setdefault(bytes(key), ENCOUNTER)
    quarantine = table(etl, "twinfed_quarantine")
    own = select(quarantine.c.raw).where(
        quarantine.c.resource_type == "Patient",
        or_(quarantine.c.source_key.in_(patient_keys), quarantine.c.patient_key.in_(patient_keys)),
    )
    for raw in connection.execute(own).scalars():
        try:
            parsed = orjson.loads(raw or "")
        except orjson.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            for key in _mrn_keys(keys, parsed):
                forms.setdefault(key, MRN)
    # An encounter of theirs that only reached the quarantine is named by the records made during it.
    q = quarantine.c
    encounters = select(q.source_key, q.patient_key, q.raw, q.detail).where(q.resource_type == "Encounter")
    for source_key, row_patient, raw, detail in connection.execute(encounters):
        source_key = bytes(source_key) if source_key is not None else None
        row_patient = bytes(row_patient) if row_patient is not None else None
        if forms.keys().isdisjoint(quarantine_keys(keys, "Encounter", source_key, row_patient, raw, detail)):
            continue
        own = {source_key} if source_key else set()
        own |= {keys.key(f"Encounter/{i}") for kind, i in _OWN_ID.findall(raw or "") if kind == "Encounter"}
        for key in own:
            forms.setdefault(key, ENCOUNTER)
    return forms


def _erase_quarantine(
    connection: Connection, etl: MetaData, keys: SiteKeys, forms: dict[bytes, str], earlier: ErasedIdentifiers
) -> tuple[int, int]:
    """Delete every quarantined record naming the patient, and any an earlier erasure missed. Returns both counts.

    Earlier erasures (before identifiers inside raw records were recognised) removed only the rows with
    a patient key; their other rows are found here by the earlier patients' recorded identifier forms.
    The whole quarantine is read once, in chunks: erasure is rare and the identifiers are hashed.
    """
    quarantine = table(etl, "twinfed_quarantine")
    q = quarantine.c
    query = select(q.quarantine_id, q.resource_type, q.source_key, q.patient_key, q.raw, q.detail)
    mine: list[int] = []
    theirs: list[int] = []
    for row in connection.execute(query.execution_options(yield_per=500)):
        found = quarantine_keys(
            keys,
            row.resource_type,
            bytes(row.source_key) if row.source_key is not None else None,
            bytes(row.patient_key) if row.patient_key is not None else None,
            row.raw,
            row.detail,
        )
        if not forms.keys().isdisjoint(found):
            mine.append(row.quarantine_id)
        elif earlier.names(found):
            theirs.append(row.quarantine_id)
    doomed = mine + theirs
    for start in range(0, len(doomed), 1000):
        connection.execute(delete(quarantine).where(q.quarantine_id.in_(doomed[start : start + 1000])))
    return len(mine), len(theirs)


def _record_identifiers(connection: Connection, etl: MetaData, patient_key: bytes, forms: dict[bytes, str]) -> None:
    """Keep the keyed hash of each identifier form not yet recorded, for later loads to recognise the patient."""
    identifiers = table(etl, "twinfed_erased_identifier")
    wanted = list(forms)
    stored: set[bytes] = set()
    for start in range(0, len(wanted), 1000):
        chunk = wanted[start : start + 1000]
        query = select(identifiers.c.identifier_key).where(identifiers.c.identifier_key.in_(chunk))
        stored.update(bytes(key) for key in connection.execute(query).scalars())
    new = [{"identifier_key": k, "patient_key": patient_key, "form": forms[k]} for k in wanted if k not in stored]
    if new:
        connection.execute(insert(identifiers), new)


def erase(
    db_url: str,
    *,
    patient_id: str | None = None,
    person_id: int | None = None,
    schema: str | None = None,
    secret_file: Path | None = None,
) -> ErasureResult:
    """Erase one person, named by FHIR Patient id (preferred) or OMOP person_id. One transaction.

    The site secret is needed either way: the quarantine's raw records name the patient by source ids,
    recognised through their keyed hashes.
    """
    if (patient_id is None) == (person_id is None):
        raise ValueError("Name the person either by --patient (the FHIR Patient id) or by --person-id, not both.")
    cdm = cdm_metadata(schema)
    etl = etl_metadata(schema)
    engine = open_engine(db_url)
    try:
        id_map = table(etl, "twinfed_id_map")
        with engine.begin() as connection:
            table(etl, "twinfed_erased_identifier").create(connection, checkfirst=True)  # an earlier twinfed's load
            if person_id is not None:
                # The person's Patient key and their MRN aliases: the id map does not say which is which, so
                # every one of them is recorded as an erased patient key.
                patient_keys = [
                    bytes(key)
                    for key in connection.execute(
                        select(id_map.c.source_key).where(
                            id_map.c.omop_table == "person", id_map.c.omop_id == person_id
                        )
                    ).scalars()
                ]
                if not patient_keys:
                    raise PersonNotFound(f"No person with person_id {person_id} was loaded by twinfed.")
            secret, _ = load_or_create_secret(secret_path(secret_file), create=False, hint=ETL_HINT)
            keys = SiteKeys(secret)
            _check_secret(connection, etl, keys)
            if patient_id is not None:
                patient_keys = [keys.key(f"Patient/{patient_id}")]
                person_id = _person_id(connection, id_map, patient_keys[0])
            result = ErasureResult(person_id=person_id)
            earlier = erased_identifiers(connection, etl)
            forms = _identifier_forms(connection, etl, keys, patient_keys, person_id)
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
            removed, missed = _erase_quarantine(connection, etl, keys, forms, earlier)
            if removed:
                result.removed["twinfed_quarantine"] = removed
            if missed:
                result.removed[EARLIER] = missed
            consent = table(etl, "twinfed_consent")
            linked = consent.c.patient_key.in_(patient_keys)
            if person_id is not None:
                linked = or_(linked, consent.c.person_id == person_id)
            connection.execute(update(consent).where(linked).values(person_id=None))
            erasure = table(etl, "twinfed_erasure")
            query = select(erasure.c.patient_key).where(erasure.c.patient_key.in_(patient_keys))
            recorded = {bytes(key) for key in connection.execute(query).scalars()}
            for patient_key in patient_keys:
                if patient_key not in recorded:
                    connection.execute(insert(erasure).values(patient_key=patient_key, erased_at=dt.datetime.now()))
            _record_identifiers(connection, etl, patient_keys[0], forms)
            result.identifiers = len(forms)
        return result
    finally:
        engine.dispose()
