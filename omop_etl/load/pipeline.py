"""The nightly load: FHIR inputs -> OMOP CDM v5.4, transactional per batch, incremental, nothing lost.

    inputs --(worker processes: validate + extract)--> drafts --(main: resolve)--> rows --(one transaction)--> DB

Per batch, one transaction writes the OMOP rows, the id map, the quarantine, the consent registry and
the batch's ledger row. A crash or kill leaves whole batches only; the next run skips committed batches
and unchanged files (recognised by content hash) and finishes the rest. Every input record is counted
as loaded, quarantined, skipped or excluded, and the totals reconcile.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from omop_etl.bulk import insert_rows
from omop_etl.database import open_engine, redact
from omop_etl.identity import SecretError, SiteKeys, load_or_create_secret, secret_path
from omop_etl.load import derived
from omop_etl.load.batches import Batch, Extracted
from omop_etl.load.erasure import ERASED_REASON, ErasedIdentifiers, erased_identifiers, quarantine_keys
from omop_etl.load.extraction import extract_batch
from omop_etl.load.indexes import defer_indexes, ensure_indexes, restore_indexes
from omop_etl.load.report import CodeCount, EtlReport, FileOutcome, Tally, UnitCount
from omop_etl.load.resolve import (
    BatchResolver,
    BatchWrite,
    Options,
    ResolvedEvents,
    RunContext,
    finalize_events,
    resolve_events,
)
from omop_etl.load.rows import ID_COLUMN
from omop_etl.load.sources import InputFile, batches, consent_denials, discover, export_date, fingerprint
from omop_etl.load.state import etl_metadata, table
from omop_etl.schema import create_cdm

ProgressCallback = Callable[[int, int, str], None]  # (bytes done, bytes total, what)
STATUSES = ("loaded", "quarantined", "skipped", "excluded")


@dataclass
class EtlSettings:
    db_url: str
    schema: str | None = None
    secret_file: Path | None = None
    exclude_opted_out: bool = False
    workers: int | None = None
    batch_size: int = 10000


class EtlError(RuntimeError):
    """The load cannot start or continue; the message says what to do."""


def _prepare(engine: Engine, schema: str | None) -> tuple:
    cdm = create_cdm(engine, schema)
    etl = etl_metadata(schema)
    with engine.begin() as connection:
        etl.create_all(connection, checkfirst=True)
        from omop_etl.vocabulary.bundled import load_bundled_vocabulary

        load_bundled_vocabulary(connection, cdm)
    ensure_indexes(engine, cdm)  # an interrupted earlier load may have left deferred indexes unbuilt
    return cdm, etl


def _check_secret(connection: Connection, etl, keys: SiteKeys) -> None:
    site = table(etl, "twinfed_site")
    stored = connection.execute(select(site.c.value).where(site.c.key == "secret_fingerprint")).scalar_one_or_none()
    if stored is None:
        connection.execute(insert(site).values(key="secret_fingerprint", value=keys.fingerprint))
    elif stored != keys.fingerprint:
        raise SecretError(
            "This database was loaded with a different site secret. Use the secret file of the earlier loads "
            "(--secret-file); with another secret every record would look new and be loaded twice."
        )


def _sequences(connection: Connection, cdm, etl) -> dict[str, int]:
    stored = dict(
        connection.execute(
            select(table(etl, "twinfed_sequence").c.omop_table, table(etl, "twinfed_sequence").c.next_id)
        ).all()
    )
    sequences = {}
    for name, column in ID_COLUMN.items():
        current = connection.execute(select(func.max(table(cdm, name).c[column]))).scalar() or 0
        sequences[name] = max(stored.get(name, 1), current + 1)
    return sequences


def _save_sequences(connection: Connection, etl, sequences: dict[str, int]) -> None:
    seq = table(etl, "twinfed_sequence")
    connection.execute(delete(seq))
    connection.execute(insert(seq), [{"omop_table": k, "next_id": v} for k, v in sequences.items()])


class _Ledger:
    """Which input files and batches are loaded."""

    def __init__(self, engine: Engine, etl, run_id: int) -> None:
        self.engine, self.run_id = engine, run_id
        self.files = table(etl, "twinfed_input_file")
        self.batches = table(etl, "twinfed_batch")

    def classify(self, source: InputFile) -> tuple[str, int, set[int]]:
        """('unchanged' | 'resumed' | 'new', file_id, committed batch numbers)."""
        files = self.files
        with self.engine.begin() as c:
            quick = c.execute(
                select(files.c.file_id, files.c.fingerprint).where(
                    files.c.path == str(source.path),
                    files.c.size == source.size,
                    files.c.mtime_ns == str(source.mtime_ns),
                    files.c.status == "complete",
                )
            ).first()
            if quick is not None:
                source.fingerprint = quick.fingerprint
                return "unchanged", quick.file_id, set()
            source.fingerprint = fingerprint(source)
            row = c.execute(select(files).where(files.c.fingerprint == source.fingerprint)).first()
            if row is not None:
                c.execute(
                    update(files)
                    .where(files.c.file_id == row.file_id)
                    .values(path=str(source.path), size=source.size, mtime_ns=str(source.mtime_ns))
                )
                if row.status == "complete":
                    return "unchanged", row.file_id, set()
                done = set(
                    c.execute(select(self.batches.c.batch_no).where(self.batches.c.file_id == row.file_id)).scalars()
                )
                return "resumed", row.file_id, done
            file_id = (c.execute(select(func.max(files.c.file_id))).scalar() or 0) + 1
            c.execute(
                insert(files).values(
                    file_id=file_id,
                    fingerprint=source.fingerprint,
                    path=str(source.path),
                    size=source.size,
                    mtime_ns=str(source.mtime_ns),
                    kind=source.kind,
                    status="in_progress",
                    records=0,
                    run_id=self.run_id,
                )
            )
            return "new", file_id, set()

    def complete(self, file_id: int) -> int:
        with self.engine.begin() as c:
            records = c.execute(
                select(func.coalesce(func.sum(self.batches.c.records), 0)).where(self.batches.c.file_id == file_id)
            ).scalar()
            c.execute(
                update(self.files)
                .where(self.files.c.file_id == file_id)
                .values(status="complete", records=records, completed_at=dt.datetime.now())
            )
            return int(records)


def _batch_bytes(batch: Batch) -> int:
    if batch.kind == "ndjson":
        return sum(len(line) for line in batch.lines)
    if batch.kind == "csv":
        return sum(len(",".join(row)) + 1 for row in batch.rows)
    return batch.size or len(batch.bundle or b"")  # a Bundle is read by the worker: its file size stands in


def _raw(batch: Batch, extracted: Extracted, index: int) -> str | None:
    raw = extracted.raw.get(index)
    if raw is None and batch.kind == "csv":
        offset = extracted.positions[index] - batch.first_position
        raw = ",".join(batch.rows[offset]).encode() if 0 <= offset < len(batch.rows) else None
    if raw is None and batch.kind == "ndjson":
        offset = extracted.positions[index] - batch.first_position
        if 0 <= offset < len(batch.lines):
            raw = batch.lines[offset]
    return raw.decode("utf-8", errors="replace").rstrip("\n")[:200_000] if raw else None


def _keep_erased_out(
    write: BatchWrite, batch: Batch, ex: Extracted, ctx: RunContext, erased: ErasedIdentifiers
) -> None:
    """Count a defective record of an erased patient as excluded instead of storing its raw form.

    The resolver excludes an erased patient's records by the patient they refer to, but a record
    quarantined before its patient was resolved (not JSON, a bad code, a Patient record failing
    validation) has none: only the identifiers inside its raw form tie it to the patient. Those are
    checked here, just before the quarantine would store the raw record again.
    """
    if not erased or not write.quarantined:
        return
    kept = []
    for index in write.quarantined:
        resource_type, resource_id, patient = ex.types[index], ex.ids[index], ex.patients[index]
        found = quarantine_keys(
            ctx.keys,
            resource_type,
            ctx.keys.key(f"{resource_type}/{resource_id}") if resource_id else None,
            ctx.patient_key(patient) if patient else None,
            _raw(batch, ex, index),
            write.detail[index],
        )
        if not erased.names(found):
            kept.append(index)
            continue
        quarantined = write.counts["quarantined"]
        quarantined[resource_type] -= 1
        if quarantined[resource_type] <= 0:
            del quarantined[resource_type]
        if not quarantined:
            del write.counts["quarantined"]
        write.counts["excluded"][resource_type] += 1
        write.status[index], write.rule[index], write.detail[index] = "excluded", "consent", ERASED_REASON
        write.excluded_reasons[ERASED_REASON] += 1
    write.quarantined = kept


def _write(connection: Connection, cdm, etl, write: BatchWrite, batch: Batch, ex: Extracted, ctx: RunContext) -> None:
    for name, ids in write.deletes.items():
        if not ids:
            continue
        target = table(cdm, name)
        column = target.c["person_id"] if name == "death" else target.c[ID_COLUMN[name]]
        for start in range(0, len(ids), 2000):
            connection.execute(delete(target).where(column.in_(ids[start : start + 2000])))
    for name, rows in write.rows.items():
        if rows:
            insert_rows(connection, table(cdm, name), rows, write.columns[name], plain=True)
    id_map = table(etl, "twinfed_id_map")
    keys = write.replaced_keys
    for start in range(0, len(keys), 2000):
        connection.execute(delete(id_map).where(id_map.c.source_key.in_(keys[start : start + 2000])))
    if write.id_map:
        columns = ["source_key", "omop_table", "omop_id", "person_id", "file_id", "position"]
        insert_rows(connection, id_map, write.id_map, columns, plain=True)
    if write.consents:
        consent = table(etl, "twinfed_consent")
        ids = [c["consent_key"] for c in write.consents]
        connection.execute(delete(consent).where(consent.c.consent_key.in_(ids)))
        insert_rows(connection, consent, [tuple(c.values()) for c in write.consents], list(write.consents[0]))
    if write.quarantined:
        quarantine = table(etl, "twinfed_quarantine")
        first = (connection.execute(select(func.max(quarantine.c.quarantine_id))).scalar() or 0) + 1
        rows = []
        for offset, index in enumerate(write.quarantined):
            resource_id = ex.ids[index]
            patient = ex.patients[index]
            rows.append(
                (
                    first + offset,
                    ctx.run_id,
                    ex.file_id,
                    ex.file_name,
                    ex.position_kind,
                    ex.positions[index],
                    ex.types[index][:64],
                    ctx.keys.key(f"{ex.types[index]}/{resource_id}") if resource_id else None,
                    ctx.patient_key(patient) if patient else None,
                    write.rule[index] or "unknown",
                    write.detail[index] or "",
                    _raw(batch, ex, index),
                )
            )
        insert_rows(connection, quarantine, rows)
    counts = {status: dict(by_type) for status, by_type in write.counts.items()}
    connection.execute(
        insert(table(etl, "twinfed_batch")).values(
            file_id=ex.file_id,
            batch_no=ex.batch_no,
            run_id=ctx.run_id,
            first_position=ex.positions[0] if ex.positions else batch.first_position,
            last_position=ex.positions[-1] if ex.positions else batch.first_position,
            records=len(ex),
            counts=orjson.dumps(counts).decode(),
            committed_at=dt.datetime.now(),
        )
    )
    _save_sequences(connection, etl, ctx.sequences)


_WORKER: dict = {}


def _init_worker(db_url: str, schema: str | None, secret: bytes, options: Options, excluded: dict[bytes, str],
                 current_file_ids: set[int]) -> None:  # fmt: skip
    """Worker start-up: a read-only view of the database, to resolve clinical facts next to their validation."""
    from omop_etl.schema import cdm_metadata

    engine = open_engine(db_url)
    cdm, etl = cdm_metadata(schema), etl_metadata(schema)
    ctx = RunContext(cdm, etl, SiteKeys(secret), options, 0, current_file_ids, {}, excluded)
    _WORKER.update(engine=engine, ctx=ctx)


def _process(batch: Batch) -> Extracted | ResolvedEvents:
    """Worker entry: validate and extract; resolve the batch too when it holds clinical facts only.

    Patients, encounters and sites of earlier files are committed before a file's first batch is handed
    out, so a worker reading the database sees everything the facts refer to.
    """
    extracted = extract_batch(batch)
    if batch.kind == "bundle" or not _WORKER:
        return extracted
    with _WORKER["engine"].connect() as connection:
        resolved = resolve_events(_WORKER["ctx"], connection, extracted)
    return resolved if resolved is not None else extracted


def _work(plan: list, batch_size: int):
    """(source, batch) for every batch still to load, and (source, None) after each file's last batch."""
    for source, status, file_id, committed in plan:
        if status in ("unchanged", "duplicate"):
            continue
        source.file_id, source.resumed = file_id, status == "resumed"
        for number, batch in enumerate(batches(source, file_id, batch_size, committed)):
            batch.first_of_file = number == 0
            yield source, batch
        yield source, None


