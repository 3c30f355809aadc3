"""What a twin kind is: everything about one kind of model, from its study section to its model-card section.

A kind is one module that subclasses `TwinKind` and registers itself (federation.twins.registry), the way an
Opacus accountant is one class behind one interface. Both sides of a study call the same kind:

* the site builds the model, turns the cohort's labels (or event times) into the targets its loss reads,
  trains with DP-SGD (the kind's loss and its gradient at the model's outputs are all the trainer needs),
  and releases its evaluation as the kind's histogram of held-out patients, in which every patient counts
  in exactly one cell, so one Gaussian mechanism of sensitivity 1 protects it whatever the kind;
* the coordinator sizes the same model, pools the sites' releases into the kind's metrics, picks the
  round whose validation metric is best, and writes the kind's section of the model card.

`fit` says how a kind is fitted: `dp_sgd` over patients (every kind today), or `dp_statistics` for kinds
fitted from noisy aggregates (an arrivals rate, say), which then need no trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from federation.contract.protocol import EvaluationRelease
from federation.contract.spec import EvaluationSpec, StudySpec
from federation.contract.strata import Strata
from federation.contract.strict import Strict
from federation.contract.twin_specs import Target
from federation.twins.cards import estimate_text

FitMode = Literal["dp_sgd", "dp_statistics"]


@dataclass(frozen=True)
class ExactEvaluation:
    """A kind's metrics of a model on a site's own patients, computed exactly (kept at the site, or released
    as exact aggregates under the cell-count floor).

    `examples` and `with_outcome` (patients with the event) are the counts the floor applies to; `cells` are
    the finer counts an exact release may add when every one passes the floor (the risk kinds' confusion
    counts at the threshold), named as the site's disclosure register counts patients ('tp', 'fn', 'fp',
    'tn': together every patient of the part, 'tp' and 'fn' those with the outcome), and `cell_fields`
    names each cell's wire field; `metrics` are the kind's values by their wire names (None where not
    estimable)."""

    examples: int
    with_outcome: int
    metrics: dict[str, float | None]
    cells: dict[str, int]
    cell_fields: dict[str, str]


class TwinKind(ABC):
    """One kind of twin sub-model. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # the `model.kind` a study names
    spec_type: ClassVar[type[Strict]]  # its section of the study (federation.contract.twin_specs)
    fit: ClassVar[FitMode] = "dp_sgd"
    summary: ClassVar[str]  # one line for `study check` and the model card
    pooled_type: ClassVar[type[BaseModel]]  # what `pool` returns, stored in the run's history and card
    selection_metric: ClassVar[str]  # the pooled metric (higher is better) that picks the study's round
    selection_label: ClassVar[str]  # its name for people: 'AUROC', 'C-index'
    histogram_fields: ClassVar[tuple[str, ...]]  # the release fields `histograms` fills, in their order
    # How many cells of all the histograms together one patient is in, as the L2 norm of their counts (1 when
    # they are in exactly one cell; sqrt(m) when in one cell of each of m histograms): the release's noise is
    # this times the stage's, so the ledger's noise multiplier stays what it says.
    release_sensitivity: ClassVar[float] = 1.0
    # The loss's gradient at the outputs is written out (`output_gradient`), for the single-pass engine; a kind
    # that leaves it to autograd (trained by the per-patient engine) says False.
    closed_form_gradient: ClassVar[bool] = True

    @property
    def targets(self) -> Target:
        return self.spec_type.targets  # type: ignore[attr-defined]

    # --- the model and its loss ---------------------------------------------------------------------

    @abstractmethod
    def build(self, spec: Strict, n_features: int) -> nn.Module:
        """The untrained model (the caller seeds torch so every site and the coordinator get the same)."""

    @abstractmethod
    def targets_of(self, spec: Strict, labels: np.ndarray, event_days: np.ndarray | None) -> np.ndarray:
        """What the loss reads for each patient (float32, one row per patient), from the cohort's labels and
        event times; ValueError naming the problem when they cannot be (a label not 0/1, a time missing)."""

    @abstractmethod
    def loss(self, spec: Strict, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each patient's loss (n,) from the model's outputs (n, k) and targets: torch operations only, so
        autograd and Opacus can differentiate it. One patient's loss depends on that patient alone."""

    @abstractmethod
    def output_gradient(self, spec: Strict, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """d loss_i / d outputs_i (n, k), in closed form: the single-pass DP-SGD engine needs only this."""

    @abstractmethod
    def risk_logits(self, spec: Strict, outputs: np.ndarray) -> np.ndarray:
        """Each patient's one risk number as a logit (n,), which the evaluation's risk strata cut."""

    # --- evaluation at a site -----------------------------------------------------------------------

    def at_site(self, spec: Strict, model: nn.Module, calibration: tuple[np.ndarray, np.ndarray] | None) -> nn.Module:
        """The model as the site evaluates and uses it: the global model, or (a kind that calibrates at each
        site, from the site's own calibration patients' inputs and targets) the model with that site's
        calibration on top. Nothing of the calibration leaves the site."""
        return model

    @abstractmethod
    def histograms(
        self, spec: Strict, outputs: np.ndarray, targets: np.ndarray, strata: Strata
    ) -> dict[str, np.ndarray]:
        """The counts a DP evaluation release is made of, by wire field: every patient in exactly one cell of
        all of them together (sensitivity 1), or of each of several histograms (`release_sensitivity`)."""

    @abstractmethod
    def histogram_sizes(self, spec: Strict, strata: int) -> list[int]:
        """The length of each of `histogram_fields` over `strata` risk strata."""

    @abstractmethod
    def check_histograms(self, spec: Strict, release: EvaluationRelease) -> None:
        """ValueError unless `release` carries this kind's histograms in the shape its strata imply."""

    @abstractmethod
    def exact(self, spec: Strict, outputs: np.ndarray, targets: np.ndarray, threshold: float) -> ExactEvaluation:
        """The exact metrics of the model on these patients."""

    # --- at the coordinator -------------------------------------------------------------------------

    def pool(
        self,
        study: StudySpec,
        releases: Sequence[tuple[str, EvaluationRelease]],
        *,
        seed: int = 0,
        scores: np.ndarray | None = None,
    ) -> BaseModel:
        """The sites' releases of one part after one round, pooled into this kind's metrics with intervals, and
        the same by subgroup (sex, age band, site: federation.twins.subgroups).

        `scores`: the pooled DP score distribution of the same patients (adaptive strata), from which each
        stratum's mean risk is read (Strata.mean_risks); without it, the strata's logit middles."""
        from federation.twins.subgroups import subgroup_results

        pooled = self.pool_overall(study, releases, seed=seed, scores=scores)
        pooled.subgroups = subgroup_results(self, study, releases, seed=seed, scores=scores)  # type: ignore[attr-defined]
        return pooled

    @abstractmethod
    def pool_overall(
        self,
        study: StudySpec,
        releases: Sequence[tuple[str, EvaluationRelease]],
        *,
        seed: int = 0,
        scores: np.ndarray | None = None,
    ) -> BaseModel:
        """The releases pooled into this kind's metrics (its pooled type, with an empty `subgroups`)."""

    @abstractmethod
    def selection_score(self, pooled: BaseModel) -> float | None:
        """The pooled value of `selection_metric` (None when not estimable)."""

    @abstractmethod
    def headline(self, pooled: dict | None) -> str:
        """The pooled result in a few words ('pooled AUROC 0.71 (0.66-0.76)'), from its stored form."""

    @abstractmethod
    def calibration_text(self, pooled: dict | None) -> str:
        """The pooled calibration in a few words ('calibration slope 0.95 (0.80-1.10)'), from its stored form."""

    def validation_lines(self, pooled: dict | None) -> list[str]:
        """The calibration and each subgroup's metric, for people (the demo's summary, command output); a
        subgroup too small to show says so."""
        if not pooled:
            return []
        lines = [self.calibration_text(pooled)]
        groups: dict[str, list[str]] = {}
        for subgroup in pooled.get("subgroups") or []:
            metric = subgroup.get("metric") or {}
            shown = subgroup.get("note") or estimate_text(metric, 2)
            groups.setdefault(subgroup["group"], []).append(f"{subgroup['label']} {shown}")
        lines += [f"{self.selection_label} by {group}: " + "; ".join(parts) for group, parts in groups.items()]
        return lines

    @abstractmethod
    def card_metrics(self, pooled: BaseModel | None) -> dict[str, object]:
        """The flat headline figures of the model card's `metrics` (for scripts)."""

    @abstractmethod
    def card_html(self, study: StudySpec, pooled: BaseModel | None, selection: str) -> str:
        """The kind's section of the HTML model card: its metrics, tables and plots."""

    def describe(self, spec: Strict, evaluation: EvaluationSpec) -> str:
        """What the kind computes, in words, for `study check` and the steward's approval."""
        return self.summary
