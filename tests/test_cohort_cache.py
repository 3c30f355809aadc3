"""A study's dataset is reused between rounds only while its inputs are provably unchanged.

Each test works on its own copy of a real ETL-loaded hospital (SQLite). Whether a result was reused is
shown by marking the cached entry: a reused dataset carries the mark, a rebuilt one does not.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, insert, text

from federation.contract import study_hash
from omop_etl.load.state import etl_metadata, table
from site_node.cohort import build_dataset
from site_node.cohort.cache import CohortCache, cached_dataset
from site_node.config import load_site_config
from tests.site_helpers import study

MARK = -1  # a cohort size no build produces


@pytest.fixture
def omop(prepared_site: Path, tmp_path: Path) -> tuple[str, bytes]:
    """A private copy of the prepared hospital's OMOP database; (URL, split key)."""
    config = load_site_config(prepared_site / "site.yaml")
    source = sqlite3.connect(config.omop.url.removeprefix("sqlite:///"))
    copy = sqlite3.connect(tmp_path / "omop.sqlite")
    source.backup(copy)
    source.close()
    copy.execute("PRAGMA journal_mode=WAL")
    copy.close()
    return f"sqlite:///{tmp_path / 'omop.sqlite'}", config.split_key()


def _mark(cache: CohortCache) -> None:
    (slot,) = cache.entries
    key, built, dataset = cache.entries[slot]
    dataset.cohort_size = MARK
    cache.entries[slot] = (key, built, dataset)


def _deny(url: str, person: int, start: str) -> None:
    """Record an active research denial for `person` in the consent registry, in force from `start`."""
    consent = table(etl_metadata(), "twinfed_consent")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            insert(consent).values(
                consent_key=os.urandom(16), patient_key=os.urandom(16), person_id=person, status="active",
                provision="deny", scope="research", period_start=start, file_id=0, position=0,
            )
        )  # fmt: skip
    engine.dispose()


def _round(url: str, split_key: bytes, cache: CohortCache, withdrawn=()):
    spec = study()
    return cached_dataset(url, spec, study_hash(spec), split_key=split_key, withdrawn=withdrawn, cache=cache)


def test_an_unchanged_database_reuses_the_dataset_and_a_copy_is_handed_out(omop):
    url, split_key = omop
    cache = CohortCache()
    first = _round(url, split_key, cache)
    spec = study()
    assert first.snapshot_hash == build_dataset(url, spec, split_key=split_key).snapshot_hash
    _mark(cache)
    again = _round(url, split_key, cache)
    assert again.cohort_size == MARK and again.snapshot_hash == first.snapshot_hash
    again.features[:] = 0  # a caller changing its arrays does not change what the next round gets
    assert np.array_equal(_round(url, split_key, cache).features, first.features)


def test_a_withdrawal_is_never_served_from_the_cache(omop):
    url, split_key = omop
    cache = CohortCache()
    first = _round(url, split_key, cache)
    _mark(cache)
    person = int(first.person_ids[0])
    after = _round(url, split_key, cache, withdrawn={person})
    assert after.cohort_size != MARK and person not in after.person_ids
    assert len(after.person_ids) == len(first.person_ids) - 1
    assert after.excluded_by_consent == first.excluded_by_consent + 1
    assert len(cache.entries) == 1  # the build with the withdrawn patient's data was replaced


def test_a_consent_denial_in_omop_is_never_served_from_the_cache(omop):
    url, split_key = omop
    cache = CohortCache()
    first = _round(url, split_key, cache)
    _mark(cache)
    person = int(first.person_ids[-1])
    _deny(url, person, dt.date.today().isoformat())
    after = _round(url, split_key, cache)
    assert after.cohort_size != MARK and person not in after.person_ids


def test_a_denial_that_starts_between_rounds_is_honoured_with_the_database_unchanged(omop):
    url, split_key = omop
    person = int(build_dataset(url, study(), split_key=split_key).person_ids[0])
    starts = dt.datetime.now() + dt.timedelta(seconds=2)
    _deny(url, person, starts.isoformat(timespec="seconds"))  # recorded now, in force from `starts`
    cache = CohortCache()
    before = _round(url, split_key, cache)
    assert person in before.person_ids
    _mark(cache)
    time.sleep(max(0.0, (starts - dt.datetime.now()).total_seconds()) + 1.0)
    after = _round(url, split_key, cache)
    assert after.cohort_size != MARK and person not in after.person_ids


def test_any_write_to_the_omop_database_rebuilds(omop):
    url, split_key = omop
    cache = CohortCache()
    first = _round(url, split_key, cache)
    _mark(cache)
    engine = create_engine(url)
    with engine.begin() as connection:  # a correction to one patient's record, as a reload would make
        connection.execute(text("UPDATE person SET year_of_birth = year_of_birth - 1 WHERE person_id = :p"),
                           {"p": int(first.person_ids[0])})  # fmt: skip
    engine.dispose()
    after = _round(url, split_key, cache)
    assert after.cohort_size != MARK
    assert after.snapshot_hash != first.snapshot_hash  # the age feature of that patient changed


def test_builds_travel_to_the_executor_through_a_pipe(omop):
    url, split_key = omop
    read_end, write_end = os.pipe()
    received = bytearray()

    def executor_reads() -> None:  # as the warm executor does while its child runs: a pipe holds 64 KiB
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=executor_reads)
    reader.start()
    try:
        dataset = _round(url, split_key, CohortCache(sink=write_end))
    finally:
        os.close(write_end)
        reader.join(timeout=30)
        os.close(read_end)
    executor = CohortCache()
    assert executor.absorb(bytes(received[:-1])) == 0  # a frame cut short (a child that died) is ignored
    assert executor.absorb(bytes(received)) == 1
    _, _, kept = next(iter(executor.entries.values()))
    assert kept.snapshot_hash == dataset.snapshot_hash
    _mark(executor)
    assert _round(url, split_key, executor).cohort_size == MARK  # the next round's child reuses it
