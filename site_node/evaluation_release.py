"""What a site releases when the coordinator asks how well a model does on its held-out patients.

Two forms, chosen by the site's policy (`evaluation_release`), never by the coordinator:

* `dp` (the default): per outcome class, the number of patients the model put in each risk stratum, each
  count with Gaussian noise. One patient changes one count by one, so the release is the Gaussian
  mechanism with sensitivity 1; its cost is an event (noise multiplier = the noise's standard deviation,
  sample rate 1, one step) in the same Opacus accountant as the study's training rounds, so the ledger
  composes them. The noise is calibrated once for all the study's planned evaluation releases
  (`StudySpec.evaluation_releases`) within `evaluation.epsilon`, like training's noise is for all its
  rounds. With adaptive strata each release has two stages, each a Gaussian mechanism: the scores'
  distribution over a fixed grid (outcomes not involved; `strata_budget_share` of the budget), from which
  the coordinator places the strata, then the outcome histograms over them. Gaussian mechanisms compose
  by adding 1/sigma^2, so splitting one release's 1/sigma^2 in those shares costs exactly what one
  release would.
* `exact`: the exact confusion counts at the threshold with AUROC, loss and Brier score, checked as a whole
  by the disclosure register (site_node.governance.disclosure). The most revealing of four tiers that
  passes leaves: everything; or the class counts and AUROC, loss, Brier without the confusion cells; or
  the number of examples alone; or nothing. Outcome-dependent values need both classes at or above the
  floor; the answer names what was withheld and why. A non-private study (privacy mode none) always
  releases this way: it has no epsilon to account.

Train and test patients are disjoint, so composing training and evaluation in one accountant over-counts
(parallel composition would take the larger, not the sum); it is done anyway because the split of a
temporal study can move a patient between parts when their data change, and an over-count is safe.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.spec import StudySpec
from federation.contract.strata import Strata
from site_node.cohort import StudyDataset
from site_node.governance.disclosure import DisclosureRegister, Quantity
from site_node.training import calibrate_noise
from site_node.training.evaluation import (
    auroc,
    confusion,
    gaussian_noise,
    model_logits,
    score_distribution,
    score_histograms,
)

ALL = frozenset({"tp", "fn", "fp", "tn"})
POSITIVES = frozenset({"tp", "fn"})
# Noise on each released count is rounded to this many decimals: post-processing, and it keeps the wire small.
DECIMALS = 3


def evaluation_noise(spec: StudySpec, delta: float, stage: str = "outcomes") -> float:
    """The noise standard deviation of each count of one stage, for all the study's planned evaluation
    releases together to spend `evaluation.epsilon` at `delta` (raises CalibrationError when it cannot)."""
    sigma = calibrate_noise(spec.evaluation.epsilon, delta, 1.0, spec.evaluation_releases(), spec.privacy.accountant)
    if spec.evaluation.strata == "fixed":
        return sigma
    share = spec.evaluation.strata_budget_share if stage == "scores" else 1.0 - spec.evaluation.strata_budget_share
    return sigma / float(np.sqrt(share))


def _noisy(counts: np.ndarray, noise_sd: float) -> list[float]:
    return [float(v) for v in np.round(counts + gaussian_noise(len(counts), noise_sd), DECIMALS)]


def dp_score_release(model: nn.Module, data: StudyDataset, part: str, noise_sd: float) -> EvaluationRelease:
    """The noisy distribution of the model's scores over the fixed grid (outcomes not involved)."""
    counts = score_distribution(model_logits(model, data.features))
    return EvaluationRelease(
        part=part, mode=ReleaseMode.DP, stage="scores", scores=_noisy(counts, noise_sd), noise_sd=float(noise_sd)
    )


def dp_release(
    model: nn.Module, data: StudyDataset, strata: Strata, part: str, noise_sd: float
) -> EvaluationRelease:
    """The noisy score histograms of `data` over `strata` (every patient in exactly one count)."""
    positives, negatives = score_histograms(model_logits(model, data.features), data.labels, strata)
    return EvaluationRelease(
        part=part,
        mode=ReleaseMode.DP,
        score_edges=list(strata.edges),
        positives=_noisy(positives, noise_sd),
        negatives=_noisy(negatives, noise_sd),
        noise_sd=float(noise_sd),
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
    """The exact aggregates of `data` that may leave under the cell-count floor, recorded in the register."""
    import torch
    import torch.nn.functional as F

    logits = model_logits(model, data.features)
    labels = np.asarray(data.labels, dtype=np.float64)
    cells = confusion(logits, labels, spec.evaluation.threshold)
    n, positives = sum(cells.values()), cells["tp"] + cells["fn"]
    target = torch.from_numpy(labels)
    scores = torch.from_numpy(logits)
    metrics = {
        "auroc": auroc(labels, logits),
        "loss": float(F.binary_cross_entropy_with_logits(scores, target)),
        "brier": float((torch.sigmoid(scores) - target).square().mean()),
    }
    tiers: list[dict[Quantity, int]] = [
        {frozenset({name}): value for name, value in cells.items()},
        {ALL: n, POSITIVES: positives},
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
    if index is not None and index <= 1:
        release.update(examples=n, with_outcome=positives, **metrics)
    else:
        withheld += ["auroc", "loss", "brier"]
    if index == 0:
        release.update(
            true_positives=cells["tp"],
            false_negatives=cells["fn"],
            false_positives=cells["fp"],
            true_negatives=cells["tn"],
        )
    else:
        withheld += ["confusion counts"]
    if index == 2:
        release.update(examples=n)
    if index is None:
        withheld += ["examples"]
        release["mode"] = ReleaseMode.WITHHELD
    if withheld:
        release.update(withheld=", ".join(withheld), withheld_reason="; ".join(reasons) or None)
    return EvaluationRelease(**release)
