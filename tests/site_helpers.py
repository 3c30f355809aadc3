"""A real site for tests: one synthetic hospital loaded into SQLite by the ETL, with a site file and policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from federation.contract import StudySpec, load_study
from federation.contract.protocol import RoundInstruction
from federation.twins import build_model
from site_node.config import write_site_folder
from tests.etl_helpers import load

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_STUDY = ROOT / "configs" / "study-inpatient-mortality.yaml"

TEST_POLICY = {
    "require_dp": True,
    "min_noise_multiplier": 0.3,
    "max_delta": 1e-4,
    "study_epsilon_ceiling": 10.0,
    "site_epsilon_ceiling": 30.0,
    "min_cohort_size": 50,
    "min_cell_count": 5,
    "require_secure_aggregation": False,
}


def load_site_omop(consortium: Path, site_id: str, folder: Path) -> tuple[str, Path]:
    """ETL one synthetic hospital into folder/omop.sqlite; returns (url, secret file)."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "site.secret"
    url = f"sqlite:///{folder / 'omop.sqlite'}"
    load([consortium / site_id / "fhir"], url, secret)
    return url, secret


def write_site(folder: Path, site_id: str, omop_url: str, secret: Path, **policy) -> Path:
    """A site folder (site.yaml, policy.yaml) pointing at an OMOP database; returns the site file."""
    return write_site_folder(folder, site_id, omop_url, secret, {**TEST_POLICY, **policy})


def fresh_site(template: Path, folder: Path, **policy) -> Path:
    """A copy of a prepared site with its own governance state (and optionally another policy)."""
    shutil.copytree(template, folder)
    for stale in ("governance.sqlite", "audit.head", "audit.key"):
        (folder / stale).unlink(missing_ok=True)
    if policy:
        current = yaml.safe_load((folder / "policy.yaml").read_text())
        (folder / "policy.yaml").write_text(yaml.safe_dump({**current, **policy}), encoding="utf-8")
    return folder / "site.yaml"


def study(**changes) -> StudySpec:
    """The example mortality study, with sections replaced (e.g. training={'rounds': 2})."""
    spec = load_study(EXAMPLE_STUDY)
    updates = {section: getattr(spec, section).model_copy(update=values) for section, values in changes.items()}
    return spec.model_copy(update=updates)


def initial_state(spec: StudySpec, n_features: int) -> dict:
    return build_model(spec.model, n_features, seed=spec.training.seed).state_dict()


def instruction(spec: StudySpec, run_id: str = "run-1", server_round: int = 1, **evaluation) -> RoundInstruction:
    return RoundInstruction.for_study(spec, run_id, server_round, **evaluation)


def evaluate_like_the_coordinator(node, spec: StudySpec, state: dict, run_id: str = "run-1", server_round: int = 1,
                                  part: str = "test"):  # fmt: skip
    """An evaluation as the coordinator asks for it: with adaptive strata, the score stage first, the strata
    placed from what it released (federation's own functions), then the outcome stage. Returns its outcome."""
    from federation.contract.strata import adaptive_strata
    from federation.twins.pooling import pool_scores

    edges = None
    if spec.evaluation.strata == "adaptive":
        scores = node.evaluate(instruction(spec, run_id, server_round, part=part, stage="scores"), state)
        if scores.evaluation is None:
            return scores
        pooled = pool_scores([(node.config.site_id, scores.evaluation)])
        edges = list(adaptive_strata(pooled, spec.evaluation).edges) if pooled is not None else None
    return node.evaluate(instruction(spec, run_id, server_round, part=part, score_edges=edges), state)
