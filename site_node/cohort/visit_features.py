"""A study's features of named visits, for a twin that asks about the patients in the beds now.

`build_dataset` selects a study's cohort: one example per patient, chosen by the study's rules, with its
outcome. The hospital twin needs something else of a length-of-stay study: the features of the visits
running at its start (whoever's first or fifth stay it is), computed exactly as the study computes them,
so the consortium's model can be asked about them. Only what the covariates read is needed: each visit is
indexed at its start and the features' windows run from there; no outcome, no split, no consent check
(nothing leaves the site: the twin's answers stay in its folder, as the patients' data do).

Anchors are time zero of each example: the index (the visit's start), the prediction time (index +
`outcome.prediction_hours`) and the visit's end.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from federation.contract.spec import IndexEvent, StudySpec
from site_node.cohort.features import static_features
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.selection import DAY_S, YEAR_DAYS, birth_seconds, persons_of


@dataclass(frozen=True)
class VisitRows:
    """The visits found, in person order: their ids (int64), starts (seconds) and features (float32, (m, d))."""

    visit_ids: np.ndarray
    start_s: np.ndarray
    features: np.ndarray


def visit_features(db_url: str, spec: StudySpec, visit_ids: Collection[int], schema: str | None = None) -> VisitRows:
    """The rows of those of `visit_ids` the database holds with a start and a person, their features in the
    order of `feature_names(spec)`. One visit per person (a patient lies in one bed):
    ValueError when two of the visits are one person's. The study must be visit-level, indexed at the
    visit's start (a length-of-stay study)."""
    if not spec.cohort.visit_level or spec.cohort.index.event != IndexEvent.VISIT_START:
        raise ValueError(
            f"study {spec.study.id} is not indexed at the start of a visit: the features of a visit in progress "
            "are those of a visit-level study with index visit_start"
        )
    wanted = sorted({int(v) for v in visit_ids})
    with OmopSource.open(db_url, schema) as source:
        visit = source.table("visit_occurrence")
        visits = source.frame(
            select(
                visit.c.visit_occurrence_id,
                visit.c.person_id,
                source.epoch(visit.c.visit_start_datetime, visit.c.visit_start_date).label("start_s"),
                source.epoch(visit.c.visit_end_datetime, visit.c.visit_end_date).label("end_s"),
            ).where(visit.c.visit_occurrence_id.in_(wanted))
        )
        if visits.empty:
            return VisitRows(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros((0, 0), dtype=np.float32))
        visits = visits.dropna(subset=["start_s"]).astype({"visit_occurrence_id": "int64", "person_id": "int64"})
        if visits.person_id.duplicated().any():
            twice = int(visits.person_id[visits.person_id.duplicated()].iloc[0])
            raise ValueError(f"person {twice} has two of the visits asked about: one visit per patient")
        persons = persons_of(source, select(visit.c.person_id).where(visit.c.visit_occurrence_id.in_(wanted)))
        examples = visits.merge(persons, on="person_id", how="inner").sort_values("person_id")
        examples = examples.reset_index(drop=True)
        start = examples["start_s"].to_numpy(dtype=np.float64)
        examples["birth_s"] = birth_seconds(examples)
        examples["index_s"] = start
        examples["prediction_s"] = start + round(spec.outcome.prediction_hours * 3600)
        end = examples["end_s"].to_numpy(dtype=np.float64)
        examples["visit_end_s"] = np.where(np.isfinite(end), end, examples["prediction_s"])
        examples["age_years"] = (start - examples["birth_s"].to_numpy()) / (YEAR_DAYS * DAY_S)
        source.write_index(examples)
        features = static_features(source, examples, spec.covariates)
    return VisitRows(examples["visit_occurrence_id"].to_numpy(dtype=np.int64), start, features)


__all__ = ["VisitRows", "visit_features"]
