"""The contract every registered twin kind must meet, run over the registry: a new kind that passes works end
to end. At a real synthetic hospital (ETL-loaded OMOP, site file, policy): build the model the coordinator
would, train one DP round through the site node (approval, ledger, audit), evaluate as the coordinator asks
(DP score stage, strata, DP histograms), pool the release into the kind's metrics, and write a model card.
Besides: the single-pass DP engine computes exactly what per-example autograd and Opacus compute for the
kind's loss, and a kind's loss depends on each patient alone (the premise of per-patient clipping).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.contract import StudySpec, study_hash
from federation.contract.protocol import ReleaseMode, SiteStatus
from federation.contract.receipts import Participation, RoundReceipt, SiteReceipt, append_receipt
from federation.coordinator.model_card import write_model_card
from federation.coordinator.runner import RunResult
from federation.twins import KINDS, build_model, kind_of
from site_node.config import load_site_config
from site_node.participation import SiteNode
from site_node.training import train_dp
from site_node.training.engines import make_step
from site_node.training.ghost import SinglePassGhostClipping
from site_node.training.objectives import objective_of
from tests.site_helpers import evaluate_like_the_coordinator, fresh_site, initial_state, instruction, study

# Each kind's model section and the outcome it learns from, on the example mortality study.
KIND_STUDIES: dict[str, dict] = {
    "logistic_regression": {"model": {"kind": "logistic_regression"}},
    "mlp": {"model": {"kind": "mlp", "hidden": [16]}},
    "discrete_time_survival": {
        "model": {"kind": "discrete_time_survival", "interval_days": [3, 7, 14, 30], "hidden": []},
        "outcome": {"kind": "time_to_event", "prediction_hours": 24, "window_days": 30},
    },
    "trajectory": {
        "model": {
            "kind": "trajectory",
            "signals": [
                {"name": "glucose", "concept_ids": [3004501], "normal_range": [70, 180], "unit": "mg/dL"},
                {"name": "creatinine", "concept_ids": [3016723], "transform": "log", "normal_range": [0.6, 1.3]},
                {"name": "heart_rate", "concept_ids": [3027018], "normal_range": [60, 100]},
            ],
            "treatments": [{"name": "insulin", "concept_ids": [40166274], "dose": True, "typical_dose": 4}],
            "step_hours": 4,
            "history_steps": 6,
            "horizon_steps": 3,
            "windows_per_patient": 3,
            "hidden": 8,
        },
    },
}
# The kinds whose loss gradient is written out: the single-pass engine's, checked against autograd and Opacus
# (the trajectory kind's per-patient engine is checked in tests/test_patient_level_dp.py).
CLOSED_FORM = sorted(name for name in KIND_STUDIES if KINDS[name].closed_form_gradient)


def test_every_registered_kind_has_a_study_here():
    assert set(KINDS) == set(KIND_STUDIES), "add the new kind's study section to KIND_STUDIES"


def kind_study(name: str, **changes) -> StudySpec:
    # The contract is about what flows, not accuracy: the evaluation budget (and fewer strata) keeps a small
    # test part's DP histograms clear enough that every metric is estimable in every run (the noise is random)
    changes = {"training": {"rounds": 2}, "evaluation": {"epsilon": 6.0, "adaptive_strata": 4}, **changes}
    base = study(**changes)
    data = base.model_dump(mode="json")
    for section, values in KIND_STUDIES[name].items():
        data[section] = values
    return StudySpec.model_validate(data)


def _targets(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    kind = KINDS[name]
    spec = kind_study(name).model
    labels = (rng.random(n) < 0.3).astype(np.float32)
    days = rng.exponential(12.0, n).astype(np.float32) if kind.targets == "time_to_event" else None
    return kind.targets_of(spec, labels, days)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_single_pass_clipping_equals_per_example_autograd_and_opacus(name):
    rng = np.random.default_rng(3)
    spec = kind_study(name).model
    kind = kind_of(spec)
    objective = objective_of(spec)
    n, d, clip = 24, 5, 0.7
    x = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    y = torch.from_numpy(_targets(name, n, rng))
    model = build_model(spec, d, seed=1)
    grads, loss_sum = SinglePassGhostClipping(model, clip, objective).clipped_sum(x, y)
    # per-example autograd, clipped by hand
    expected = [torch.zeros_like(p) for p in model.parameters()]
    total_loss = 0.0
    for i in range(n):
        model.zero_grad()
        loss = kind.loss(spec, model(x[i : i + 1]), y[i : i + 1]).sum()
        loss.backward()
        total_loss += float(loss.detach())
        norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for e, p in zip(expected, model.parameters(), strict=True):
            e += p.grad * factor
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5), name
    assert float(loss_sum) == pytest.approx(total_loss, rel=1e-5)
    # Opacus' ghost clipping through the same objective, noise off: the same clipped sum over the batch
    from opacus.accountants import RDPAccountant

    opacus_model = build_model(spec, d, seed=1)
    optimizer = torch.optim.SGD(opacus_model.parameters(), lr=0.0)
    step = make_step(
        "opacus",
        opacus_model,
        optimizer,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        sample_rate=1.0,
        expected_batch_size=float(n),
        accountant=RDPAccountant(),
        generator=torch.Generator().manual_seed(0),
        objective=objective,
    )
    step(x, y)
    for got, want in zip([p.grad for p in opacus_model.parameters()], expected, strict=True):
        assert torch.allclose(got * n, want, atol=1e-5), name
    step.close()


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_a_patients_loss_depends_on_that_patient_alone(name):
    rng = np.random.default_rng(4)
    spec = kind_study(name).model
    kind = kind_of(spec)
    x = torch.from_numpy(rng.normal(size=(10, 4)).astype(np.float32))
    y = torch.from_numpy(_targets(name, 10, rng))
    model = build_model(spec, 4, seed=2)
    alone = kind.loss(spec, model(x[:1]), y[:1])
    changed = x.clone()
    changed[1:] = torch.from_numpy(rng.normal(size=(9, 4)).astype(np.float32))
    assert torch.allclose(kind.loss(spec, model(changed), y)[:1], alone)
    # and the closed-form output gradient is autograd's
    outputs = model(x).detach().requires_grad_(True)
    kind.loss(spec, outputs, y).sum().backward()
    assert torch.allclose(outputs.grad, kind.output_gradient(spec, outputs.detach(), y), atol=1e-6)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_a_kind_trains_through_both_dp_engines_with_the_same_accounting(name):
    rng = np.random.default_rng(5)
    spec = kind_study(name)
    features = rng.normal(size=(300, 6)).astype(np.float32)
    targets = _targets(name, 300, rng)
    model = build_model(spec.model, 6, seed=0)
    results = {
        engine: train_dp(
            model,
            features,
            targets,
            training=spec.training,
            privacy=spec.privacy,
            noise_multiplier=1.1,
            delta=1e-5,
            engine=engine,
            objective=objective_of(spec.model),
            replay_seed=9,
        )
        for engine in ("single-pass", "opacus")
    }
    assert results["single-pass"].epsilon == pytest.approx(results["opacus"].epsilon)
    assert results["single-pass"].steps == results["opacus"].steps > 0
    for result in results.values():
        assert np.isfinite(result.train_loss) and result.update_norm > 0


@pytest.mark.parametrize("name", sorted(KIND_STUDIES))
def test_a_kind_runs_a_dp_round_an_evaluation_pooling_and_a_model_card_at_a_real_site(name, prepared_site, tmp_path):
    spec = kind_study(name)
    kind = kind_of(spec.model)
    node = SiteNode(load_site_config(fresh_site(prepared_site, tmp_path / "site")))
    digest = study_hash(spec)
    node.governance.approvals.approve(digest, spec.study.id, "test steward")
    start = initial_state(spec, node.feature_count(spec))
    trained = node.train(instruction(spec), start)
    assert trained.answer.status == SiteStatus.TRAINED, trained.answer.reason
    assert {k: tuple(v.shape) for k, v in trained.state_dict.items()} == {k: tuple(v.shape) for k, v in start.items()}
    assert 0 < trained.answer.epsilon_spent < spec.privacy.target_epsilon
    evaluated = evaluate_like_the_coordinator(node, spec, trained.state_dict)
    assert evaluated.answer.status == SiteStatus.EVALUATED, evaluated.answer.reason
    release = evaluated.evaluation
    assert release.mode == ReleaseMode.DP and release.epsilon > 0
    kind.check_histograms(spec.model, release)
    test_size = int((node.dataset(spec, digest).split == "test").sum())
    pooled = kind.pool(spec, [(node.config.site_id, release)], seed=1)
    assert pooled.estimable, pooled.method
    score = kind.selection_score(pooled)
    assert score is not None and 0.0 <= score <= 1.0
    assert pooled.patients.value == pytest.approx(test_size, abs=6 * release.noise_sd * np.sqrt(30) + 5)
    assert kind.headline(pooled.model_dump(mode="json"))
    if name == "trajectory":  # the forecast part: interval coverage and error from the per-patient histograms
        assert 0 <= pooled.coverage_80.value <= pooled.coverage_95.value + 0.15 and pooled.forecast_mae.value > 0
    # the lines the demo prints: calibration, then the metric by sex, by age and by site
    lines = kind.validation_lines(pooled.model_dump(mode="json"))
    assert lines[0].startswith(("calibration slope", "observed / expected", "interval coverage"))
    by = [f"{kind.selection_label} by {group}" for group in ("sex", "age", "site")]
    assert [line.split(":")[0] for line in lines[1:]] == by
    # performance by subgroup: every sex and age band from the release's subgroup histograms, and the site
    assert release.subgroups == ["sex:female", "sex:male", "sex:other", "age:<50", "age:50-69", "age:70+"]
    groups = [(s.group, s.label) for s in pooled.subgroups]
    assert groups == [(g, label) for g, _, label in (x.partition(":") for x in release.subgroups)] + [
        ("site", node.config.site_id)
    ]
    shown = [s for s in pooled.subgroups if s.note is None]
    assert all(s.patients.value >= 20 for s in shown)
    # the sexes partition the test patients: their noisy counts add up to about the test size, within the noise
    # of every cell of every sex's histogram (a survival histogram has many cells, so that noise is wide)
    cells_per_group = len(release.subgroup_counts) / len(release.subgroups)
    sexes = [s for s in pooled.subgroups if s.group == "sex"]
    noise = release.subgroup_noise_sd * np.sqrt(cells_per_group * len(sexes))
    assert sum(s.patients.value for s in shown if s.group == "sex") <= test_size + 6 * noise + 5
    # the model card, from the stored forms the runner keeps
    folder = tmp_path / "card"
    folder.mkdir()
    receipt = RoundReceipt(
        run_name="kind-contract",
        server_round=1,
        phase="evaluate",
        started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T00:00:01Z",
        required_sites=1,
        sites=[SiteReceipt(node_id=1, site_id=node.config.site_id, status=Participation.EVALUATED)],
    )
    append_receipt(folder / "receipts.jsonl", receipt)
    train_size = int((node.dataset(spec, digest).split == "train").sum())
    trained_receipt = receipt.model_copy(
        update={
            "phase": "train",
            "sites": [
                SiteReceipt(
                    node_id=1,
                    site_id=node.config.site_id,
                    status=Participation.TRAINED,
                    num_examples=train_size,
                    data_period=trained.answer.data_period,
                )
            ],
        }
    )
    append_receipt(folder / "receipts.jsonl", trained_receipt)
    spec = spec.model_copy(
        update={"study": spec.study.model_copy(update={"intended_use": "Research only: ranking by risk."})}
    )
    weights = {k: v.numpy() for k, v in trained.state_dict.items()}
    stored = pooled.model_dump(mode="json")
    result = RunResult("completed", "1 round", 1, weights, [{"round": 1, "test": stored}], stored, 1, "round 1.")
    html = write_model_card(folder, spec, result).read_text(encoding="utf-8")
    card = json.loads((folder / "model-card.json").read_text(encoding="utf-8"))
    assert card["model"]["kind"] == name and card["evaluation"]["pooled"] == stored
    assert any(isinstance(v, float) for v in card["metrics"].values()), card["metrics"]
    assert "NaN" not in json.dumps(card) and "<table>" in html and "data:image/png;base64," in html
    assert "Subgroups (pooled test)" in html
    if name == "trajectory":
        assert "Forecasts (pooled, test)" in html and card["metrics"]["held_out_coverage_80"]["value"] is not None
    # TRIPOD: what the model is for, and whose data trained it, in words and disclosed counts
    data = card["training_data"]
    assert data["sites"] == {node.config.site_id: train_size} and data["training_examples"] == train_size
    assert data["cohort"] == spec.cohort.summary() and data["outcome"] == spec.outcome.summary()
    assert "Research only: ranking by risk." in html and escape(spec.study.limitations) in html
    start, end = trained.answer.data_period.split("/")
    assert data["periods"] == {node.config.site_id: trained.answer.data_period}
    assert f"{node.config.site_id} ({train_size}; index dates {start} to {end})" in html
    assert Path(folder / "final-model.pt").exists()
