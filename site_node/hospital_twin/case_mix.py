"""Length of stay by case mix: the consortium's model asked about the patients in the beds at the start.

The twin's own stay curves (stays.py) are the hospital's history per ward and admission kind: right for
the average patient, blind to who is in the bed. A length-of-stay study (configs/study-length-of-stay.yaml:
time from a few hours after admission to the end of the stay, the discrete-time survival kind, trained with
DP-SGD across the consortium) knows how age, chronic conditions and the first hours' vitals and labs move
a stay. The twin borrows that: for each patient in a bed at the start whose first hours are recorded, the
model's expected remaining stay given the time already in hospital, against the same for the hospital's
own recent patients (the site's adjustment: the model is read relative to this hospital's case mix, so a
consortium that stays longer or shorter on average moves nothing), gives a factor on that patient's
remaining time in the current ward (an accelerated-time assumption: a patient expected to stay twice as
long as the hospital's usual patient at that point stays twice as long in this ward too). Patients
admitted less than the study's prediction time before the start have no features yet and keep factor 1;
so do the patients who arrive during the run (the twin does not know who they will be), and the wards after
a transfer.

Expected remaining stays are restricted to the study's grid (its last interval end, e.g. 30 days), on the
model's piecewise-exponential survival between the grid's ends. Factors are kept within [1/4, 4]. Nothing
leaves the site: the model came from the consortium, the patients and the factors stay here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from federation.contract import load_study
from federation.contract.spec import OutcomeKind, StudySpec
from federation.contract.twin_specs import DiscreteTimeSurvivalSpec
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.visit_features import visit_features

DAY_S = 86400
FACTOR_RANGE = (0.25, 4.0)
REFERENCE_DAYS = 365  # the hospital's own patients the model is read against: admissions of the last year
_STEPS = 600  # integration grid over the study's horizon


class CaseMixError(ValueError):
    """The length-of-stay study or its model cannot be used by the twin; the message says why."""


@dataclass(frozen=True)
class CaseMixFactors:
    """Each occupant's factor on its remaining stay, by visit id, and what was done, in words."""

    factors: dict[int, float]
    note: str


def load_length_of_stay_study(path: Path) -> StudySpec:
    """The study file, checked to be a length of stay the twin can read: discrete-time survival of discharge,
    indexed at the visit's start."""
    spec = load_study(path)
    if spec.outcome.event_kind != OutcomeKind.DISCHARGE or not isinstance(spec.model, DiscreteTimeSurvivalSpec):
        raise CaseMixError(
            f"{path}: the hospital twin's length_of_stay study must be a time to discharge (outcome kind "
            "time_to_event, event discharge) with model kind discrete_time_survival; configs/study-length-of-stay.yaml "
            "is one"
        )
    return spec


def _survival_curves(spec: StudySpec, weights: dict, features: np.ndarray) -> np.ndarray:
    """The model's survival (still in hospital) at each grid end, (n, K)."""
    import torch

    from federation.twins import build_model
    from federation.twins.survival import DiscreteTimeSurvivalKind

    model = build_model(spec.model, features.shape[1])
    try:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    except (RuntimeError, KeyError) as exc:
        raise CaseMixError(
            f"the length-of-stay model's weights do not fit study {spec.study.id} ({exc}); give the weights of "
            "that very study"
        ) from None
    model.eval()
    with torch.no_grad():
        outputs = model(torch.as_tensor(features, dtype=torch.float32)).numpy()
    return DiscreteTimeSurvivalKind.survival_curves(outputs)


