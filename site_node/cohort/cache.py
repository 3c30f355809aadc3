"""Reuse a study's dataset between rounds, only while everything it was built from is provably unchanged.

Building the cohort and features from OMOP is most of an evaluation round's work and a good part of a
training round's, and a study asks for exactly the same dataset every round unless one of its inputs
changed. So a round reuses the last build only when all of these are the same (the cache key):

* the study (its hash), the database (URL and schema) and the site's split key;
* the OMOP database's state: for a SQLite file, its change counter, size, time and inode and its
  write-ahead log's header, size and time (every committed write changes one of them). PostgreSQL has
  no cheap marker that is both exact and limited to one database (its statistics lag by up to a second;
  its log position moves with every write in the cluster, the site's own ledger included), so there,
  as with any state that cannot be read, nothing is reused;
* who is withheld: the active research denials in the consent registry as of this round, re-read from
  OMOP every round (a consent that starts or ends by date counts the moment it does), and the site's
  recorded withdrawals.

Consent is part of the key, never part of what is reused: a new withdrawal or consent change always
builds afresh, and features are only ever computed for patients not withheld. A build is kept only when
the database's state was the same before and after it. There is one entry per study and database, so a
new build replaces the old one (the data of a patient who withdrew does not linger), and an entry is
dropped an hour after it was built.

Under the warm executor (site_node.warm_executor) each round runs in a forked child whose memory ends
with it: the child sends what it built to the executor through a pipe (`sink`), and the next round's
child inherits it. Elsewhere (`twinfed site train-local`, Flower's subprocess isolation) the cache lives
in the one process.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import os
import pickle
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from federation.contract import StudySpec
from site_node.cohort.build import build_dataset
from site_node.cohort.consent import denying_person_ids
from site_node.cohort.dataset import StudyDataset
from site_node.cohort.omop_source import OmopSource

MAX_AGE_S = 3600.0
_FRAME = struct.Struct("<Q")  # length prefix of one pickled (key, dataset) sent to the executor


@dataclass(frozen=True)
class CohortKey:
    study_hash: str
    database: str  # a digest of the URL and schema
    split_key: str  # a digest of the site's split key
    omop_state: str | None  # None: the database's state cannot be read (nothing built from it is reused)
    withheld: str  # a digest of the sorted withheld person ids

    @property
    def digest(self) -> str:
        """One hex digest of the whole key, for what is kept on disk (the patient twin's calibration)."""
        return _digest([self.study_hash, self.database, self.split_key, self.omop_state, self.withheld])

    @property
    def slot(self) -> tuple[str, str]:
        """One entry per study and database: a newer build of the same replaces the older."""
        return self.study_hash, self.database


@dataclass
class CohortCache:
    """This process's reusable datasets; `sink` is the pipe to the warm executor, when there is one."""

    max_age_s: float = MAX_AGE_S
    sink: int | None = None
    entries: dict[tuple[str, str], tuple[CohortKey, float, StudyDataset]] = field(default_factory=dict)

    def get(self, key: CohortKey) -> StudyDataset | None:
        self.expire()
        entry = self.entries.get(key.slot)
        if entry is None or entry[0] != key:
            return None
        return copy.deepcopy(entry[2])  # the caller may change its arrays; the entry must stay as built

    def put(self, key: CohortKey, dataset: StudyDataset) -> None:
        self.entries[key.slot] = (key, time.monotonic(), copy.deepcopy(dataset))
        if self.sink is not None:
            frame = pickle.dumps((key, dataset), protocol=pickle.HIGHEST_PROTOCOL)
            _write_all(self.sink, _FRAME.pack(len(frame)) + frame)

    def absorb(self, data: bytes) -> int:
        """Store the builds a round's child sent (complete frames only); returns how many."""
        count, offset = 0, 0
        while offset + _FRAME.size <= len(data):
            (length,) = _FRAME.unpack_from(data, offset)
            start, offset = offset + _FRAME.size, offset + _FRAME.size + length
            if offset > len(data):
                break
            key, dataset = pickle.loads(data[start:offset])  # written by our own child: see the docstring
            self.entries[key.slot] = (key, time.monotonic(), dataset)
            count += 1
        return count

    def expire(self) -> None:
        cutoff = time.monotonic() - self.max_age_s
        for slot in [s for s, (_, built, _) in self.entries.items() if built < cutoff]:
            del self.entries[slot]


CACHE = CohortCache()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _digest(parts: Iterable[object]) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def sqlite_state(path: Path) -> str | None:
    """The change counter, size, times and inode of a SQLite file and of its write-ahead log."""
    try:
        with path.open("rb") as handle:
            header = handle.read(100)
        info = path.stat()
    except OSError:
        return None
    parts: list[object] = [header[24:28].hex(), header[92:96].hex(), info.st_size, info.st_mtime_ns, info.st_ino]
    # The log is created empty when a connection opens and removed when the last one closes, after its
    # frames went into the file (which then changes): only a log with frames in it says anything.
    wal = path.with_name(path.name + "-wal")
    try:
        with wal.open("rb") as handle:
            wal_header = handle.read(32)
        wal_info = wal.stat()
    except FileNotFoundError:
        wal_header, wal_info = b"", None
    except OSError:
        return None
    if wal_info is not None and wal_info.st_size > 0:
        parts += [wal_header.hex(), wal_info.st_size, wal_info.st_mtime_ns, wal_info.st_ino]
    return _digest(parts)


def omop_state(db_url: str, source: OmopSource) -> str | None:
    """A token that changes whenever the OMOP database may have changed; None: cannot tell, do not reuse."""
    if source.dialect == "sqlite":
        database = make_url(db_url).database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return sqlite_state(Path(database).resolve())
    return None


def cohort_key(
    db_url: str,
    study_hash: str,
    *,
    split_key: bytes,
    schema: str | None = None,
    withdrawn: Iterable[int] = (),
    as_of: dt.datetime | None = None,
) -> CohortKey:
    """What a study's dataset at this site is built from, as of now: the key of the module docstring (its
    `omop_state` None when the database's state cannot be read). Reads the consent registry, nothing else."""
    moment = as_of if as_of is not None else dt.datetime.now()
    with OmopSource.open(db_url, schema) as source:
        state = omop_state(db_url, source)
        withheld = denying_person_ids(source, moment) | {int(p) for p in withdrawn}
    return CohortKey(
        study_hash=study_hash,
        database=_digest([db_url, schema or ""]),
        split_key=hashlib.sha256(split_key).hexdigest(),
        omop_state=state,
        withheld=_digest(sorted(withheld)),
    )


def cached_dataset(
    db_url: str,
    spec: StudySpec,
    study_hash: str,
    *,
    split_key: bytes,
    schema: str | None = None,
    withdrawn: Iterable[int] = (),
    cache: CohortCache = CACHE,
) -> StudyDataset:
    """`build_dataset` for this round, reusing the last build when its key (module docstring) matches."""
    moment = dt.datetime.now()
    extra = {int(p) for p in withdrawn}
    key = cohort_key(db_url, study_hash, split_key=split_key, schema=schema, withdrawn=extra, as_of=moment)
    if key.omop_state is None:
        return build_dataset(db_url, spec, split_key=split_key, schema=schema, extra_excluded_person_ids=extra)
    state = key.omop_state
    reused = cache.get(key)
    if reused is not None:
        return reused
    dataset = build_dataset(
        db_url, spec, split_key=split_key, schema=schema, extra_excluded_person_ids=extra, as_of=moment
    )
    with OmopSource.open(db_url, schema) as source:
        unchanged = omop_state(db_url, source) == state
    if unchanged:
        cache.put(key, dataset)
    return dataset
