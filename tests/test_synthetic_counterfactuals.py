"""Counterfactual ground truth: sampled stays re-simulated under treatment scenarios with common random numbers.

The re-simulation must reproduce the factual course exactly under the factual scenario, move each scenario's
signals the way its drug acts, never reach the FHIR export, and measure how confounded the factual drugs are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from synthetic.config import SynthConfig
from synthetic.counterfactuals import DECISION_HOUR, SCENARIOS, CounterfactualPlan, Scenario, ScenarioRun
from synthetic.ground_truth import SiteGroundTruth
from synthetic.inpatient import DRUG_INDEX, TRAJECTORY_SIGNALS
from synthetic.physiology import MAX_STAY_HOURS
from synthetic.population import generate_population
from synthetic.site import generate_site
from synthetic.timeline import build_timeline, to_seconds

PATIENTS = 160
SEED = 5
HORIZON = 48
SAMPLE = 30


@pytest.fixture(scope="module")
def simulated() -> SimpleNamespace:
    """One hospital's stays simulated in memory with a counterfactual plan following every wave."""
    config = SynthConfig(sites=1, patients_per_site=PATIENTS, seed=SEED)
    profile = config.site_profiles()[0]
    rng_pop, rng_course, rng_mc = (np.random.default_rng(s) for s in np.random.SeedSequence([SEED, 0]).spawn(3))
    population = generate_population(profile, PATIENTS, config.history_start, rng_pop)
    plan = CounterfactualPlan(
        stays=SAMPLE,
        horizon_hours=HORIZON,
        export_time=to_seconds(config.export_date),
        seed=np.random.SeedSequence([SEED, 0, 1]),
    )
    timeline = build_timeline(
        profile, population, config.history_start, config.export_date, rng_course, rng_mc, counterfactuals=plan
    )
    runs = plan.resimulate()
    return SimpleNamespace(plan=plan, timeline=timeline, runs={run.scenario.name: run for run in runs}, all=runs)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The same hospital written to files twice: with counterfactuals and without."""
    config = SynthConfig(sites=1, patients_per_site=PATIENTS, seed=SEED)
    profile = config.site_profiles()[0]
    on = generate_site(profile, config, 0, tmp_path_factory.mktemp("on"))
    without = config.model_copy(update={"counterfactual_stays": 0})
    off = generate_site(profile, without, 0, tmp_path_factory.mktemp("off"))
    return SimpleNamespace(on=on, off=off, truth=orjson.loads(on.ground_truth_file.read_bytes()))


def _window_doses(run: ScenarioRun, j: int, drug: str) -> list[tuple[int, float]]:
    return [(d.hour, d.dose) for d in run.doses[j] if d.drug == drug]


def _factual_doses(simulated: SimpleNamespace, batch: int, row: int, drug: str) -> list[tuple[int, float]]:
    drugs = simulated.timeline.batches[batch].drugs
    mine = (
        (drugs["stay"] == row)
        & (drugs["drug"] == DRUG_INDEX[drug])
        & (drugs["hour"] >= DECISION_HOUR)
        & (drugs["hour"] < DECISION_HOUR + HORIZON)
    )
    return [(int(h), float(d)) for h, d in zip(drugs["hour"][mine], drugs["dose"][mine], strict=True)]


def _paired(simulated: SimpleNamespace, name: str) -> list[tuple[int, int]]:
    """(row in the factual run, row in the scenario's run) for every stay the scenario applies to."""
    factual = {id(stay): j for j, stay in enumerate(simulated.runs["factual"].stays)}
    return [(factual[id(stay)], j) for j, stay in enumerate(simulated.runs[name].stays)]


def test_the_sample_follows_its_rule(simulated):
    plan = simulated.plan
    assert len(plan.sampled) == min(SAMPLE, plan.eligible_stays) == SAMPLE
    priorities = [stay.priority for stay in plan.sampled]
    assert priorities == sorted(priorities)
    export_time = to_seconds(SynthConfig(seed=SEED).export_date)
    for stay in plan.sampled:
        batch = simulated.timeline.batches[stay.batch]
        assert batch.alive_at_prediction[stay.row]
        assert batch.admissions.start[stay.row] + DECISION_HOUR * 3600 < export_time


def test_factual_scenario_reproduces_the_factual_course_exactly(simulated):
    run = simulated.runs["factual"]
    assert len(run.stays) == SAMPLE
    for j, stay in enumerate(run.stays):
        for signal in TRAJECTORY_SIGNALS:
            assert np.array_equal(run.course[signal][j], stay.factual_course[signal], equal_nan=True), signal
        batch = simulated.timeline.batches[stay.batch]
        in_hospital = int(np.isfinite(run.course["severity"][j]).sum())
        assert in_hospital == min(HORIZON, batch.end_hour[stay.row] - DECISION_HOUR)
        path = batch.severity_paths[stay.row][DECISION_HOUR : DECISION_HOUR + in_hospital]
        assert np.array_equal(run.course["severity"][j][:in_hospital].astype(np.float32), path)
        for drug in ("insulin_lispro", "furosemide", "acetaminophen", "piperacillin"):
            assert _window_doses(run, j, drug) == _factual_doses(simulated, stay.batch, stay.row, drug)
        if batch.end_hour[stay.row] <= DECISION_HOUR + HORIZON:  # the stay ended within the window
            assert (run.end_hour[j], run.died[j]) == (batch.end_hour[stay.row], batch.died[stay.row])
        else:
            assert not run.died[j] and run.end_hour[j] == MAX_STAY_HOURS  # still in hospital at the window's end
        assert run.fresh_draws[j] == 0


def test_factual_course_resimulated_from_admission_is_exact_too(simulated):
    """The antibiotic scenario starts at admission: the taped draws must reproduce the first day as well."""
    scenario = Scenario("factual_from_admission", "check", from_admission=True)
    (run,) = simulated.plan.resimulate((scenario,))
    for j, stay in enumerate(run.stays):
        assert run.fresh_draws[j] == 0
        assert run.severity_at_decision[j] == stay.decision_state.s[0]
        for signal in TRAJECTORY_SIGNALS:
            assert np.array_equal(run.course[signal][j], stay.factual_course[signal], equal_nan=True), signal


def test_withholding_insulin_raises_glucose_and_never_lowers_it(simulated):
    factual, withheld = simulated.runs["factual"], simulated.runs["insulin_withheld"]
    treated = 0
    for f, w in _paired(simulated, "insulin_withheld"):
        assert not _window_doses(withheld, w, "insulin_lispro")
        difference = withheld.course["glucose"][w] - factual.course["glucose"][f]
        assert np.all(difference[np.isfinite(difference)] >= 0)
        if _window_doses(factual, f, "insulin_lispro"):
            treated += 1
            assert np.nanmax(difference) > 5.0  # mg/dL: the doses it would have had mattered
        assert np.array_equal(withheld.course["severity"][w], factual.course["severity"][f], equal_nan=True)
    assert treated >= 3
    assert np.nanmean(withheld.course["glucose"]) > np.nanmean(factual.course["glucose"])


def test_starting_furosemide_lowers_pressure_and_fluid(simulated):
    factual, started = simulated.runs["factual"], simulated.runs["furosemide_started"]
    for f, s in _paired(simulated, "furosemide_started"):
        hours = [hour for hour, _ in _window_doses(started, s, "furosemide")]
        in_hospital = np.flatnonzero(np.isfinite(started.course["sbp"][s])) + DECISION_HOUR
        assert hours == [h for h in range(DECISION_HOUR, DECISION_HOUR + HORIZON, 12) if h in in_hospital]
        if not _window_doses(factual, f, "furosemide"):
            difference = started.course["fluid_overload"][s] - factual.course["fluid_overload"][f]
            assert np.all(difference[np.isfinite(difference)] <= 0)
    assert np.nanmean(started.course["sbp"] - factual.course["sbp"]) < -1.0
    assert np.nanmean(started.course["fluid_overload"]) < np.nanmean(factual.course["fluid_overload"])


def test_withholding_norepinephrine_leaves_none_running(simulated):
    run = simulated.runs["norepinephrine_withheld"]
    assert all(hours == [] for hours in run.norepinephrine_hours)
    factual = simulated.runs["factual"]
    for f, w in _paired(simulated, "norepinephrine_withheld"):
        if not factual.norepinephrine_hours[f]:
            assert np.array_equal(run.course["sbp"][w], factual.course["sbp"][f], equal_nan=True)


def test_earlier_antibiotics_apply_to_antibiotic_stays_and_help(simulated):
    run, factual = simulated.runs["antibiotic_6h_earlier"], simulated.runs["factual"]
    assert run.stays and all(stay.treatment == "antibiotics" for stay in run.stays)
    assert len(run.stays) == sum(stay.treatment == "antibiotics" for stay in simulated.plan.sampled)
    pairs = _paired(simulated, "antibiotic_6h_earlier")
    for _, a in pairs:
        original = float(run.stays[a].cohort.params.treatment_start[0])
        assert run.treatment_start[a] == max(0.0, original - 6.0)
    earlier = np.array([run.severity_at_decision[a] for _, a in pairs])
    as_given = np.array([factual.severity_at_decision[f] for f, _ in pairs])
    assert earlier.mean() < as_given.mean()
    probabilities = simulated.plan.outcome_probabilities(simulated.all)
    index = {id(stay): i for i, stay in enumerate(simulated.plan.sampled)}
    gains = [
        probabilities[("factual", index[id(stay)])][0] - probabilities[("antibiotic_6h_earlier", index[id(stay)])][0]
        for stay in run.stays
    ]
    assert np.mean(gains) > 0
    for stay in simulated.plan.sampled:  # drugs that do not act on the course keep the stay's own probability
        i = index[id(stay)]
        assert probabilities[("insulin_withheld", i)] == probabilities[("factual", i)]
        assert probabilities[("factual", i)] == (stay.p_death, stay.p_los_over_7_days)


def test_ground_truth_file_holds_the_counterfactuals_and_round_trips(generated):
    truth = generated.truth
    model = SiteGroundTruth.model_validate_json(generated.on.ground_truth_file.read_bytes())
    assert orjson.loads(orjson.dumps(model.model_dump(mode="json"))) == truth
    assert len(model.counterfactuals) == model.counterfactual_design.sampled_stays == 40
    assert set(model.counterfactual_design.scenarios) == {sc.name for sc in SCENARIOS}
    stays = {stay.encounter_id: stay for stay in model.stays}
    for cf in model.counterfactuals:
        assert stays[cf.encounter_id].alive_at_prediction_time and stays[cf.encounter_id].patient_id == cf.patient_id
        assert {"factual", "insulin_withheld", "furosemide_started", "norepinephrine_withheld"} <= set(cf.scenarios)
        assert ("antibiotic_6h_earlier" in cf.scenarios) == (cf.reason in ("sepsis", "pneumonia"))
        factual = cf.scenarios["factual"]
        assert factual.p_in_hospital_death == stays[cf.encounter_id].p_in_hospital_death
        assert all(len(values) == HORIZON for values in factual.signals.values())
        assert set(factual.signals) == set(TRAJECTORY_SIGNALS)
    older = {k: v for k, v in truth.items() if k not in ("counterfactuals", "counterfactual_design", "confounding")}
    assert SiteGroundTruth.model_validate(older).counterfactuals == []


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_fhir_export_is_byte_identical_with_counterfactuals_on_and_off(generated):
    on, off = _digest(generated.on.export_dir), _digest(generated.off.export_dir)
    assert len(on) >= 11 and on == off
    off_truth = orjson.loads(generated.off.ground_truth_file.read_bytes())
    assert off_truth["counterfactuals"] == [] and off_truth["counterfactual_design"]["sampled_stays"] == 0
    unchanged = lambda truth: {k: v for k, v in truth.items() if k not in ("counterfactuals", "counterfactual_design")}  # noqa: E731
    assert unchanged(off_truth) == unchanged(generated.truth)


def test_counterfactuals_never_reach_the_export(generated):
    names = [sc.name.encode() for sc in SCENARIOS] + [b"counterfactual", b"fluid_overload"]
    for path in generated.on.export_dir.iterdir():
        content = path.read_bytes()
        assert not any(name in content for name in names), path.name


def test_confounding_summary_shows_the_treated_were_sicker(generated):
    confounding = SiteGroundTruth.model_validate(generated.truth).confounding
    assert confounding is not None and confounding.stays > 60
    insulin, furosemide = confounding.by_drug["insulin_lispro"], confounding.by_drug["furosemide"]
    assert insulin.treated > 10 and furosemide.treated > 3
    assert insulin.mean_treated["glucose"] > insulin.mean_untreated["glucose"] + 20
    assert insulin.standardized_difference["glucose"] > 1.0 and insulin.odds_ratio_per_sd["glucose"] > 3
    assert insulin.mean_treated["severity"] > insulin.mean_untreated["severity"]
    assert furosemide.standardized_difference["fluid_overload"] > 1.0
    assert furosemide.mean_treated["fluid_overload"] > furosemide.mean_untreated["fluid_overload"]
