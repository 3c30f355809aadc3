"""What leaves a site for evaluation: DP score histograms accounted in the ledger, or exact aggregates checked
as a whole against the cell-count floor (complements and differences across rounds included), and the
non-private mode only where the policy says so. Attacks first: each test reproduces a leak the product
had, and shows it closed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from federation.contract import study_hash
from federation.contract.protocol import EvaluationRelease, RefusalCode, ReleaseMode, SiteStatus
from federation.contract.spec import EvaluationSpec
from federation.contract.strata import Strata
from federation.twins.risk_pooling import histogram_auroc, pool_evaluations
from site_node.cohort.dataset import StudyDataset
from site_node.config import load_site_config
from site_node.evaluation_release import dp_release, exact_release
from site_node.governance import Governance, SitePolicy
from site_node.governance.ledger import EVALUATE, TRAIN
from site_node.participation import SiteNode
from tests.site_helpers import evaluate_like_the_coordinator, fresh_site, initial_state, instruction, study

FLOOR = 10


def _identity() -> nn.Module:
    """A 'model' whose logit is its one feature, so a test chooses every patient's score."""
    model = nn.Sequential(nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    return model


def _dataset(logits: np.ndarray, labels: np.ndarray, first_id: int = 1) -> StudyDataset:
    n = len(labels)
    return StudyDataset(
        person_ids=np.arange(first_id, first_id + n, dtype=np.int64),
        features=np.asarray(logits, dtype=np.float32)[:, None],
        feature_names=["score"],
        labels=np.asarray(labels, dtype=np.float32),
        event_days=None,
        series=None,
        series_names=[],
        split=np.full(n, "test", dtype="<U10"),
        cohort_size=n,
        excluded_by_consent=0,
        snapshot_hash="0" * 64,
    )


@pytest.fixture
def governance(backend):
    url, schema = backend
    gov = Governance(url, SitePolicy(min_cell_count=FLOOR), schema=schema)
    yield gov
    gov.close()


def _exact(governance: Governance, data: StudyDataset, key: str) -> EvaluationRelease:
    spec = study()
    return exact_release(
        _identity(),
        data,
        spec,
        "test",
        floor=FLOOR,
        register=governance.disclosures,
        study_hash=study_hash(spec),
        release_key=key,
    )


def test_subtraction_attack_19_examples_13_positives_releases_the_count_only(governance):
    # 19 examples and 13 positives would say 6 patients without the outcome: below the floor of 10.
    labels = np.r_[np.ones(13), np.zeros(6)]
    release = _exact(governance, _dataset(np.linspace(-2, 2, 19), labels), "run:1:test")
    assert release.mode == ReleaseMode.EXACT and release.examples == 19
    assert release.with_outcome is None and release.auroc is None and release.loss is None
    assert release.true_positives is None and "auroc" in release.withheld
    assert "fewer than 10 patients with or without the outcome" in release.withheld_reason


def test_a_single_negative_patient_is_never_described(governance):
    labels = np.r_[np.ones(40), np.zeros(1)]
    release = _exact(governance, _dataset(np.linspace(-2, 2, 41), labels), "run:1:test")
    assert release.examples == 41 and release.auroc is None and release.brier is None
    assert release.true_negatives is None and release.false_positives is None


def test_a_test_cohort_of_four_releases_nothing_and_the_pooled_card_says_withheld(governance):
    release = _exact(governance, _dataset(np.array([-1.0, 0.5, 1.0, 2.0]), np.array([0, 1, 0, 1])), "run:1:test")
    assert release.mode == ReleaseMode.WITHHELD and release.examples is None
    pooled = pool_evaluations([("tiny", release)], study().evaluation)
    assert pooled.auroc.value is None and pooled.auroc.text() == "withheld (cell floor)"


def test_a_difference_across_rounds_of_the_same_cohort_is_withheld(governance):
    # 35 true positives, 15 false negatives, 15 false positives, 35 true negatives: every cell >= 10.
    labels = np.r_[np.ones(50), np.zeros(50)]
    logits = np.r_[np.full(35, 1.0), np.full(15, -1.0), np.full(15, 1.0), np.full(35, -1.0)]
    first = _exact(governance, _dataset(logits, labels), "run:1:test")
    assert first.true_positives is not None and first.auroc is not None, "a healthy release goes out whole"
    # Round 2: one patient withdrew. Every count would differ from round 1 by one: that patient's outcome.
    second = _exact(governance, _dataset(logits[1:], labels[1:], first_id=2), "run:2:test")
    assert second.mode == ReleaseMode.WITHHELD and second.examples is None and second.auroc is None
    assert "differs from the release 'run:1:test'" in second.withheld_reason
    # The same round asked again (a resumed coordinator) differs by nothing and passes.
    again = _exact(governance, _dataset(logits, labels), "run:1:test")
    assert again.true_positives == first.true_positives
    # Ten more withdrawals later the cohort differs by at least the floor from every earlier release.
    later = _exact(governance, _dataset(logits[10:], labels[10:], first_id=11), "run:3:test")
    assert later.examples == 90 and later.auroc is not None and later.true_positives == 25


def test_confusion_cells_under_the_floor_are_withheld_while_the_classes_go_out(governance):
    # 30 positives and 30 negatives, but only 3 negatives score above the threshold: a small cell.
    labels = np.r_[np.ones(30), np.zeros(30)]
    logits = np.r_[np.full(30, 1.0), np.full(3, 1.0), np.full(27, -1.0)]
    release = _exact(governance, _dataset(logits, labels), "run:1:test")
    assert release.examples == 60 and release.with_outcome == 30 and release.auroc is not None
    assert release.false_positives is None and "confusion counts" in release.withheld
    assert "fewer than 10 false positives" in release.withheld_reason


def test_dp_histograms_pool_to_the_consortium_auroc_with_an_interval_that_covers_it():
    spec = study()
    strata = Strata.fixed(spec.evaluation)
    rng = np.random.default_rng(7)
    sites = []
    for _ in range(3):
        y = rng.random(1200) < 0.12
        sites.append((np.where(y, rng.normal(-1.0, 1.0, 1200), rng.normal(-2.8, 1.0, 1200)), y))
    logits, labels = np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites])
    cells = strata.of(logits)
    # What the histograms can know: the AUROC with ties inside a stratum, a little below the exact one.
    binned = histogram_auroc(
        np.bincount(cells[labels], minlength=strata.count).astype(float),
        np.bincount(cells[~labels], minlength=strata.count).astype(float),
    )
    assert 0 < roc_auc_score(labels, logits) - binned < 0.02
    sensitivity = np.mean(logits[labels] >= 0)  # threshold 0.5 = logit 0
    # The noise is fresh entropy each time, so judge the method over twenty releases, not one.
    covered, errors, patients = 0, [], []
    for _ in range(20):
        releases = [
            (f"site-{i}", dp_release(_identity(), _dataset(score, y), strata, "test", noise_sd=4.0))
            for i, (score, y) in enumerate(sites)
        ]
        pooled = pool_evaluations(releases, spec.evaluation)
        covered += pooled.auroc.low <= binned <= pooled.auroc.high
        errors.append(pooled.auroc.value - binned)
        patients.append(pooled.patients.value)
        assert pooled.sensitivity.low - 0.05 <= sensitivity <= pooled.sensitivity.high + 0.05
    assert covered >= 15, f"the 95% interval held the histograms' AUROC in only {covered} of 20 releases"
    assert abs(np.mean(errors)) < 0.03 and np.sqrt(np.mean(np.square(errors))) < 0.06
    assert np.mean(patients) == pytest.approx(3600, abs=60)
    assert releases[0][1].positives != dp_release(_identity(), _dataset(*sites[0]), strata, "test", 4.0).positives