class _Extractor:
    """Runs extraction in worker processes with a bounded number of batches in flight (flat memory)."""

    def __init__(self, workers: int, initargs: tuple | None = None) -> None:
        self.workers = workers
        self.pool = None
        if workers > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=initargs or ())  # fmt: skip

    def run(self, items):
        """(source, batch, result) in input order, and (source, None, None) at the end of each file.

        Batches of a file whose facts are resolved in the workers are only handed out once everything
        before them is committed: the workers read patients and visits from the database.
        """
        if self.pool is None:
            for source, batch in items:
                yield source, batch, (extract_batch(batch) if batch is not None else None)
            return
        pending: deque = deque()
        for source, batch in items:
            if batch is None:
                pending.append((source, None, None))
                continue
            if batch.first_of_file and batch.kind != "bundle":
                while pending:
                    yield self._result(pending.popleft())
            pending.append((source, batch, self.pool.submit(_process, batch)))
            while sum(1 for _, b, _ in pending if b is not None) >= 2 * self.workers:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    @staticmethod
    def _result(item):
        source, batch, future = item
        return source, batch, (future.result() if future is not None else None)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def run_etl(inputs: list[Path], settings: EtlSettings, on_progress: ProgressCallback | None = None) -> EtlReport:
    """Load FHIR inputs into the OMOP database at settings.db_url. See the module docstring."""
    began = time.perf_counter()
    sources = discover(inputs)
    engine = open_engine(settings.db_url, bulk_load=True)
    try:
        cdm, etl = _prepare(engine, settings.schema)
        secret, _ = load_or_create_secret(secret_path(settings.secret_file))
        keys = SiteKeys(secret)
        run_table = table(etl, "twinfed_run")
        with engine.begin() as c:
            _check_secret(c, etl, keys)
            run_id = (c.execute(select(func.max(run_table.c.run_id))).scalar() or 0) + 1
            c.execute(insert(run_table).values(run_id=run_id, started_at=dt.datetime.now(), status="running"))
            sequences = _sequences(c, cdm, etl)
            erased = erased_identifiers(c, etl)
        ledger = _Ledger(engine, etl, run_id)
        plan = []
        first_copy: dict[str, Path] = {}
        for source in sources:
            status, file_id, committed = ledger.classify(source)
            if source.fingerprint in first_copy:  # the same content twice in one input: load it once
                status = "duplicate"
            first_copy.setdefault(source.fingerprint, source.path)
            plan.append((source, status, file_id, committed))
        excluded = erased.exclusions()
        if settings.exclude_opted_out:
            for patient in consent_denials([s for s, status, _, _ in plan if status in ("new", "resumed")]):
                excluded.setdefault(keys.key(f"Patient/{patient}"), "patient denies research use (--exclude-opted-out)")
        options = Options(exclude_opted_out=settings.exclude_opted_out, max_date=export_date(inputs))
        ctx = RunContext(cdm, etl, keys, options, run_id, {file_id for _, _, file_id, _ in plan}, sequences, excluded)
        totals: dict[str, Counter] = {status: Counter() for status in STATUSES}
        rows_by_table: Counter = Counter()
        reasons = {"quarantine": Counter(), "skipped": Counter(), "excluded": Counter()}
        unconverted: Counter = Counter()
        unlinked = 0
        outcomes: list[FileOutcome] = []
        total_bytes = sum(s.size for s, status, _, _ in plan if status not in ("unchanged", "duplicate")) or 1
        done_bytes = 0
        large = total_bytes > 20_000_000
        workers = settings.workers or (max(1, min(os.cpu_count() or 1, 4)) if large else 1)
        extractor = _Extractor(
            workers, (settings.db_url, settings.schema, secret, options, excluded, ctx.current_file_ids)
        )
        deferred = defer_indexes(engine, cdm) if large else []
        try:
            for source, status, _, _ in plan:
                if status in ("unchanged", "duplicate"):
                    outcomes.append(FileOutcome(path=str(source.path), kind=source.kind, status=status,
                                                records=0, fingerprint=source.fingerprint))  # fmt: skip
            file_records: Counter = Counter()
            for source, batch, result in extractor.run(_work(plan, settings.batch_size)):
                if batch is None:  # the file's last batch is committed
                    ledger.complete(source.file_id)
                    outcomes.append(FileOutcome(path=str(source.path), kind=source.kind,
                                                status="resumed" if source.resumed else "loaded",
                                                records=file_records[source.file_id],
                                                fingerprint=source.fingerprint))  # fmt: skip
                    continue
                with engine.begin() as connection:
                    if isinstance(result, ResolvedEvents):
                        extracted = result.extracted
                        write = finalize_events(ctx, connection, result)
                    else:
                        extracted = result
                        write = BatchResolver(ctx, connection, extracted).resolve()
                    _keep_erased_out(write, batch, extracted, ctx, erased)
                    _write(connection, cdm, etl, write, batch, extracted, ctx)
                file_records[source.file_id] += len(extracted)
                for status_name, by_type in write.counts.items():
                    totals[status_name].update(by_type)
                for name, table_rows in write.rows.items():
                    rows_by_table[name] += len(table_rows)
                for index in write.quarantined:
                    reasons["quarantine"][write.rule[index]] += 1
                reasons["skipped"].update(write.skipped_reasons)
                reasons["excluded"].update(write.excluded_reasons)
                unconverted.update(write.unconverted_units)
                unlinked += write.unlinked_visits
                if on_progress:
                    done_bytes += _batch_bytes(batch)
                    on_progress(done_bytes, total_bytes, source.path.name)
        finally:
            extractor.close()
        restore_indexes(engine, cdm, deferred)
        changed = any(o.status in ("loaded", "resumed") for o in outcomes)
        with engine.begin() as connection:
            if changed or derived.missing(connection, cdm):
                rows_by_table["observation_period"] += derived.observation_periods(connection, cdm)
                derived.cdm_source(connection, cdm, options.max_date)
        seconds = time.perf_counter() - began
        report = _report(
            run_id, settings, options, totals, reasons, rows_by_table, ctx, unconverted, unlinked, outcomes, seconds
        )
        with engine.begin() as c:
            c.execute(
                update(run_table)
                .where(run_table.c.run_id == run_id)
                .values(finished_at=dt.datetime.now(), status="complete", report=report.model_dump_json())
            )
        return report
    finally:
        engine.dispose()


