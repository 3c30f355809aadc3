"""What a site releases when the coordinator asks how well a model does on its held-out patients.

Two forms, chosen by the site's policy (`evaluation_release`), never by the coordinator:

* `dp` (the default): the twin kind's histograms of the held-out patients (risk kinds: per outcome class,
  the patients the model put in each risk stratum; survival: the patients per risk stratum, interval of
  event or censoring, and event), each count with Gaussian noise. One patient changes one count by one, so
  the release is the Gaussian mechanism with sensitivity 1; its cost is an event (noise multiplier = the
  noise's standard deviation, sample rate 1, one step) in the same Opacus accountant as the study's training
  rounds, so the ledger composes them. The noise is calibrated once for all the study's planned evaluation
  releases (`StudySpec.evaluation_releases`) within `evaluation.epsilon`, like training's noise is for all
  its rounds. With adaptive strata each release has two stages, each a Gaussian mechanism: the scores'
  distribution over a fixed grid (outcomes not involved; `strata_budget_share` of the budget), from which
  the coordinator places the strata, then the outcome histograms over them, overall and within each
  subgroup of sex and of age band (`subgroup_budget_share` of the outcome stage, split between the two
  partitions). Gaussian mechanisms compose by adding 1/sigma^2, so splitting one release's 1/sigma^2 in
  those shares costs exactly what one release would.
* `exact`: the kind's exact metrics (risk: the confusion counts at the threshold with AUROC, loss and Brier
  score; survival: the C-index and Brier scores), checked as a whole by the disclosure register
  (site_node.governance.disclosure). The most revealing of four tiers that passes leaves: everything; or
  the class counts and the metrics without the finer cells (the confusion counts); or
  the number of examples alone; or nothing. Outcome-dependent values need both classes at or above the
  floor; the answer names what was withheld and why. A non-private study (privacy mode none) always
  releases this way: it has no epsilon to account.

Train and test patients are disjoint, so composing training and evaluation in one accountant over-counts
(parallel composition would take the larger, not the sum); it is done anyway because the split of a
temporal study can move a patient between parts when their data change, and an over-count is safe.
"""

from __future__ import annotations

import itertools

import numpy as np
from torch import nn

from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.spec import StudySpec
from federation.contract.strata import Strata
from federation.contract.twin_specs import LogisticRegressionSpec
from federation.twins import kind_of
from site_node.cohort import StudyDataset
from site_node.governance.disclosure import DisclosureRegister, Quantity
from site_node.training import calibrate_noise
from site_node.training.evaluation import gaussian_noise, model_outputs, score_distribution

ALL = frozenset({"tp", "fn", "fp", "tn"})  # every patient of the part (the quantity's name is historical)
POSITIVES = frozenset({"tp", "fn"})  # patients with the outcome
# Noise on each released count is rounded to this many decimals: post-processing, and it keeps the wire small.
DECIMALS = 3


def evaluation_noise(spec: StudySpec, delta: float, stage: str = "outcomes") -> float:
    """The noise multiplier of one stage of a release as its ledger event, for all the study's planned
    evaluation releases together to spend `evaluation.epsilon` at `delta` (raises CalibrationError when it
    cannot). A stage of several Gaussian mechanisms (the outcome histograms and the subgroups' ones) costs
    what one of this noise would: their 1/sigma^2 add up to it (see `outcome_noise`)."""
    sigma = calibrate_noise(spec.evaluation.epsilon, delta, 1.0, spec.evaluation_releases(), spec.privacy.accountant)
    if spec.evaluation.strata == "fixed":
        return sigma
    share = spec.evaluation.strata_budget_share if stage == "scores" else 1.0 - spec.evaluation.strata_budget_share
    return sigma / float(np.sqrt(share))


def outcome_noise(stage_sigma: float, spec: StudySpec) -> tuple[float, float | None]:
    """(the standard deviation of each overall count, of each subgroup count or None without subgroups) of an
    outcome stage whose ledger noise multiplier is `stage_sigma`: each way of grouping patients (sex, age
    band) is a partition released with `subgroup_budget_share / partitions` of the stage's 1/sigma^2, the
    overall histograms with the rest."""
    partitions = len(spec.evaluation.subgroups)
    if not partitions:
        return stage_sigma, None
    grouped = spec.evaluation.subgroup_budget_share
    return stage_sigma / float(np.sqrt(1.0 - grouped)), stage_sigma / float(np.sqrt(grouped / partitions))


def subgroup_masks(data: StudyDataset, spec: StudySpec) -> dict[str, np.ndarray]:
    """Each subgroup the study releases (by label, e.g. 'sex:female', 'age:50-69'), as a mask over `data`.

    Every listed way of grouping is a partition: each patient is in exactly one of its subgroups (sex not
    recorded as female or male counts as 'other'; every age falls in one band)."""
    masks: dict[str, np.ndarray] = {}
    for grouping in spec.evaluation.subgroups:
        if (grouping == "sex" and data.sex is None) or (grouping == "age" and data.age_years is None):
            continue  # a dataset made by hand, without who the patients are: no subgroups of that kind
        if grouping == "sex":
            sex = np.asarray(data.sex, dtype=object)
            for label in ("female", "male", "other"):
                masks[f"sex:{label}"] = sex == label
        elif grouping == "age":
            edges = list(spec.evaluation.age_bands)
            band = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(data.age_years), side="right")
            names = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in itertools.pairwise(edges)] + [f"{edges[-1]}+"]
            for index, label in enumerate(names):
                masks[f"age:{label}"] = band == index
    return masks