@pytest.fixture
def node(prepared_site: Path, tmp_path: Path):
    def make(**policy) -> SiteNode:
        return SiteNode(load_site_config(fresh_site(prepared_site, tmp_path / "site", **policy)))

    return make


def test_dp_evaluation_is_accounted_in_the_ledger_and_composed_with_training(node):
    site = node()
    spec = study(training={"rounds": 2})
    digest = study_hash(spec)
    site.governance.approvals.approve(digest, spec.study.id, "test steward")
    trained = site.train(instruction(spec), initial_state(spec, site.feature_count(spec)))
    assert trained.answer.status == SiteStatus.TRAINED, trained.answer.reason
    refused = site.evaluate(instruction(spec), trained.state_dict)
    assert refused.answer.code == RefusalCode.POLICY, "adaptive strata: the outcome stage needs the placed strata"
    evaluated = evaluate_like_the_coordinator(site, spec, trained.state_dict)
    assert evaluated.answer.status == SiteStatus.EVALUATED, evaluated.answer.reason
    release = evaluated.evaluation
    assert release.mode == ReleaseMode.DP and len(release.positives) == len(release.score_edges) + 1
    assert spec.evaluation.threshold in release.score_edges
    assert release.noise_sd > 1 and 0 < release.epsilon < spec.evaluation.epsilon
    spent = site.governance.ledger.spent_by_purpose(digest)
    # the two stages (scores, then outcomes) together cost exactly the one planned release
    assert spent[EVALUATE] == pytest.approx(spec.evaluation.epsilon, rel=0.02) and spent[EVALUATE] <= 2.0
    assert spent[TRAIN] < spent["total"] < spent[TRAIN] + spent[EVALUATE], "composed, tighter than the sum"
    assert evaluated.answer.epsilon_spent == pytest.approx(spent["total"])
    assert evaluated.answer.epsilon_evaluation == pytest.approx(spent[EVALUATE])
    rows = site.governance.ledger.reservations(digest)
    assert [r.purpose for r in rows] == [TRAIN, EVALUATE, EVALUATE] and rows[1].event.sample_rate == 1.0
    entry = site.governance.audit.entries()[-1]
    assert entry.kind == "evaluated" and entry.payload["left_the_site"]["evaluation"]["mode"] == "dp"
    # A resumed coordinator asks again: the same release, nothing spent twice.
    again = evaluate_like_the_coordinator(site, spec, trained.state_dict)
    assert again.evaluation == release and len(site.governance.ledger.reservations(digest)) == 3
    assert site.governance.audit.entries()[-1].kind == "evaluation-resent"
    summary = site.governance.ledger.summary()[0]
    assert summary.evaluation_releases == 2 and summary.evaluation_epsilon == pytest.approx(spent[EVALUATE])


