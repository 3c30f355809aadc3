"""The warm ClientApp runtime (`twinfed site start`, default `--isolation process`) with real processes.

A site's long-lived executor keeps torch and the site code imported and forks a process per task; the
SuperNode runs with short waits. This checks, over TLS with a real coordinator, that rounds run through
it (and not through Flower's per-message `flwr-clientapp` processes), that each round reports the site's
own compute time, and that nothing of one round is carried into the next: a consent withdrawal recorded
while round 1 trains is honoured by round 2, run by the very same warm executor.
"""

from __future__ import annotations

import time

import pytest
import yaml

from federation.contract import load_study, study_hash
from federation.contract.receipts import Participation, read_receipts
from federation.deploy.provision import ConsortiumLayout, init_consortium
from site_node.config import load_site_config
from site_node.participation import SiteNode
from site_node.warm_executor import READY_TEXT
from tests.process_helpers import TWINFED, Running, free_port
from tests.site_helpers import EXAMPLE_STUDY, fresh_site

FLOWER_CLIENTAPP_PROCESS = "Start `flwr-clientapp` process"  # what Flower's per-message process logs first


@pytest.mark.timeout(300)
def test_warm_runtime_trains_and_honours_a_withdrawal_recorded_between_rounds(prepared_site, tmp_path):
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost", "127.0.0.1"], ["aster"])
    keys = ConsortiumLayout(root)
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"].update({"rounds": 2, "local_epochs": 1})
    raw["federation"].update({"min_sites": 1, "secure_aggregation": False, "round_timeout_seconds": 60})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec, digest = load_study(study), study_hash(load_study(study))
    site_file = fresh_site(prepared_site, tmp_path / "aster")
    config = yaml.safe_load(site_file.read_text())
    site_file.write_text(yaml.safe_dump({**config, "site_id": "aster"}), encoding="utf-8")
    node = SiteNode(load_site_config(site_file))
    node.governance.approvals.approve(digest, spec.study.id, "aster steward")

    port = free_port()
    coordinator = Running([TWINFED, "coordinator", "start", "--dir", str(root), "--port", str(port)])
    site = None
    try:
        coordinator.wait_for("Coordinator running", timeout=60)
        site = Running(
            [TWINFED, "site", "start", "--site-config", str(site_file), "--superlink", f"127.0.0.1:{port}",
             "--ca", str(keys.site_ca("aster")), "--key", str(keys.site_key("aster")),
             "--runtime-port", str(free_port())]
        )  # fmt: skip
        site.wait_for("process isolation", timeout=30)
        site.wait_for("ClientApp runtime ready", timeout=120)
        run = Running([TWINFED, "study", "run", str(study), "--coordinator-dir", str(root), "--wait-for-sites", "60"])
        # Round 1 has read the withdrawals and chosen its patients once its membership is recorded; round 2
        # reads them again seconds later (after round 1 trains and evaluates): record a withdrawal between.
        deadline = time.monotonic() + 150
        while not (first := node.governance.membership.members(digest, f"{spec.study.id}:1")):
            assert time.monotonic() < deadline and run.process.poll() is None, run.output
            time.sleep(0.05)
        withdrawn = min(first)
        node.governance.withdrawals.withdraw(withdrawn, "aster steward", "patient withdrew consent")
        assert run.wait(timeout=150) == 0, run.output
        assert "Round 2/2" in run.output
    finally:
        if site is not None:
            site.kill_group()
        coordinator.kill_group()

    second = node.governance.membership.members(digest, f"{spec.study.id}:2")
    assert withdrawn not in second and second == first - {withdrawn}
    receipts = read_receipts(root / "studies" / spec.study.id / spec.study.id / "receipts.jsonl")
    sites = {(r.server_round, r.phase): r.sites[0] for r in receipts}
    for (_, phase), receipt in sites.items():
        assert receipt.status == (Participation.TRAINED if phase == "train" else Participation.EVALUATED), receipt
        assert 0 < receipt.metrics["compute-seconds"] < receipt.seconds
    # what the site answered says the consent state changed, and so did the data trained on
    assert sites[(1, "train")].consent_snapshot != sites[(2, "train")].consent_snapshot
    assert sites[(1, "train")].cohort_snapshot != sites[(2, "train")].cohort_snapshot
    assert sites[(2, "evaluate")].consent_snapshot == sites[(2, "train")].consent_snapshot

    log = (tmp_path / "aster" / "supernode.log").read_text(encoding="utf-8", errors="replace")
    assert READY_TEXT in log and FLOWER_CLIENTAPP_PROCESS not in log
    assert node.governance.audit.verify().ok


def _message(run_id: int, message_id: str, reply_to: str = ""):
    from flwr.app import Metadata, RecordDict
    from flwr.app.message.message import make_message

    metadata = Metadata(
        run_id=run_id, message_id=message_id, src_node_id=1, dst_node_id=2, reply_to_message_id=reply_to,
        group_id="2", created_at=time.time(), ttl=150.0, message_type="train",
    )  # fmt: skip
    return make_message(metadata=metadata, content=RecordDict())


def test_a_reply_left_behind_by_a_dead_runs_message_is_sent_at_the_next_pull():
    """After a coordinator restart the SuperNode sent a dead run's reply in the resumed run's turn; the
    resumed run's own reply then waited for a next message that never came (CI, both sites timed out).
    The paced pull hands the loop any reply that is waiting, and only then."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from site_node.flower_runtime import Pacing, paced_pull, ready_reply_run

    state = InMemoryNodeState(ObjectStoreFactory().store())
    nothing_new = paced_pull(lambda **_: None, Pacing())
    state.store_message(_message(41, "a" * 64))  # the resumed run's message, its ClientApp still working
    assert ready_reply_run(state) is None and nothing_new(state=state) is None, "no reply: nothing to send"
    state.store_message(_message(41, "b" * 64, reply_to="a" * 64))  # its reply, finished after the loop moved on
    assert nothing_new(state=state) == 41, "the loop is told to send it now"
    assert [m.metadata.message_id for m in state.get_messages_legacy(is_reply=True)] == ["b" * 64], "still there"
    assert nothing_new(state=state) is None, "a reply the loop took is not handed over twice"
    assert paced_pull(lambda **_: 7, Pacing())(state=state) == 7, "a pulled message goes first, as in Flower"