def _noisy(counts: np.ndarray, noise_sd: float) -> list[float]:
    return [float(v) for v in np.round(counts + gaussian_noise(len(counts), noise_sd), DECIMALS)]


def _scored(spec: StudySpec | None, model: nn.Module, data: StudyDataset):
    """The study's kind and model section, the model's outputs on `data` and the kind's targets of its
    patients (without a study: a risk score)."""
    model_spec = spec.model if spec is not None else LogisticRegressionSpec()
    kind = kind_of(model_spec)
    targets = data.targets if data.targets is not None else kind.targets_of(model_spec, data.labels, data.event_days)
    return kind, model_spec, model_outputs(model, data.features), targets


def dp_score_release(
    model: nn.Module, data: StudyDataset, part: str, noise_sd: float, spec: StudySpec | None = None
) -> EvaluationRelease:
    """The noisy distribution of the model's risk scores over the fixed grid (outcomes not involved)."""
    outputs = model_outputs(model, data.features)
    logits = outputs[:, 0] if spec is None else kind_of(spec.model).risk_logits(spec.model, outputs)
    counts = score_distribution(logits)
    return EvaluationRelease(
        part=part, mode=ReleaseMode.DP, stage="scores", scores=_noisy(counts, noise_sd), noise_sd=float(noise_sd)
    )


def dp_release(
    model: nn.Module,
    data: StudyDataset,
    strata: Strata,
    part: str,
    noise_sd: float,
    spec: StudySpec | None = None,
    subgroup_sd: float | None = None,
) -> EvaluationRelease:
    """The twin kind's noisy histograms of `data` over `strata` (every patient in exactly one count), and with
    `subgroup_sd` the same within each of the study's subgroups (each partition one more such release)."""
    kind, model_spec, outputs, targets = _scored(spec, model, data)
    histograms = kind.histograms(model_spec, outputs, targets, strata)
    # a kind whose patients are in a cell of each of several histograms: the noise grows with the sensitivity
    noise_sd *= kind.release_sensitivity
    subgroup_sd = None if subgroup_sd is None else subgroup_sd * kind.release_sensitivity
    extra: dict[str, object] = {}
    if spec is not None and subgroup_sd is not None and spec.evaluation.subgroups:
        labels, counts = [], []
        for label, mask in subgroup_masks(data, spec).items():
            group = kind.histograms(model_spec, outputs[mask], targets[mask], strata)
            labels.append(label)
            counts += [value for name in kind.histogram_fields for value in group[name]]
        extra = {
            "subgroups": labels,
            "subgroup_counts": _noisy(np.asarray(counts, dtype=np.float64), subgroup_sd),
            "subgroup_noise_sd": float(subgroup_sd),
        }
    return EvaluationRelease(
        part=part,
        mode=ReleaseMode.DP,
        score_edges=list(strata.edges),
        noise_sd=float(noise_sd),
        **{name: _noisy(counts, noise_sd) for name, counts in histograms.items()},
        **extra,
    )


def exact_release(
    model: nn.Module,
    data: StudyDataset,
    spec: StudySpec,
    part: str,
    *,
    floor: int,
    register: DisclosureRegister,
    study_hash: str,
    release_key: str,
) -> EvaluationRelease:
    """The exact aggregates of `data` that may leave under the cell-count floor, recorded in the register.

    Tiers, most revealing first: the kind's finer cells (the risk kinds' confusion counts) with the class
    counts and metrics; the class counts and metrics; the number of examples; nothing."""
    kind, model_spec, outputs, targets = _scored(spec, model, data)
    result = kind.exact(model_spec, outputs, targets, spec.evaluation.threshold)
    n, positives = result.examples, result.with_outcome
    classes = {ALL: n, POSITIVES: positives}
    tiers: list[dict[Quantity, int]] = [
        {frozenset({name}): value for name, value in result.cells.items()} if result.cells else dict(classes),
        classes,
        {ALL: n},
    ]
    classes_ok = min(positives, n - positives) >= floor
    usable = tiers if classes_ok else tiers[2:]
    index, reasons = register.first_passing(spec.study.id, study_hash, part, release_key, usable, floor)
    if not classes_ok:
        reasons.insert(0, f"fewer than {floor} patients with or without the outcome (the site's cell-count floor)")
        index = None if index is None else index + 2
    release = {"part": part, "mode": ReleaseMode.EXACT, "cell_floor": floor}
    withheld: list[str] = []
    metrics = {name: value for name, value in result.metrics.items() if name in EvaluationRelease.model_fields}
    if index is not None and index <= 1:
        release.update(examples=n, with_outcome=positives, **metrics)
    else:
        withheld += list(metrics)
    if index == 0:
        release.update({result.cell_fields[name]: value for name, value in result.cells.items()})
    elif result.cells:
        withheld += ["confusion counts"]
    if index == 2:
        release.update(examples=n)
    if index is None:
        withheld += ["examples"]
        release["mode"] = ReleaseMode.WITHHELD
    if withheld:
        release.update(withheld=", ".join(withheld), withheld_reason="; ".join(reasons) or None)
    return EvaluationRelease(**release)