def test_the_evaluation_budget_refuses_releases_beyond_the_plan(node):
    site = node()
    spec = study(training={"rounds": 2}, evaluation={"epsilon": 0.5})
    digest = study_hash(spec)
    site.governance.approvals.approve(digest, spec.study.id, "test steward")
    state = initial_state(spec, site.feature_count(spec))
    first = evaluate_like_the_coordinator(site, spec, state, server_round=1)
    assert first.answer.status == SiteStatus.EVALUATED, first.answer.reason
    # The study planned one test release; a coordinator asking for more is refused by the budget.
    second = evaluate_like_the_coordinator(site, spec, state, server_round=2)
    assert second.answer.code == RefusalCode.BUDGET and "evaluation releases" in second.answer.reason


def test_a_non_private_study_is_refused_by_default_and_labelled_when_allowed(node):
    spec = study(training={"rounds": 2}, privacy={"mode": "none", "target_epsilon": None})
    digest = study_hash(spec)
    site = node()
    assert any("not differentially private" in p for p in site.policy_conflicts(spec))
    site.governance.approvals.approve(digest, spec.study.id, "test steward")
    refused = site.train(instruction(spec), initial_state(spec, site.feature_count(spec)))
    assert refused.answer.code == RefusalCode.NOT_PRIVATE and "allow_non_private" in refused.answer.reason

    open_site = SiteNode(
        load_site_config(
            fresh_site(site.config.base_dir, site.config.base_dir.parent / "open", require_dp=False,
                       allow_non_private=True)
        )
    )  # fmt: skip
    assert open_site.policy_conflicts(spec) == []
    open_site.governance.approvals.approve(digest, spec.study.id, "test steward")
    trained = open_site.train(instruction(spec), initial_state(spec, open_site.feature_count(spec)))
    assert trained.answer.status == SiteStatus.TRAINED and not trained.answer.differentially_private
    assert trained.answer.epsilon_spent is None
    evaluated = evaluate_like_the_coordinator(open_site, spec, trained.state_dict)
    assert evaluated.evaluation.mode in (ReleaseMode.EXACT, ReleaseMode.WITHHELD)
    budget = open_site.governance.ledger.summary()[0]
    assert budget.non_private_rounds == 1 and budget.total_epsilon == 0
    assert open_site.governance.ledger.site_spent() == 0, "a non-private round never enters an epsilon figure"


