"""`twinfed site score`: a study's model applied to the site's own cohort, locally, audited; nothing leaves."""

from __future__ import annotations

import csv
import stat

import torch
from typer.testing import CliRunner

from federation.contract import study_hash
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.site_helpers import evaluate_like_the_coordinator, fresh_site, initial_state, instruction, study
from twinfed.cli import app

runner = CliRunner()


def test_score_applies_the_latest_global_model_to_every_patient_and_is_audited(prepared_site, tmp_path):
    import yaml

    site_file = fresh_site(prepared_site, tmp_path / "site")
    spec = study(training={"rounds": 1})
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")), encoding="utf-8")
    node = SiteNode(load_site_config(site_file))

    unapproved = runner.invoke(app, ["site", "score", str(study_file), "-s", str(site_file)])
    assert unapproved.exit_code == 1 and "not approved" in unapproved.output

    node.governance.approvals.approve(study_hash(spec), spec.study.id, "steward")
    nothing_yet = runner.invoke(app, ["site", "score", str(study_file), "-s", str(site_file)])
    assert nothing_yet.exit_code == 1 and "--model" in nothing_yet.output

    trained = node.train(instruction(spec), initial_state(spec, node.feature_count(spec)))
    evaluate_like_the_coordinator(node, spec, trained.state_dict)  # the site keeps the model it evaluated
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["site", "score", str(study_file), "-s", str(site_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    cohort = node._data(spec, study_hash(spec)).dataset
    assert len(rows) == len(cohort) and {r["split_part"] for r in rows} == {"train", "test"}
    assert all(0 < float(r["risk"]) < 1 for r in rows)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600, "patient-level scores are readable by the site node only"
    entry = node.governance.audit.entries()[-1]
    assert entry.kind == "scored" and entry.payload["patients"] == len(rows)
    assert "round" in entry.payload["model_source"]

    # The same with the weights given by hand (a model card's final-model.pt) gives the same risks.
    weights = tmp_path / "final-model.pt"
    torch.save(trained.state_dict, weights)
    again = tmp_path / "again.csv"
    by_hand = runner.invoke(
        app, ["site", "score", str(study_file), "-s", str(site_file), "--out", str(again), "--model", str(weights)]
    )
    assert by_hand.exit_code == 0, by_hand.output
    assert [r["risk"] for r in csv.DictReader(again.open())] == [r["risk"] for r in rows]
