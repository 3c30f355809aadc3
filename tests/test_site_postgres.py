"""A site whose OMOP database and governance database are on PostgreSQL (the production layout):
a round trains, evaluates and is audited exactly as on SQLite."""

from __future__ import annotations

import uuid

import pytest
import yaml
from sqlalchemy import text

from federation.contract import study_hash
from federation.contract.protocol import SiteStatus
from omop_etl.database import open_engine
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.etl_helpers import load
from tests.site_helpers import TEST_POLICY, evaluate_like_the_coordinator, initial_state, instruction, study

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_schemas(pg_url):
    suffix = uuid.uuid4().hex[:8]
    schemas = (f"site_cdm_{suffix}", f"site_gov_{suffix}")
    yield schemas
    engine = open_engine(pg_url)
    with engine.begin() as connection:
        for schema in schemas:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def test_round_on_postgresql(small_consortium, pg_url, pg_schemas, tmp_path):
    cdm, gov = pg_schemas
    secret = tmp_path / "site.secret"
    load([small_consortium / "aster-university" / "fhir"], pg_url, secret, schema=cdm)
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({**TEST_POLICY, "min_cohort_size": 20}))
    (tmp_path / "site.yaml").write_text(
        yaml.safe_dump(
            {
                "site_id": "aster-university",
                "omop": {"url": pg_url, "schema": cdm},
                "governance_db": pg_url,
                "governance_schema": gov,
                "policy": "policy.yaml",
                "secret_file": str(secret),
            }
        )
    )
    node = SiteNode(load_site_config(tmp_path / "site.yaml"))
    spec = study(training={"rounds": 2, "batch_size": 16})
    node.governance.approvals.approve(study_hash(spec), spec.study.id, "steward")
    state = initial_state(spec, node.feature_count(spec))
    trained = node.train(instruction(spec), state)
    assert trained.answer.status == SiteStatus.TRAINED, trained.answer.reason
    assert 0 < node.governance.ledger.spent(study_hash(spec)) == pytest.approx(trained.answer.epsilon_spent)
    evaluated = evaluate_like_the_coordinator(node, spec, trained.state_dict)
    assert evaluated.answer.status == SiteStatus.EVALUATED, evaluated.answer.reason
    kinds = [e.kind for e in node.governance.audit.entries() if not e.kind.startswith("ledger-")]
    assert kinds == ["round-started", "round-trained", "evaluated", "evaluated"], "scores, then outcomes"
    assert node.governance.integrity().ok, node.governance.integrity().problems
    assert node.governance.audit.verify().ok
    node.governance.close()
