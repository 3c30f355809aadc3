"""Turn a batch of drafts into OMOP rows: references, codes, units, ids, and the checks that need context.

Runs in the main process because it needs the database: which patients and visits exist, which codes
map where, which source records were loaded before (same key -> update, same OMOP id) or already in this
run (duplicate). A record is loaded whole or not at all: if any of its drafts fails a check, the record
is quarantined with the rule and none of its rows is written.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import MetaData, select
from sqlalchemy.engine import Connection

from omop_etl.fhir.drafts import CareSiteDraft, ConsentDraft, EventDraft, PersonDraft, ProviderDraft, VisitDraft
from omop_etl.identity import SiteKeys
from omop_etl.load import rows as R
from omop_etl.load.batches import PENDING, QUARANTINED, SKIPPED, Extracted
from omop_etl.load.codes import CodeResolver
from omop_etl.units import CANONICAL, UCUM_SYSTEM, normalise_unit, plausible_range, to_canonical

EXCLUDED, LOADED = "excluded", "loaded"
CANONICAL_UNITS = {c.unit for c in CANONICAL.values()}


def _table(metadata: MetaData, name: str):
    return next(t for t in metadata.tables.values() if t.name == name)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Options:
    exclude_opted_out: bool = False
    max_date: str = "9999-12-31"  # the export's transaction date: anything later is impossible


@dataclass
class PersonInfo:
    person_id: int
    birth_date: str


@dataclass
class VisitInfo:
    visit_id: int
    person_id: int


@dataclass
class BatchWrite:
    """Everything one batch writes, in one transaction."""

    rows: dict[str, list[tuple]] = field(default_factory=lambda: defaultdict(list))  # table -> value tuples
    columns: dict[str, list[str]] = field(default_factory=dict)  # table -> column names of those tuples
    deletes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    id_map: list[tuple] = field(default_factory=list)  # (source_key, omop_table, omop_id, person_id, file_id, position)
    replaced_keys: list[bytes] = field(default_factory=list)  # id-map keys loaded before (updates)
    consents: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[int] = field(default_factory=list)  # record indexes
    status: list[str] = field(default_factory=list)
    rule: list[str | None] = field(default_factory=list)
    detail: list[str | None] = field(default_factory=list)
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # status -> type -> n
    unlinked_visits: int = 0
    unconverted_units: Counter = field(default_factory=Counter)
    excluded_reasons: Counter = field(default_factory=Counter)
    skipped_reasons: Counter = field(default_factory=Counter)


class RunContext:
    """State of one ETL run: keys, caches of persons/visits/sites, id sequences, exclusions."""

    def __init__(
        self,
        cdm: MetaData,
        etl: MetaData,
        keys: SiteKeys,
        options: Options,
        run_id: int,
        current_file_ids: set[int],
        sequences: dict[str, int],
        excluded: dict[bytes, str],
    ) -> None:
        self.cdm, self.etl, self.keys, self.options = cdm, etl, keys, options
        self.run_id = run_id
        self.current_file_ids = current_file_ids
        self.sequences = sequences
        self.excluded = excluded  # patient key -> reason (opted out of research, erased)
        self.codes = CodeResolver(cdm)
        self.persons: dict[str, PersonInfo] = {}
        self.visits: dict[str, VisitInfo] = {}
        self.references: dict[str, int] = {}  # "Organization/x", "Location/x", "Practitioner/x" -> OMOP id
        self.id_map = _table(etl, "twinfed_id_map")

    def next_id(self, table: str) -> int:
        value = self.sequences.get(table, 1)
        self.sequences[table] = value + 1
        return value

    def patient_key(self, patient_id: str) -> bytes:
        return self.keys.key(f"Patient/{patient_id}")

    # --- what earlier batches and runs loaded ---------------------------------------------------------

    def fetch_id_map(self, connection: Connection, keys: list[bytes]) -> list[tuple]:
        """Id-map rows for these keys, through the driver (no per-value SQLAlchemy processing)."""
        from omop_etl.bulk import qualified_name

        name = qualified_name(self.id_map, connection.dialect.name)
        columns = "source_key, omop_table, omop_id, file_id, position"
        found: list[tuple] = []
        for chunk in _chunks(keys, 5000):
            if connection.dialect.name == "postgresql":
                result = connection.exec_driver_sql(
                    f"SELECT {columns} FROM {name} WHERE source_key = ANY(%s)", (chunk,)
                )
            else:
                marks = ",".join("?" * len(chunk))
                result = connection.exec_driver_sql(
                    f"SELECT {columns} FROM {name} WHERE source_key IN ({marks})", tuple(chunk)
                )
            found.extend(result.fetchall())
        return found

    def lookup_persons(self, connection: Connection, refs: set[str]) -> None:
        missing = [r for r in refs if r not in self.persons]
        if not missing:
            return
        if len(self.persons) > 1_000_000:  # keep memory bounded on very large loads
            self.persons.clear()
        person = _table(self.cdm, "person")
        by_key = {self.patient_key(r): r for r in missing}
        for chunk in _chunks(list(by_key), 2000):
            query = (
                select(
                    self.id_map.c.source_key,
                    person.c.person_id,
                    person.c.year_of_birth,
                    person.c.month_of_birth,
                    person.c.day_of_birth,
                )
                .join(person, person.c.person_id == self.id_map.c.omop_id)
                .where(self.id_map.c.omop_table == "person", self.id_map.c.source_key.in_(chunk))
            )
            for key, person_id, year, month, day in connection.execute(query):
                self.persons[by_key[bytes(key)]] = PersonInfo(person_id, f"{year:04d}-{month or 1:02d}-{day or 1:02d}")

    def lookup_visits(self, connection: Connection, refs: set[str]) -> None:
        missing = [r for r in refs if r not in self.visits]
        if not missing:
            return
        if len(self.visits) > 1_000_000:
            self.visits.clear()
        by_key = {self.keys.key(f"Encounter/{r}"): r for r in missing}
        for chunk in _chunks(list(by_key), 2000):
            query = select(self.id_map.c.source_key, self.id_map.c.omop_id, self.id_map.c.person_id).where(
                self.id_map.c.omop_table == "visit_occurrence", self.id_map.c.source_key.in_(chunk)
            )
            for key, visit_id, person_id in connection.execute(query):
                self.visits[by_key[bytes(key)]] = VisitInfo(visit_id, person_id)

    def lookup_references(self, connection: Connection, refs: set[str]) -> None:
        missing = [r for r in refs if r not in self.references]
        if not missing:
            return
        by_key = {self.keys.key(r): r for r in missing}
        for chunk in _chunks(list(by_key), 2000):
            query = select(self.id_map.c.source_key, self.id_map.c.omop_id).where(self.id_map.c.source_key.in_(chunk))
            for key, omop_id in connection.execute(query):
                self.references[by_key[bytes(key)]] = omop_id


def _draft_keys(draft: Any) -> list[str]:
    """The source keys a draft writes under (one per OMOP row it makes)."""
    if isinstance(draft, EventDraft):
        return [draft.key]
    if isinstance(draft, PersonDraft):
        return [f"Patient/{draft.patient_id}"]
    if isinstance(draft, VisitDraft):
        return [f"Encounter/{draft.encounter_id}"] + [
            f"Encounter/{draft.encounter_id}#location/{i}" for i in range(len(draft.locations))
        ]
    if isinstance(draft, ConsentDraft):
        return [f"Consent/{draft.consent_id}"]
    if isinstance(draft, CareSiteDraft):
        return [f"{draft.kind}/{draft.source_id}", f"{draft.kind}/{draft.source_id}#address"]
    if isinstance(draft, ProviderDraft):
        return [f"Practitioner/{draft.practitioner_id}"]
    raise TypeError(type(draft))


class BatchResolver:
    """Resolves one extracted batch into a BatchWrite."""

    def __init__(
        self, ctx: RunContext, connection: Connection, extracted: Extracted, *, defer_event_ids: bool = False
    ) -> None:
        self.ctx, self.connection, self.ex = ctx, connection, extracted
        self.defer_event_ids = defer_event_ids  # worker side: ids are assigned by the main process
        self.status = list(extracted.status)
        self.rule = list(extracted.rule)
        self.detail = list(extracted.detail)
        self.existing: dict[bytes, tuple[str, int, int, int]] = {}
        self._keys: dict[str, bytes] = {}
        self.planned: list[tuple[int, str, dict, bytes]] = []  # (record, table, row, key)
        self.aliases: list[tuple[int, bytes, int]] = []  # (record, key, person_id): MRN -> person for CSV extracts
        self.consents: list[tuple[int, dict]] = []
        self.out = BatchWrite()

    def key(self, reference: str) -> bytes:
        """The source key of a reference, computed once per batch."""
        value = self._keys.get(reference)
        if value is None:
            value = self._keys[reference] = self.ctx.keys.key(reference)
        return value

    # --- outcomes ---------------------------------------------------------------------------------------

    def reject(self, record: int, rule: str, detail: str) -> None:
        if self.status[record] == PENDING:
            self.status[record], self.rule[record], self.detail[record] = QUARANTINED, rule, detail

    def exclude(self, record: int, reason: str) -> None:
        if self.status[record] == PENDING:
            self.status[record], self.rule[record], self.detail[record] = EXCLUDED, "consent", reason

    def alive(self, record: int) -> bool:
        return self.status[record] == PENDING

    def omop_id(self, table: str, key: bytes) -> int:
        """The id of an earlier load of the same source record (an update), else a new one."""
        previous = self.existing.get(key)
        if previous is not None and previous[0] == table:
            return previous[1]
        return self.ctx.next_id(table)

    def plan(self, record: int, table: str, row: dict, key: bytes) -> int | None:
        if self.defer_event_ids:
            self.planned.append((record, table, row, key))
            return None
        row[R.ID_COLUMN[table]] = self.omop_id(table, key)
        self.planned.append((record, table, row, key))
        return row[R.ID_COLUMN[table]]

    # --- checks that need the patient ---------------------------------------------------------------------

    def dates_ok(self, record: int, person: PersonInfo | None, *days: str | None) -> bool:
        for day in days:
            if day is None:
                continue
            if day > self.ctx.options.max_date:
                self.reject(
                    record, "impossible_date", f"date {day} is after the export date {self.ctx.options.max_date}"
                )
                return False
            if person is not None and day < person.birth_date:
                self.reject(
                    record, "impossible_date", f"date {day} is before the patient's birth date {person.birth_date}"
                )
                return False
        return True

    def person_for(self, record: int, patient_ref: str) -> PersonInfo | None:
        person = self.ctx.persons.get(patient_ref)
        if person is None:
            self.reject(record, "dangling_reference", f"Patient/{patient_ref} is not in this export or in the database")
        return person

    def reference(self, kind: str, ref: str | None) -> int | None:
        return self.ctx.references.get(f"{kind}/{ref}") if ref else None

    # --- the batch ------------------------------------------------------------------------------------------

    def resolve(self) -> BatchWrite:
        ex, ctx, conn = self.ex, self.ctx, self.connection
        for index, patient in enumerate(ex.patients):
            if patient and self.status[index] == PENDING:
                reason = ctx.excluded.get(ctx.patient_key(patient))
                if reason is not None and ex.types[index] != "Consent":
                    self.exclude(index, reason)
        self._find_duplicates()
        by_class: dict[type, list] = defaultdict(list)
        for draft in ex.drafts:
            if self.alive(draft.record):
                by_class[type(draft)].append(draft)
        refs = {f"Organization/{d.parent_ref}" for d in by_class[CareSiteDraft] if d.parent_ref}
        refs |= {
            f"Organization/{d.organization_ref}"
            for d in by_class[PersonDraft] + by_class[VisitDraft]
            if d.organization_ref
        }
        refs |= {f"Practitioner/{d.practitioner_ref}" for d in ex.drafts if getattr(d, "practitioner_ref", None)}
        refs |= {f"Location/{loc[0]}" for d in by_class[VisitDraft] for loc in d.locations}
        ctx.lookup_references(conn, refs)
        ctx.lookup_persons(conn, {d.patient_ref for d in ex.drafts if getattr(d, "patient_ref", None)})
        ctx.lookup_visits(conn, {d.encounter_ref for d in by_class[EventDraft] if d.encounter_ref})
        self._care_sites(by_class[CareSiteDraft])
        self._providers(by_class[ProviderDraft])
        self._persons(by_class[PersonDraft])
        self._consents(by_class[ConsentDraft])
        self._visits(by_class[VisitDraft])
        self._events(by_class[EventDraft])
        self._write_plan()
        self._count()
        return self.out

    def _find_duplicates(self) -> None:
        """Mark records whose source id was already loaded in this run (or earlier in this batch)."""
        ex, ctx = self.ex, self.ctx
        record_keys: dict[int, list[bytes]] = defaultdict(list)
        for draft in ex.drafts:
            record_keys[draft.record].extend(self.key(k) for k in _draft_keys(draft))
        all_keys = [k for keys in record_keys.values() for k in keys]
        for key, table, omop_id, file_id, position in ctx.fetch_id_map(self.connection, all_keys):
            self.existing[bytes(key)] = (table, omop_id, file_id, position)
        seen: dict[bytes, int] = {}
        for record in sorted(record_keys):
            position = ex.positions[record]
            for key in record_keys[record]:
                previous = self.existing.get(key)
                if seen.get(key, record) != record:
                    self.reject(record, "duplicate", f"the same {ex.types[record]} id appears earlier in this input")
                elif (
                    previous is not None
                    and previous[2] in ctx.current_file_ids
                    and (previous[2], previous[3]) != (ex.file_id, position)
                ):
                    self.reject(
                        record,
                        "duplicate",
                        f"the same {ex.types[record]} id was already loaded from "
                        f"this input (file {previous[2]}, position {previous[3]})",
                    )
                seen[key] = record

    # --- per draft type -----------------------------------------------------------------------------------------

    def _care_sites(self, drafts: list[CareSiteDraft]) -> None:
        for d in drafts:
            row = R.care_site_row(d)
            address = R.location_row(d)
            if address is not None:
                row["location_id"] = self.plan(
                    d.record, "location", address, self.key(f"{d.kind}/{d.source_id}#address")
                )
            site_id = self.plan(d.record, "care_site", row, self.key(f"{d.kind}/{d.source_id}"))
            self.ctx.references[f"{d.kind}/{d.source_id}"] = site_id

    def _providers(self, drafts: list[ProviderDraft]) -> None:
        keys = self.ctx.keys
        for d in drafts:
            row = R.provider_row(d, keys.person_source_value(f"Practitioner/{d.practitioner_id}"))
            provider_id = self.plan(d.record, "provider", row, self.key(f"Practitioner/{d.practitioner_id}"))
            self.ctx.references[f"Practitioner/{d.practitioner_id}"] = provider_id

    def _persons(self, drafts: list[PersonDraft]) -> None:
        ctx = self.ctx
        for d in drafts:
            limit = ctx.options.max_date
            if d.birth_date > limit or (d.deceased and d.deceased[:10] > limit):
                self.reject(
                    d.record, "impossible_date", f"a date of Patient/{d.patient_id} is after the export date {limit}"
                )
                continue
            if d.deceased and d.deceased[:10] < d.birth_date:
                self.reject(
                    d.record, "impossible_date", f"deceasedDateTime {d.deceased} is before birthDate {d.birth_date}"
                )
                continue
            row = R.person_row(
                d,
                ctx.keys.person_source_value(d.patient_id),
                self.reference("Practitioner", d.practitioner_ref),
                self.reference("Organization", d.organization_ref),
            )
            person_id = self.plan(d.record, "person", row, self.key(f"Patient/{d.patient_id}"))
            if d.mrn:
                self.aliases.append((d.record, self.key(f"Patient/MRN:{d.mrn}"), person_id))
            self.out.deletes["death"].append(person_id)  # death is keyed by person: replace on every load
            death = R.death_row(d)
            if death is not None:
                self.planned.append((d.record, "death", {"person_id": person_id, **death}, b""))
            ctx.persons[d.patient_id] = PersonInfo(person_id, d.birth_date)

    def _consents(self, drafts: list[ConsentDraft]) -> None:
        ctx = self.ctx
        for d in drafts:
            person = ctx.persons.get(d.patient_ref)
            patient_key = self.key(f"Patient/{d.patient_ref}")
            if person is None and patient_key not in ctx.excluded:
                self.reject(
                    d.record, "dangling_reference", f"Patient/{d.patient_ref} is not in this export or in the database"
                )
                continue
            self.consents.append(
                (
                    d.record,
                    {
                        "consent_key": self.key(f"Consent/{d.consent_id}"),
                        "patient_key": patient_key,
                        "person_id": person.person_id if person else None,
                        "status": d.status,
                        "provision": d.provision,
                        "scope": R.cut(d.scope, 40),
                        "policy": R.cut(d.policy, 40),
                        "period_start": d.period_start,
                        "period_end": d.period_end,
                        "recorded": d.recorded,
                    },
                )
            )

    def _visits(self, drafts: list[VisitDraft]) -> None:
        ctx = self.ctx
        for d in drafts:
            person = self.person_for(d.record, d.patient_ref)
            if person is None or not self.dates_ok(d.record, person, d.start, d.end):
                continue
            sites = [self.reference("Location", loc[0]) for loc in d.locations]
            visit, details = R.visit_rows(
                d,
                person.person_id,
                ctx.options.max_date,
                self.reference("Organization", d.organization_ref),
                self.reference("Practitioner", d.practitioner_ref),
                sites,
            )
            visit_id = self.plan(d.record, "visit_occurrence", visit, self.key(f"Encounter/{d.encounter_id}"))
            for index, detail in enumerate(details):
                detail["visit_occurrence_id"] = visit_id
                self.plan(d.record, "visit_detail", detail, self.key(f"Encounter/{d.encounter_id}#location/{index}"))
            ctx.visits[d.encounter_id] = VisitInfo(visit_id, person.person_id)

    def _events(self, drafts: list[EventDraft]) -> None:
        ctx = self.ctx
        codes: set[tuple[str, str]] = {(UCUM_SYSTEM, unit) for unit in CANONICAL_UNITS}
        for d in drafts:
            codes.add((d.code[0], d.code[1]))
            if d.value_code:
                codes.add((d.value_code[0], d.value_code[1]))
            unit = normalise_unit(d.unit_code, d.unit_text)
            if unit:
                codes.add((UCUM_SYSTEM, unit))
        resolved = ctx.codes.resolve(self.connection, codes)
        for d in drafts:
            if not self.alive(d.record):
                continue
            person = self.person_for(d.record, d.patient_ref)
            if person is None or not self.dates_ok(d.record, person, d.start, d.end):
                continue
            visit_id = None
            if d.encounter_ref:
                visit = ctx.visits.get(d.encounter_ref)
                if visit is None:
                    self.out.unlinked_visits += 1
                elif visit.person_id != person.person_id:
                    self.reject(
                        d.record,
                        "inconsistent_reference",
                        f"Encounter/{d.encounter_ref} belongs to another patient than Patient/{d.patient_ref}",
                    )
                    continue
                else:
                    visit_id = visit.visit_id
            concept = resolved[(d.code[0], d.code[1])]
            if not concept.concept_id:
                ctx.codes.count_unmapped(d.code[0], d.code[1])
            elif concept.by_site_map:
                ctx.codes.count_site_mapped(d.code[0], d.code[1])
            table = R.target_table(d, concept)
            provider = self.reference("Practitioner", d.practitioner_ref)
            args = (d, concept, person.person_id, visit_id, provider)
            if table in ("measurement", "observation"):
                value, unit = d.value, normalise_unit(d.unit_code, d.unit_text)
                if value is not None and concept.concept_id:
                    value, unit, converted = to_canonical(concept.concept_id, value, unit)
                    if not converted:
                        self.out.unconverted_units[(d.code[1], unit or "")] += 1
                    limits = plausible_range(concept.concept_id)
                    if converted and limits and not limits[0] <= value <= limits[1]:
                        self.reject(
                            d.record,
                            "implausible_value",
                            f"{d.code[1]} value {d.value:g} {d.unit_code or d.unit_text or ''} is outside the "
                            f"plausible range {limits[0]:g}-{limits[1]:g} {unit}",
                        )
                        continue
                unit_concept = resolved.get((UCUM_SYSTEM, unit)) if unit else None
                value_concept = resolved[(d.value_code[0], d.value_code[1])].concept_id if d.value_code else None
                build = R.measurement_row if table == "measurement" else R.observation_row
                row = build(*args, value, unit_concept, value_concept)
            elif table == "condition_occurrence":
                row = R.condition_row(*args)
            elif table == "procedure_occurrence":
                row = R.procedure_row(*args)
            else:
                row = R.drug_row(*args)
            self.plan(d.record, table, row, self.key(d.key))

    # --- writing ----------------------------------------------------------------------------------------------

    def _write_plan(self) -> None:
        ex, out = self.ex, self.out
        for record, table, row, key in self.planned:
            if not self.alive(record):
                continue
            if table not in out.columns:
                out.columns[table] = list(row)
            out.rows[table].append(tuple(row.values()))
            if table == "death":
                continue
            previous = self.existing.get(key)
            if previous is not None:
                out.deletes[previous[0]].append(previous[1])
                out.replaced_keys.append(key)
            out.id_map.append(
                (key, table, row[R.ID_COLUMN[table]], row.get("person_id"), ex.file_id, ex.positions[record])
            )
        if self.aliases:
            alias_keys = [key for _, key, _ in self.aliases]
            # an MRN already mapped keeps its first person
            taken = {bytes(row[0]) for row in self.ctx.fetch_id_map(self.connection, alias_keys)}
            for record, key, person_id in self.aliases:
                if self.alive(record) and key not in taken:
                    taken.add(key)
                    out.id_map.append((key, "person", person_id, person_id, ex.file_id, ex.positions[record]))
        for record, consent in self.consents:
            if self.alive(record):
                out.consents.append({**consent, "file_id": ex.file_id, "position": ex.positions[record]})
        # A person or visit planned for a record that was rejected later must not stay in the caches.
        for record, table, row, _ in self.planned:
            if self.alive(record) or self.status[record] == LOADED:
                continue
            if table == "person":
                self.ctx.persons = {k: v for k, v in self.ctx.persons.items() if v.person_id != row["person_id"]}
            elif table == "visit_occurrence":
                self.ctx.visits = {k: v for k, v in self.ctx.visits.items() if v.visit_id != row["visit_occurrence_id"]}

    def _count(self) -> None:
        ex, out = self.ex, self.out
        for index in range(len(ex)):
            if self.status[index] == PENDING:
                self.status[index] = LOADED
            status = self.status[index]
            out.counts[status][ex.types[index]] += 1
            if status == QUARANTINED:
                out.quarantined.append(index)
            elif status == EXCLUDED:
                out.excluded_reasons[self.detail[index] or "consent"] += 1
            elif status == SKIPPED:
                out.skipped_reasons[self.detail[index] or "not mapped"] += 1
        out.status, out.rule, out.detail = self.status, self.rule, self.detail


# --- resolution of event batches in worker processes ---------------------------------------------------------


@dataclass
class ResolvedEvents:
    """An event batch resolved in a worker: rows without OMOP ids; the main process assigns ids and writes."""

    extracted: Extracted  # outcomes and positions (drafts dropped)
    status: list[str]
    rule: list[str | None]
    detail: list[str | None]
    planned: list[tuple[int, str, bytes, tuple]]  # (record, table, key, values without the id column)
    columns: dict[str, list[str]]  # table -> column names of the values (id column excluded)
    unlinked_visits: int
    unconverted_units: Counter
    unmapped: Counter
    site_mapped: Counter = field(default_factory=Counter)  # codes mapped by source_to_concept_map


EVENT_DRAFTS = (EventDraft,)


def resolve_events(ctx: RunContext, connection: Connection, extracted: Extracted) -> ResolvedEvents | None:
    """Resolve a batch whose drafts are all events (NDJSON/CSV files of clinical facts) in a worker.

    Returns None when the batch also holds patients, encounters or other reference data (a mixed file):
    those are resolved in the main process, which knows what the batches before it wrote.
    """
    if any(not isinstance(d, EVENT_DRAFTS) for d in extracted.drafts):
        return None
    before = Counter(ctx.codes.unmapped)
    before_site = Counter(ctx.codes.site_mapped)
    resolver = BatchResolver(ctx, connection, extracted, defer_event_ids=True)
    for index, patient in enumerate(extracted.patients):
        if patient and resolver.status[index] == PENDING:
            reason = ctx.excluded.get(ctx.patient_key(patient))
            if reason is not None:
                resolver.exclude(index, reason)
    drafts = [d for d in extracted.drafts if resolver.alive(d.record)]
    practitioners = {f"Practitioner/{d.practitioner_ref}" for d in drafts if d.practitioner_ref}
    ctx.lookup_references(connection, practitioners)
    ctx.lookup_persons(connection, {d.patient_ref for d in drafts})
    ctx.lookup_visits(connection, {d.encounter_ref for d in drafts if d.encounter_ref})
    resolver._events(drafts)
    columns: dict[str, list[str]] = {}
    planned = []
    for record, table, row, key in resolver.planned:
        if not resolver.alive(record):
            continue
        if table not in columns:
            columns[table] = list(row)
        planned.append((record, table, key, tuple(row.values())))
    extracted.drafts = []
    return ResolvedEvents(
        extracted=extracted, status=resolver.status, rule=resolver.rule, detail=resolver.detail, planned=planned,
        columns=columns, unlinked_visits=resolver.out.unlinked_visits,
        unconverted_units=resolver.out.unconverted_units, unmapped=ctx.codes.unmapped - before,
        site_mapped=ctx.codes.site_mapped - before_site,
    )  # fmt: skip


def finalize_events(ctx: RunContext, connection: Connection, resolved: ResolvedEvents) -> BatchWrite:
    """Main-process half of a worker-resolved batch: duplicates, OMOP ids (new or reused), rows to write."""
    ex = resolved.extracted
    resolver = BatchResolver(ctx, connection, ex)
    resolver.status, resolver.rule, resolver.detail = resolved.status, resolved.rule, resolved.detail
    keys = [key for _, _, key, _ in resolved.planned]
    for key, table, omop_id, file_id, position in ctx.fetch_id_map(connection, keys):
        resolver.existing[bytes(key)] = (table, omop_id, file_id, position)
    seen: dict[bytes, int] = {}
    for record, _, key, _ in resolved.planned:
        previous = resolver.existing.get(key)
        if seen.get(key, record) != record:
            resolver.reject(record, "duplicate", f"the same {ex.types[record]} id appears earlier in this input")
        elif (
            previous is not None
            and previous[2] in ctx.current_file_ids
            and (previous[2], previous[3]) != (ex.file_id, ex.positions[record])
        ):
            resolver.reject(record, "duplicate", f"the same {ex.types[record]} id was already loaded from this "
                            f"input (file {previous[2]}, position {previous[3]})")  # fmt: skip
        seen[key] = record
    out = resolver.out
    person_at = {}
    for table, names in resolved.columns.items():
        out.columns[table] = [R.ID_COLUMN[table], *names]
        person_at[table] = names.index("person_id")
    for record, table, key, values in resolved.planned:
        if not resolver.alive(record):
            continue
        omop_id = resolver.omop_id(table, key)
        previous = resolver.existing.get(key)
        if previous is not None:
            out.deletes[previous[0]].append(previous[1])
            out.replaced_keys.append(key)
        out.rows[table].append((omop_id, *values))
        out.id_map.append((key, table, omop_id, values[person_at[table]], ex.file_id, ex.positions[record]))
    out.unlinked_visits = resolved.unlinked_visits
    out.unconverted_units = resolved.unconverted_units
    ctx.codes.unmapped.update(resolved.unmapped)
    ctx.codes.site_mapped.update(resolved.site_mapped)
    resolver._count()
    return out
