"""The hash-chained audit log on SQLite and PostgreSQL: tampering done directly in the database (edited,
deleted, reordered, rewritten and truncated rows) is found by `verify`, which names the entry."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, text, update

from omop_etl.database import open_engine
from site_node.governance import AuditLog, GovernanceStore
from site_node.governance.audit import entry_hash

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """An empty governance store; on PostgreSQL in a throw-away schema."""
    if request.param == "sqlite":
        opened = GovernanceStore(f"sqlite:///{tmp_path / 'governance.sqlite'}")
        yield opened
        opened.dispose()
        return
    url = request.getfixturevalue("pg_url")
    schema = f"gov_test_{uuid.uuid4().hex[:10]}"
    opened = GovernanceStore(url, schema=schema)
    yield opened
    opened.dispose()
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture
def log(store, tmp_path):
    """A log of five entries, its head mirrored to a file outside the database."""
    audit = AuditLog(store, tmp_path / "audit.head")
    audit.append("study-approved", {"study_hash": "ab" * 32, "by": "steward"})
    audit.append("round-started", {"round": "r1", "noise_multiplier": 1.1, "steps": np.int64(40)})
    audit.append("round-trained", {"round": "r1", "left_the_site": {"metrics": {"epsilon": 0.9}, "suppressed": []}})
    audit.append("refused", {"round": "r2", "reason": "the study privacy ceiling of ε=1.00 …"})
    audit.append("consent-withdrawn", {"person_id": 17})
    return audit


def _tamper(store: GovernanceStore, statement) -> None:
    with store.engine.begin() as connection:
        connection.execute(statement)


def test_an_untouched_log_verifies_and_reads_back(log, tmp_path):
    result = log.verify()
    assert result.ok and result.problems == [] and result.entries == 5 and result.head_checked
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[1].payload == {"round": "r1", "noise_multiplier": 1.1, "steps": 40}
    assert entries[3].payload["reason"].endswith("ε=1.00 …")
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(entries))
    assert entries[0].hash == entry_hash(
        "0" * 64, 1, entries[0].at.isoformat(timespec="microseconds"), "study-approved", entries[0].payload
    )
    head = json.loads((tmp_path / "audit.head").read_text())
    assert (head["seq"], head["hash"], head["signed_from"]) == (5, entries[-1].hash, 1)
    assert result.signed and all(e.signature for e in entries)  # signed with the key beside the head file
    assert (tmp_path / "audit.key").stat().st_mode & 0o777 == 0o600
    assert [e.seq for e in log.entries(kind="round-started")] == [2]


def test_an_edited_payload_is_named(log, store):
    table = store.tables["audit"]
    _tamper(store, update(table).where(table.c.seq == 3).values(payload='{"round":"r1","left_the_site":{}}'))
    result = log.verify()
    assert not result.ok
    assert len(result.problems) == 1
    assert result.problems[0].startswith("entry 3 (round-trained") and "was edited" in result.problems[0]


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(log, store):
    table = store.tables["audit"]
    original = log.entries()[2]
    forged = {"round": "r1", "left_the_site": {}}
    digest = entry_hash(original.prev_hash, 3, original.at.isoformat(timespec="microseconds"), original.kind, forged)
    _tamper(store, update(table).where(table.c.seq == 3).values(payload=json.dumps(forged), hash=digest))
    result = log.verify()
    assert result.problems[0] == "entry 4 does not follow entry 3: entry 3 was replaced or its hash rewritten."
    # and the rewritten entry cannot carry the site's signature of its new hash without the audit key
    assert result.problems[1].startswith("entry 3 (round-trained") and "no valid signature" in result.problems[1]
    assert len(result.problems) == 2


def test_a_deleted_middle_entry_is_named(log, store):
    table = store.tables["audit"]
    _tamper(store, delete(table).where(table.c.seq == 3))
    result = log.verify()
    assert result.problems == ["entry 3 is missing: deleted from the log (entry 4 follows entry 2)."]


def test_swapped_entries_are_reported_as_reordered(log, store):
    table = store.tables["audit"]
    _tamper(store, update(table).where(table.c.seq == 2).values(seq=-2))
    _tamper(store, update(table).where(table.c.seq == 3).values(seq=2))
    _tamper(store, update(table).where(table.c.seq == -2).values(seq=3))
    result = log.verify()
    assert len(result.problems) == 2
    assert result.problems[0].startswith("entry 2 (round-trained")
    assert result.problems[0].endswith("was written as entry 3: entries were reordered.")
    assert result.problems[1].startswith("entry 3 (round-started")
    assert result.problems[1].endswith("was written as entry 2: entries were reordered.")


def test_a_deleted_tail_is_caught_by_the_head_file(log, store, tmp_path):
    table = store.tables["audit"]
    _tamper(store, delete(table).where(table.c.seq >= 4))
    assert AuditLog(store).verify().ok  # the chain alone cannot see a cut-off tail: that is why the head exists
    result = log.verify()
    assert not result.ok
    assert len(result.problems) == 1
    assert "truncated" in result.problems[0] and "entries 4-5" in result.problems[0]
    assert "ends at entry 3" in result.problems[0]


def test_appending_after_truncation_keeps_the_gap_visible(log, store):
    table = store.tables["audit"]
    _tamper(store, delete(table).where(table.c.seq == 5))
    entry = log.append("round-started", {"round": "r3"})
    assert entry.seq == 6
    result = log.verify()
    assert result.problems == ["entry 5 is missing: deleted from the log (entry 6 follows entry 4)."]


def test_a_missing_head_file_is_reported(log, tmp_path):
    (tmp_path / "audit.head").unlink()
    result = log.verify()
    assert not result.ok and "head file" in result.problems[0] and "missing" in result.problems[0]


def test_the_log_has_no_way_to_change_history():
    public = {name for name in dir(AuditLog) if not name.startswith("_")}
    writers = {"append", "appending", "flush_heads", "discard_pending"}  # appending only, never changing
    assert public == writers | {"count", "entries", "head", "key", "latest", "read_head", "verify"}


def test_a_payload_that_is_not_json_is_refused_before_writing(log):
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        log.append("odd", {"value": object()})
    assert log.count() == 5 and log.verify().ok


def test_processes_appending_at_once_keep_one_unbroken_chain(store, tmp_path):
    """Several site-node processes (one ClientApp process per message) append to the same log concurrently."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from site_node.governance import AuditLog, GovernanceStore\n"
        "store = GovernanceStore(sys.argv[1], schema=sys.argv[2] or None)\n"
        "log = AuditLog(store, Path(sys.argv[3]))\n"
        "for i in range(15):\n"
        "    log.append('round-started', {'process': sys.argv[4], 'i': i})\n"
    )
    url = store.url
    schema = store.schema or ""
    head = tmp_path / "shared.head"
    children = [
        subprocess.Popen([sys.executable, "-c", code, url, schema, str(head), str(n)], cwd=ROOT, stderr=subprocess.PIPE)
        for n in range(4)
    ]
    for child in children:
        assert child.wait(timeout=120) == 0, child.stderr.read().decode()
    log = AuditLog(store, head)
    result = log.verify()
    assert result.ok, result.problems
    assert result.entries == 60 and log.read_head()[0] == 60