def test_exact_releases_are_limited_to_the_studys_plan(node):
    site = node(evaluation_release="exact")
    spec = study(training={"rounds": 2})
    site.governance.approvals.approve(study_hash(spec), spec.study.id, "test steward")
    state = initial_state(spec, site.feature_count(spec))
    first = evaluate_like_the_coordinator(site, spec, state, server_round=2)
    assert first.answer.status == SiteStatus.EVALUATED and first.evaluation.mode == ReleaseMode.EXACT
    assert first.evaluation.examples is not None and first.answer.epsilon_evaluation == 0
    # A coordinator asking for more exact releases (each with weights of its choosing) than the study planned
    # is refused: without an epsilon to run out of, the plan is the bound.
    more = evaluate_like_the_coordinator(site, spec, state, run_id="another-run", server_round=2)
    assert more.answer.code == RefusalCode.BUDGET and "planned 1 evaluation release" in more.answer.reason
    again = evaluate_like_the_coordinator(site, spec, state, server_round=2)
    assert again.evaluation == first.evaluation, "the planned release itself is re-sent as made"


def test_adaptive_strata_keep_the_ranking_of_a_model_whose_risks_are_squeezed():
    # A DP-trained model often puts every risk between 1.5% and 7% (seen in the demo): fixed clinical bands
    # then hold nearly everyone in two strata and the ranking is lost; adaptive strata follow the scores.
    from federation.contract.strata import adaptive_strata
    from federation.twins.pooling import pool_scores
    from federation.twins.risk_pooling import histogram_auroc
    from site_node.evaluation_release import dp_score_release

    spec = study()
    rng = np.random.default_rng(11)
    sites = []
    for _ in range(3):
        y = rng.random(600) < 0.1
        sites.append((np.where(y, rng.normal(-2.7, 0.35, 600), rng.normal(-3.3, 0.35, 600)), y))
    logits, labels = np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites])
    exact = roc_auc_score(labels, logits)

    def binned(strata: Strata) -> float:
        cells = strata.of(logits)
        positives = np.bincount(cells[labels], minlength=strata.count).astype(float)
        negatives = np.bincount(cells[~labels], minlength=strata.count).astype(float)
        return histogram_auroc(positives, negatives)

    fixed = Strata.fixed(spec.evaluation)
    assert exact - binned(fixed) > 0.05, "the fixed bands lose the ranking of squeezed scores"
    placed = []
    for _ in range(10):
        scores = [
            (f"s{i}", dp_score_release(_identity(), _dataset(lg, y), "test", 4.8)) for i, (lg, y) in enumerate(sites)
        ]
        strata = adaptive_strata(pool_scores(scores), spec.evaluation)
        assert spec.evaluation.threshold in strata.edges and strata.count >= 4
        placed.append(binned(strata))
    assert np.mean(placed) > binned(fixed) + 0.04 and exact - np.mean(placed) < 0.03