def _report(run_id, settings, options, totals, reasons, rows_by_table, ctx, unconverted, unlinked, outcomes, seconds):
    all_records: Counter = Counter()
    for by_type in totals.values():
        all_records.update(by_type)
    tallies = {status: Tally.of(totals[status]) for status in STATUSES}
    reconciles = all(all_records[t] == sum(totals[s][t] for s in STATUSES) for t in all_records) and sum(
        all_records.values()
    ) == sum(t.total for t in tallies.values())
    top = ctx.codes.unmapped.most_common(25)
    return EtlReport(
        run_id=run_id,
        database=redact(settings.db_url) + (f" (schema {settings.schema})" if settings.schema else ""),
        export_date_limit=options.max_date,
        input=Tally.of(all_records),
        loaded=tallies["loaded"],
        quarantined=tallies["quarantined"],
        skipped=tallies["skipped"],
        excluded=tallies["excluded"],
        reconciles=reconciles,
        quarantine_by_rule=dict(reasons["quarantine"].most_common()),
        skipped_by_reason=dict(reasons["skipped"].most_common()),
        excluded_by_reason=dict(reasons["excluded"].most_common()),
        rows_by_table=dict(sorted(rows_by_table.items())),
        unmapped_codes=[CodeCount(system=s, code=c, count=n) for (s, c), n in top],
        site_mapped_codes=[CodeCount(system=s, code=c, count=n) for (s, c), n in ctx.codes.site_mapped.most_common(25)],
        site_mapped_events=sum(ctx.codes.site_mapped.values()),
        unconverted_units=[UnitCount(code=c, unit=u, count=n) for (c, u), n in unconverted.most_common(25)],
        unlinked_visit_references=unlinked,
        files=outcomes,
        seconds=round(seconds, 3),
        records_per_second=round(sum(all_records.values()) / seconds, 1) if seconds > 0 else 0.0,
    )


__all__ = ["EtlError", "EtlSettings", "run_etl"]