def expected_remaining(curves: np.ndarray, edges: np.ndarray, elapsed_days: np.ndarray) -> np.ndarray:
    """Per row, the expected stay still ahead (days, up to the grid's last end) given `elapsed_days` already
    in: the integral of S from the elapsed time to the end, over S at the elapsed time, with S
    piecewise-exponential between the grid's ends (constant hazard within an interval)."""
    knots = np.concatenate([[0.0], np.asarray(edges, dtype=np.float64)])
    log_s = np.concatenate([np.zeros((curves.shape[0], 1)), np.log(np.maximum(curves, 1e-300))], axis=1)
    t = np.linspace(0.0, knots[-1], _STEPS + 1)
    log_at = np.stack([np.interp(t, knots, row) for row in log_s])  # log S is linear within an interval
    s = np.exp(log_at)
    tail = np.concatenate([np.cumsum(((s[:, 1:] + s[:, :-1]) / 2 * np.diff(t))[:, ::-1], axis=1)[:, ::-1],
                           np.zeros((s.shape[0], 1))], axis=1)  # fmt: skip
    e = np.clip(np.asarray(elapsed_days, dtype=np.float64), 0.0, knots[-1])
    at = np.array([np.interp(x, t, row) for x, row in zip(e, tail, strict=True)])
    s_e = np.exp(np.array([np.interp(x, knots, row) for x, row in zip(e, log_s, strict=True)]))
    return np.where(s_e > 1e-12, at / np.maximum(s_e, 1e-12), 0.0)


def occupant_factors(
    source: OmopSource,
    db_url: str,
    schema: str | None,
    spec: StudySpec,
    weights: dict,
    occupant_visits: list[int],
    at_s: int,
) -> CaseMixFactors:
    """The factors of the occupants (their visit ids) at `at_s`; see the module's docstring."""
    prediction_s = round(spec.outcome.prediction_hours * 3600)
    rows = visit_features(db_url, spec, occupant_visits, schema)
    known = rows.start_s + prediction_s <= at_s
    visits, features, starts = rows.visit_ids[known], rows.features[known], rows.start_s[known]
    reference_ids = _reference_visits(source, spec, at_s, prediction_s)
    if not len(visits) or not len(reference_ids):
        return CaseMixFactors({}, "no patient in a bed at the start has the study's first hours recorded")
    reference_features = visit_features(db_url, spec, reference_ids, schema).features
    edges = np.asarray(spec.model.interval_days, dtype=np.float64)
    elapsed = (at_s - starts - prediction_s) / DAY_S
    own = expected_remaining(_survival_curves(spec, weights, features), edges, elapsed)
    mean_curve = _survival_curves(spec, weights, reference_features).mean(axis=0, keepdims=True)
    usual = expected_remaining(np.repeat(mean_curve, len(elapsed), axis=0), edges, elapsed)
    factors = np.clip(np.where(usual > 1e-9, own / np.maximum(usual, 1e-9), 1.0), *FACTOR_RANGE)
    note = (
        f"length of stay by case mix ({spec.study.id}): {len(visits)} of {len(occupant_visits)} patients in a bed "
        f"at the start have a factor on their remaining stay (median {np.median(factors):.2f}, range "
        f"{factors.min():.2f}-{factors.max():.2f}), read against {len(reference_ids)} of the hospital's own "
        f"admissions of the {REFERENCE_DAYS} days before"
    )
    return CaseMixFactors({int(v): float(f) for v, f in zip(visits, factors, strict=True)}, note)


def _reference_visits(source: OmopSource, spec: StudySpec, at_s: int, prediction_s: int) -> list[int]:
    """The hospital's own recent patients: each person's latest visit of the study's kinds admitted in the
    REFERENCE_DAYS before `at_s` with its first hours recorded by then."""
    visit = source.table("visit_occurrence")
    start = source.epoch(visit.c.visit_start_datetime, visit.c.visit_start_date).label("start_s")
    since = dt.datetime.fromtimestamp(at_s - REFERENCE_DAYS * DAY_S, tz=dt.UTC).replace(tzinfo=None)
    frame = source.frame(
        select(visit.c.person_id, visit.c.visit_occurrence_id, start).where(
            visit.c.visit_concept_id.in_(sorted(set(spec.cohort.visit_concept_ids))),
            visit.c.visit_start_date >= since.date(),
        )
    )
    frame = frame[frame.start_s.astype(float) <= at_s - prediction_s]
    ordered = frame.sort_values(["person_id", "start_s", "visit_occurrence_id"])
    latest = ordered.drop_duplicates("person_id", keep="last")
    return [int(v) for v in latest.visit_occurrence_id.tolist()]

__all__ = ["CaseMixError", "CaseMixFactors", "expected_remaining", "load_length_of_stay_study", "occupant_factors"]
