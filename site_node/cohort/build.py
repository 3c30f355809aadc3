"""Build a study's dataset from a site's OMOP database: cohort, consent, features, labels, split, attrition."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime

import numpy as np

from federation.contract.spec import IndexEvent, StudySpec
from federation.contract.twin_specs import TrajectorySpec
from federation.twins.trajectory_rows import pack as pack_trajectories
from site_node.cohort.attrition import CONSENT
from site_node.cohort.consent import denying_person_ids
from site_node.cohort.dataset import CALIBRATION, StudyDataset, snapshot_hash
from site_node.cohort.errors import CohortError
from site_node.cohort.features import feature_names, series_features, series_names, static_features
from site_node.cohort.features.demographics import FEMALE, MALE
from site_node.cohort.index_events import INDEX_DOMAINS
from site_node.cohort.keyed_hash import check_key, keyed_uniform
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.outcomes import DOMAINS as OUTCOME_DOMAINS
from site_node.cohort.outcomes import labels as outcome_labels
from site_node.cohort.selection import criteria, select_cohort
from site_node.cohort.split import SPLIT_PARTS, assign_split
from site_node.cohort.trajectories import build_trajectories
from site_node.cohort.windows import EVENT_TABLES


def tables_read(spec: StudySpec) -> set[str]:
    """The OMOP tables a study reads (concept_ancestor and observation_period are used when present: a
    database without observation periods gives a cohort that says why its observation requirement removed
    everyone, see `requirements`)."""
    covariates, cohort, outcome = spec.covariates, spec.cohort, spec.outcome
    needed = {"person", "death"}
    if cohort.visit_level:
        needed.add("visit_occurrence")
    needed |= {EVENT_TABLES[c.domain].table for c in covariates.occurrences}
    needed |= {EVENT_TABLES[c.domain].table for c in covariates.values}
    if covariates.categorical:
        needed.add(EVENT_TABLES["observation"].table)
    if covariates.time_series:
        needed.add(EVENT_TABLES["measurement"].table)
    if cohort.condition_concept_ids:
        needed.add(EVENT_TABLES["condition"].table)
    if cohort.index.event in INDEX_DOMAINS:
        needed.add(EVENT_TABLES[INDEX_DOMAINS[cohort.index.event]].table)
    if cohort.index.event == IndexEvent.PANEL:
        needed.add(EVENT_TABLES["measurement"].table)
    needed |= {EVENT_TABLES[c.domain].table for c in (*cohort.inclusion, *cohort.exclusion)}
    if outcome.event_kind in OUTCOME_DOMAINS:
        needed.add(EVENT_TABLES[OUTCOME_DOMAINS[outcome.event_kind]].table)
    return needed


def build_dataset(
    db_url: str,
    spec: StudySpec,
    *,
    split_key: bytes,
    schema: str | None = None,
    extra_excluded_person_ids: Iterable[int] = (),
    as_of: datetime | None = None,
    only_person_ids: Collection[int] | None = None,
    decision_hours: float | None = None,
) -> StudyDataset:
    """The study's examples at this site: one per qualifying patient who has not denied research use.

    `split_key` is the site's secret for the random split and the random visit choice. The split is the
    study's (`spec.evaluation.split`): random in its fractions, or temporal by each example's index date;
    a part the study does not cut, or one this site has no examples for, has no rows.
    `extra_excluded_person_ids` are withdrawals the site recorded outside the OMOP database; they are counted
    in `excluded_by_consent` together with the active denials in the consent registry at `as_of` (default:
    now). A database without the registry table (an OMOP database twinfed did not load) has no denials.
    Every build records its attrition table (`StudyDataset.attrition`): each criterion in order, consent,
    and the size of each part.

    `only_person_ids` keeps, of the selected and consented examples, those patients only, before any of
    their features are read: the patient twin answers a few patients without building the whole cohort.
    Each patient's row is then exactly what a full build gives them (the scaling is fixed by the study,
    the split is keyed per patient); the attrition and snapshot describe the kept rows only.

    `decision_hours` (a trajectory study, for the patient twin) puts the first decision time that many hours
    after each patient's index instead of at the study's prediction time: the twin asked at a time between
    the study's decision times sees the history up to that very time. The windows run on from there; one
    that begins after the end of the index visit is not used, the first included.

    Raises CohortError when the database is not an OMOP database (no CDM tables, no person table, a table
    the study reads is missing) and DatabaseUnavailable when it cannot be reached.
    """
    check_key(split_key)
    moment = as_of if as_of is not None else datetime.now()
    extra = {int(p) for p in extra_excluded_person_ids}
    with OmopSource.open(db_url, schema) as source:
        source.require(tables_read(spec))
        cohort = select_cohort(source, spec.cohort, spec.outcome, split_key)
        examples = cohort.examples
        withheld = denying_person_ids(source, moment) | extra
        consented = ~examples["person_id"].isin(withheld).to_numpy()
        cohort_size = len(examples)
        examples = examples[consented].reset_index(drop=True)
        attrition = cohort.attrition.then(CONSENT, criteria(spec.cohort, spec.outcome)[CONSENT], examples["person_id"])
        if only_person_ids is not None:
            examples = examples[examples["person_id"].isin({int(p) for p in only_person_ids})].reset_index(drop=True)
        source.write_index(examples)
        features = static_features(source, examples, spec.covariates)
        series = series_features(source, examples, spec.covariates)
        labels, event_days = outcome_labels(source, examples, cohort.visits, spec.outcome, spec.cohort)
        targets = None
        if isinstance(spec.model, TrajectorySpec):  # the patient twin: every window of each patient, packed
            first = spec.outcome.prediction_hours if decision_hours is None else decision_hours
            windows = build_trajectories(source, examples, spec.model, first, visit_level=spec.cohort.visit_level,
                                         first_always_used=decision_hours is None)  # fmt: skip
            features, targets = pack_trajectories(spec.model, features, windows, labels)
    person_ids = examples["person_id"].to_numpy(dtype=np.int64)
    if not np.isfinite(features).all():
        raise CohortError("a feature came out as NaN or infinite; the database holds a value the scaling cannot take")
    split_spec = spec.evaluation.split
    index_s = examples["index_s"].to_numpy(dtype=np.float64)
    split = assign_split(person_ids, index_s, split_spec, split_key)
    cut = [part for part in SPLIT_PARTS if part != "validation" or split_spec.has_validation]
    if isinstance(spec.model, TrajectorySpec):  # the site's own conformal calibration patients, out of training
        chosen = keyed_uniform(split_key, "conformal", person_ids) < spec.model.conformal_fraction
        split = np.where((split == "train") & chosen, CALIBRATION, split)
        cut.append(CALIBRATION)
    return StudyDataset(
        person_ids=person_ids,
        features=features,
        feature_names=feature_names(spec),
        labels=labels,
        event_days=event_days,
        series=series,
        series_names=series_names(spec),
        split=split,
        cohort_size=cohort_size,
        excluded_by_consent=cohort_size - len(examples),
        snapshot_hash=snapshot_hash(person_ids, features, labels, event_days, series, targets),
        attrition=attrition.with_parts(split, cut),
        sex=_sex(examples["gender_concept_id"].to_numpy(dtype=np.float64)),
        age_years=examples["age_years"].to_numpy(dtype=np.float64),
        index_s=index_s,
        targets=targets,
    )


def _sex(gender_concept_ids: np.ndarray) -> np.ndarray:
    """'female', 'male' or 'other' (any other concept, or none recorded) per patient."""
    return np.where(gender_concept_ids == FEMALE, "female", np.where(gender_concept_ids == MALE, "male", "other"))