def test_the_calibration_line_is_the_logistic_recalibration_of_the_strata():
    from sklearn.linear_model import LogisticRegression

    from federation.twins.risk_pooling import calibration_line

    rng = np.random.default_rng(8)
    strata = Strata.checked([0.05, 0.1, 0.2, 0.35, 0.5, 0.7], 0.5)
    risks = strata.representative_risks()
    logits = np.log(risks / (1 - risks))
    stratum = rng.integers(0, strata.count, 20_000)
    # predictions too extreme: the truth is half as steep on the logit scale, and 0.3 higher
    truth = 1 / (1 + np.exp(-(0.3 + 0.5 * logits[stratum])))
    outcome = rng.random(len(stratum)) < truth
    positives = np.bincount(stratum[outcome], minlength=strata.count)
    negatives = np.bincount(stratum[~outcome], minlength=strata.count)
    intercept, slope = calibration_line(positives, negatives, risks)
    reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(logits[stratum, None], outcome)
    assert slope == pytest.approx(float(reference.coef_[0, 0]), abs=1e-6) and slope == pytest.approx(0.5, abs=0.05)
    # the intercept with the slope fixed at 1 makes the predicted events, shifted by it, the observed ones
    n = positives + negatives
    assert np.sum(n / (1 + np.exp(-(intercept + logits)))) == pytest.approx(positives.sum(), rel=1e-8)
    assert intercept > 0  # the truth lies above the predictions where most patients are (low risks)
    assert calibration_line(positives, np.zeros_like(negatives), risks) is None  # one class: no line
    release = EvaluationRelease(
        part="test",
        mode=ReleaseMode.DP,
        score_edges=list(strata.edges),
        positives=positives.tolist(),
        negatives=negatives.tolist(),
        noise_sd=1.0,
    )
    pooled = pool_evaluations([("a", release)], EvaluationSpec(strata="fixed", score_edges=list(strata.edges)))
    assert pooled.calibration_slope.value == pytest.approx(slope, abs=0.02)
    assert pooled.calibration_slope.low < slope < pooled.calibration_slope.high
    assert pooled.calibration_intercept.low < intercept < pooled.calibration_intercept.high


def test_the_subgroups_share_of_a_release_costs_nothing_more():
    from site_node.evaluation_release import evaluation_noise, outcome_noise

    spec = study()
    stage = evaluation_noise(spec, 1e-5, "outcomes")
    overall, subgroup = outcome_noise(stage, spec)
    partitions = len(spec.evaluation.subgroups)
    assert partitions == 2 and subgroup > overall > stage
    # Gaussian mechanisms of sensitivity 1 compose by adding 1/sigma^2: the stage's ledger event is exact
    assert 1 / overall**2 + partitions / subgroup**2 == pytest.approx(1 / stage**2)
    none = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"subgroups": []})})
    assert outcome_noise(stage, none) == (stage, None)


def test_the_calibration_line_is_read_at_the_strata_mean_risks_from_the_score_distribution():
    """A perfectly calibrated model must show a slope near 1 and an intercept near 0. Read at the strata's
    logit middles it does not (patients crowd at one end of the open-ended strata); read at each stratum's
    mean risk from the pooled score distribution (post-processing of the score release) it does."""
    from federation.contract.strata import SCORE_GRID, adaptive_strata, score_grid_cell

    rng = np.random.default_rng(11)
    logits = rng.normal(-2.4, 1.1, 40_000)  # a rare outcome, as in-hospital death
    outcome = rng.random(logits.size) < 1 / (1 + np.exp(-logits))  # calibrated: the risks are the truth
    scores = np.bincount(score_grid_cell(logits), minlength=len(SCORE_GRID) + 1).astype(float)
    evaluation = EvaluationSpec(adaptive_strata=6)
    strata = adaptive_strata(scores, evaluation)
    stratum = strata.of(logits)
    release = EvaluationRelease(
        part="test",
        mode=ReleaseMode.DP,
        score_edges=list(strata.edges),
        positives=np.bincount(stratum[outcome], minlength=strata.count).tolist(),
        negatives=np.bincount(stratum[~outcome], minlength=strata.count).tolist(),
        noise_sd=0.5,
    )
    at_middles = pool_evaluations([("a", release)], evaluation, seed=1)
    at_means = pool_evaluations([("a", release)], evaluation, seed=1, scores=scores)
    assert at_means.calibration_slope.value == pytest.approx(1.0, abs=0.03)
    assert at_means.calibration_intercept.value == pytest.approx(0.0, abs=0.05)
    assert abs(at_middles.calibration_slope.value - 1) > abs(at_means.calibration_slope.value - 1) + 0.02
    assert at_means.observed_to_expected.value == pytest.approx(1.0, abs=0.05)
    # no distribution, or one of another shape: the middles, as before
    assert np.array_equal(strata.mean_risks(None), strata.representative_risks())
    assert np.array_equal(strata.mean_risks(scores[:-1]), strata.representative_risks())
