"""The study contract: what a consortium asks every site to compute, as one validated document.

A study names its cohort, covariates, outcome, twin sub-model, training schedule and privacy target in
OMOP terms (concept ids and time windows, the way OHDSI FeatureExtraction declares covariates), so the
same file means the same thing at every hospital. Sites approve a study by its hash (see `hashing`), so
every field here is part of what a data steward signs off; unknown fields are refused rather than
ignored, because a misspelt privacy setting must never silently fall back to a default.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from federation.contract.strict import Strict as _Strict
from federation.contract.twin_specs import (  # noqa: F401 (the study contract names them too)
    TIME_TO_EVENT,
    DiscreteTimeSurvivalSpec,
    LogisticRegressionSpec,
    MlpSpec,
    ModelSpec,
)

# OMOP standard visit concepts (Visit domain) a cohort may start from.
VISIT_CONCEPTS = {"inpatient": 9201, "outpatient": 9202, "emergency": 9203, "emergency_inpatient": 262}


# OMOP CDM v5.4 concept_id is an INTEGER: 1 to 2^31 - 1 (0 is "no matching concept", which selects nothing
# meaningful). Larger numbers cannot be bound as query parameters at the sites and would fail there.
MAX_CONCEPT_ID = 2**31 - 1
# A concept list names what to select, not every code: occurrence and condition lists take in the
# descendants of each concept, so even a wide phenotype needs far fewer. The bound keeps a study a file a
# person can review and every site's query a query (a 2-million-id list took a minute just to check).
MAX_CONCEPT_IDS = 10_000
# Each value concept of a categorical covariate is a model input column of its own.
MAX_VALUE_CONCEPTS = 100
# Covariates of one kind: each is one or more model inputs the coordinator sizes the model for.
MAX_COVARIATES = 1_000


def _concept_id(value: int) -> int:
    if not 1 <= value <= MAX_CONCEPT_ID:
        raise ValueError(
            f"{value} is not an OMOP concept id: concept ids are whole numbers from 1 to {MAX_CONCEPT_ID:,} (the "
            "CDM's concept_id is an INTEGER)"
        )
    return value


def _at_most(limit: int, noun: str, why: str):
    """A check of a list's length that runs before its items are validated (so a huge list costs nothing)."""

    def check(value: object) -> object:
        if isinstance(value, list | tuple) and len(value) > limit:
            raise ValueError(f"a study lists at most {limit:,} {noun} here, and this list has {len(value):,}: {why}")
        return value

    return BeforeValidator(check)


ConceptId = Annotated[int, AfterValidator(_concept_id)]
ConceptIds = Annotated[
    list[ConceptId],
    _at_most(
        MAX_CONCEPT_IDS,
        "concept ids",
        "list the ancestor concepts of a large concept set (occurrences and conditions include their descendants)",
    ),
]


class Window(_Strict):
    """A time window relative to the index, in hours; start <= end. Negative hours lie before the index.

    Both ends may be written in days instead (`start_days`, `end_days`: 24 hours each); the study keeps
    them as hours, so `{start_days: -365, end_days: 0}` and `{start_hours: -8760, end_hours: 0}` are the
    same window and the same hash. A window holds both of its ends unless said otherwise where it is used.
    """

    start_hours: float
    end_hours: float

    @model_validator(mode="before")
    @classmethod
    def _days(cls, data: object) -> object:
        if not isinstance(data, dict) or not ({"start_days", "end_days"} & set(data)):
            return data
        data = dict(data)
        for end in ("start", "end"):
            if f"{end}_days" not in data:
                continue
            if f"{end}_hours" in data:
                raise ValueError(f"give the window's {end} as {end}_hours or as {end}_days, not both")
            days = data.pop(f"{end}_days")
            if isinstance(days, bool) or not isinstance(days, int | float):
                raise ValueError(f"{end}_days is a number of days relative to the index, not {days!r}")
            data[f"{end}_hours"] = days * 24
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.end_hours < self.start_hours:
            raise ValueError(f"window ends ({self.end_hours} h) before it starts ({self.start_hours} h)")
        return self


class ValueRange(_Strict):
    """A range of `value_as_number`, both ends included, in the concept's canonical unit (the one the ETL
    converts every value to, as value covariates read them); give `min`, `max` or both."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> ValueRange:
        if self.min is None and self.max is None:
            raise ValueError("a value range needs min, max or both (each end is included)")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"the value range's max ({self.max:g}) is below its min ({self.min:g})")
        return self


class IndexEvent(StrEnum):
    """Where time zero of each example lies.

    A visit start or end makes a visit-level cohort (each example is a visit of the cohort's kinds); every
    other index makes a person-level cohort (each example is a patient at the time of an event).
    """

    VISIT_START = "visit_start"
    VISIT_END = "visit_end"
    CONDITION = "condition"  # a condition_occurrence of the concepts (or a descendant) starts
    DRUG = "drug"  # a drug_exposure starts
    PROCEDURE = "procedure"
    MEASUREMENT = "measurement"  # optionally with its value in a range
    PANEL = "panel"  # the first moment (00:00) of a day on which every measurement of a panel was taken
    DATE = "date"  # a calendar date (00:00): everyone in observation on that date


VISIT_INDEXES = (IndexEvent.VISIT_START, IndexEvent.VISIT_END)
EVENT_INDEXES = (IndexEvent.CONDITION, IndexEvent.DRUG, IndexEvent.PROCEDURE, IndexEvent.MEASUREMENT)


class Occurrence(StrEnum):
    """Which occurrences of the index event are candidate examples."""

    FIRST = "first"  # the patient's first occurrence in the database (criteria are checked at that one)
    EACH = "each"  # every occurrence; `one_per_person` then picks one of those that meet the criteria


class IndexSpec(_Strict):
    """The index event: a visit (start or end), the first or each occurrence of a condition, drug, procedure,
    measurement or measurement panel, or a calendar date. A plain name (`index: visit_start`) is the event
    alone."""

    event: IndexEvent
    concept_ids: ConceptIds = Field(
        default_factory=list, description="The event's concepts (descendants count); a panel's measurements."
    )
    value: ValueRange | None = Field(None, description="measurement: only values in this range are the event.")
    occurrence: Occurrence = Field(
        Occurrence.FIRST, description="Default: each visit for a visit index (as before), else the first event."
    )
    date: dt.date | None = Field(None, description="event 'date': the calendar date (its 00:00 is the index).")

    @model_validator(mode="before")
    @classmethod
    def _occurrence_default(cls, data: object) -> object:
        visit = isinstance(data, dict) and data.get("event") in [e.value for e in VISIT_INDEXES]
        if visit and "occurrence" not in data:
            return {**data, "occurrence": Occurrence.EACH.value}
        return data

    @model_validator(mode="after")
    def _complete(self) -> IndexSpec:
        event = self.event.value
        if self.event in VISIT_INDEXES and self.concept_ids:
            raise ValueError(
                f"a '{event}' index takes its visits from the cohort's visit_concept_ids: remove index.concept_ids"
            )
        if self.event in (*EVENT_INDEXES, IndexEvent.PANEL) and not self.concept_ids:
            raise ValueError(f"a '{event}' index needs concept_ids (the concepts whose occurrence is the index)")
        if self.event == IndexEvent.PANEL and len(set(self.concept_ids)) < 2:
            raise ValueError(
                "a 'panel' index needs at least two measurement concept_ids (a panel of one is a 'measurement' index)"
            )
        if self.value is not None and self.event != IndexEvent.MEASUREMENT:
            raise ValueError(f"index.value (a range of values) applies to a 'measurement' index, not '{event}'")
        if self.event == IndexEvent.DATE:
            if self.date is None:
                raise ValueError("a 'date' index needs date (e.g. 2024-01-01): everyone in observation on it")
            if self.concept_ids:
                raise ValueError("a 'date' index has no concept_ids: everyone in observation on the date is indexed")
            if self.occurrence != Occurrence.FIRST:
                raise ValueError("a 'date' index happens once per patient: occurrence 'each' does not apply")
        elif self.date is not None:
            raise ValueError(f"index.date applies to a 'date' index, not '{event}'")
        return self

    @property
    def visit_level(self) -> bool:
        return self.event in VISIT_INDEXES


def _index_from_name(value: object) -> object:
    """`index: visit_start` (the form of every study before person-level cohorts) is `{event: visit_start}`."""
    return {"event": str(value)} if isinstance(value, str) else value


CriterionDomain = Literal["condition", "drug", "procedure", "measurement", "observation", "visit"]
MAX_CRITERIA = 100


class Criterion(_Strict):
    """An inclusion or exclusion criterion: at least `min_count` records of the concepts (descendants count,
    except for visits, whose kinds match exactly) in a window around the index; for a measurement or an
    observation optionally only values in a range. Inclusion keeps the examples that have them, exclusion
    removes them."""

    domain: CriterionDomain
    concept_ids: ConceptIds = Field(min_length=1)
    window: Window = Window(start_hours=-365 * 24, end_hours=0)
    min_count: int = Field(1, ge=1, le=10_000, description="How many records in the window the criterion needs.")
    value: ValueRange | None = None

    @model_validator(mode="after")
    def _value_applies(self) -> Criterion:
        if self.value is not None and self.domain not in ("measurement", "observation"):
            raise ValueError(
                f"value (a range of values) applies to a measurement or observation criterion, not '{self.domain}'"
            )
        return self


class ObservationRequirement(_Strict):
    """The index lies in one of the patient's observation periods (observation_period, end date counted in
    full), with at least `prior_days` of that period before the index and `after_days` after it."""

    prior_days: float = Field(0.0, ge=0, le=36_500)
    after_days: float = Field(0.0, ge=0, le=36_500)


class OnePerPerson(StrEnum):
    """Which qualifying example represents a patient: the privacy unit is the patient, so one example each."""

    FIRST = "first"
    LAST = "last"
    RANDOM = "random"  # a keyed hash of the person picks one visit (or index event), stable across rounds


_CRITERIA_LIMIT = _at_most(MAX_CRITERIA, "criteria", "combine concepts into one criterion's concept_ids")


class CohortSpec(_Strict):
    """The target cohort: visit-level (each example a visit of the cohort's kinds, indexed at its start or end)
    or person-level (each example a patient at an event: a condition, drug, procedure, measurement, a
    measurement panel or a calendar date), with an age band, an optional condition, inclusion and exclusion
    criteria in windows around the index, and an observation-period requirement.

    An example whose visit ends, or whose patient dies, before the prediction time is not in the cohort:
    its outcome would already be known when the model is asked.
    """

    visit_concept_ids: ConceptIds = Field(default=[VISIT_CONCEPTS["inpatient"]], min_length=1)
    min_age: int = Field(18, ge=0, le=120)
    max_age: int | None = Field(None, ge=0, le=120)
    condition_concept_ids: ConceptIds = Field(
        default=[], description="If given, the patient must have one of these conditions on or before the index."
    )
    min_visit_hours: float = Field(
        0.0, ge=0, description="Only visits lasting at least this long (e.g. the prediction time) qualify."
    )
    index: Annotated[IndexSpec, BeforeValidator(_index_from_name)] = IndexSpec(
        event=IndexEvent.VISIT_START, occurrence=Occurrence.EACH
    )
    observation_period: ObservationRequirement | None = None
    inclusion: Annotated[list[Criterion], _CRITERIA_LIMIT] = Field(default_factory=list)
    exclusion: Annotated[list[Criterion], _CRITERIA_LIMIT] = Field(default_factory=list)
    one_per_person: OnePerPerson = OnePerPerson.FIRST

    @model_validator(mode="after")
    def _age_band(self) -> CohortSpec:
        if self.max_age is not None and self.max_age < self.min_age:
            raise ValueError(f"max_age {self.max_age} is below min_age {self.min_age}")
        return self

    @model_validator(mode="after")
    def _level_fits(self) -> CohortSpec:
        if self.visit_level:
            return self
        event = self.index.event.value
        if sorted(set(self.visit_concept_ids)) != [VISIT_CONCEPTS["inpatient"]]:
            raise ValueError(
                f"visit_concept_ids choose the visits of a visit-level cohort (index visit_start or visit_end); this "
                f"cohort is person-level (its index is a {event}): remove visit_concept_ids, or require a visit with "
                "an inclusion criterion of domain 'visit'"
            )
        if self.min_visit_hours:
            raise ValueError(
                f"min_visit_hours applies to a visit-level cohort (index visit_start or visit_end); this cohort is "
                f"person-level (its index is a {event})"
            )
        return self

    @property
    def visit_level(self) -> bool:
        """True for a cohort of visits (index visit_start or visit_end), False for a person-level cohort."""
        return self.index.visit_level

    @property
    def level(self) -> str:
        return "visit" if self.visit_level else "person"

    def summary(self) -> str:
        """One line for people (e.g. `twinfed study check`): level, index, age band, criteria, one per person."""
        index = self.index
        ages = f"age {self.min_age}-{self.max_age if self.max_age is not None else 'any'}"
        if self.visit_level:
            kinds = ", ".join(str(c) for c in sorted(set(self.visit_concept_ids)))
            start = f"visit-level: visits {kinds} (index {index.event.value})"
        elif index.event == IndexEvent.DATE:
            start = f"person-level: everyone in observation on {index.date}"
        else:
            concepts = ", ".join(str(c) for c in sorted(set(index.concept_ids)))
            start = f"person-level: index {index.occurrence.value} {index.event.value} {concepts}"
        parts = [start, ages]
        if self.inclusion or self.exclusion:
            parts.append(f"{len(self.inclusion)} inclusion, {len(self.exclusion)} exclusion criteria")
        if self.observation_period is not None:
            needed = self.observation_period
            parts.append(f"observed {needed.prior_days:g} d before, {needed.after_days:g} d after")
        unit = "visit" if self.visit_level else "index event"
        return ", ".join(parts) + f"; {self.one_per_person.value} {unit} per patient"


Statistic = Literal["latest", "mean", "min", "max", "count"]
Demographic = Literal["age", "gender"]
OccurrenceDomain = Literal["condition", "drug", "procedure"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"'{value}' is not a feature name: use lower case letters, digits and '_'")
    return value


class OccurrenceCovariate(_Strict):
    """1 if the patient has any of the concepts (or their descendants, when the vocabulary has them)
    in the window, else 0. One feature per covariate, e.g. 'prior heart failure'."""

    name: str
    domain: OccurrenceDomain
    concept_ids: ConceptIds = Field(min_length=1)
    window: Window = Window(start_hours=-365 * 24, end_hours=0)

    _name = field_validator("name")(_check_name)


class ValueCovariate(_Strict):
    """Summary statistics of a measurement (or numeric observation) in a window: one feature per statistic,
    each with a missing-value indicator."""

    name: str
    concept_ids: ConceptIds = Field(min_length=1)
    domain: Literal["measurement", "observation"] = "measurement"
    window: Window = Window(start_hours=0, end_hours=24)
    statistics: list[Statistic] = Field(default=["latest"], min_length=1, max_length=5)

    @field_validator("statistics")
    @classmethod
    def _distinct_statistics(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each statistic is one feature column: name each at most once")
        return value

    _name = field_validator("name")(_check_name)


class CategoricalCovariate(_Strict):
    """The latest coded value of an observation in the window, one-hot over the listed value concepts
    (anything else and 'not recorded' get their own columns)."""

    name: str
    concept_ids: ConceptIds = Field(min_length=1)
    value_concept_ids: Annotated[
        list[ConceptId],
        _at_most(MAX_VALUE_CONCEPTS, "value concepts", "each one is a model input column; group rare values"),
    ] = Field(min_length=1)
    window: Window = Window(start_hours=-365 * 24, end_hours=24)

    _name = field_validator("name")(_check_name)


class TimeSeriesCovariate(_Strict):
    """Measurements binned on the study's grid over the window (for sequence models): per bin the mean,
    a mask (observed in this bin) and the hours since the last observation."""

    name: str
    concept_ids: ConceptIds = Field(min_length=1)
    window: Window = Window(start_hours=0, end_hours=24)
    bin_hours: float = Field(4.0, gt=0)

    _name = field_validator("name")(_check_name)

    @model_validator(mode="after")
    def _bins(self) -> TimeSeriesCovariate:
        span = self.window.end_hours - self.window.start_hours
        if span <= 0 or abs(span / self.bin_hours - round(span / self.bin_hours)) > 1e-9:
            raise ValueError(f"the window ({span} h) must be a whole, positive number of {self.bin_hours} h bins")
        return self


_COVARIATES_WHY = "each covariate is at least one model input; a model of this many is not a study sites can review"


_COVARIATES_LIMIT = _at_most(MAX_COVARIATES, "covariates", _COVARIATES_WHY)


class CovariateSpec(_Strict):
    demographics: list[Demographic] = Field(default=["age", "gender"], max_length=2)
    occurrences: Annotated[list[OccurrenceCovariate], _COVARIATES_LIMIT] = Field(default_factory=list)
    values: Annotated[list[ValueCovariate], _COVARIATES_LIMIT] = Field(default_factory=list)
    categorical: Annotated[list[CategoricalCovariate], _COVARIATES_LIMIT] = Field(default_factory=list)
    time_series: Annotated[list[TimeSeriesCovariate], _COVARIATES_LIMIT] = Field(default_factory=list)

    @field_validator("demographics")
    @classmethod
    def _distinct_demographics(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each demographic is a feature of its own: name age and gender at most once each")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> CovariateSpec:
        names = [c.name for group in (self.occurrences, self.values, self.categorical, self.time_series) for c in group]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"covariate names must be unique; repeated: {', '.join(duplicates)}")
        if not names and not self.demographics:
            raise ValueError("a study needs at least one covariate")
        return self


class OutcomeKind(StrEnum):
    DEATH = "death"
    CONDITION = "condition"
    LONG_STAY = "long_stay"
    READMISSION = "readmission"
    TIME_TO_EVENT = "time_to_event"
    PROCEDURE = "procedure"
    DRUG = "drug"
    VISIT = "visit"
    MEASUREMENT = "measurement"
    DISCHARGE = "discharge"  # only as a time_to_event outcome's event: the end of the index visit


# Outcomes that are a record of concepts in a window (a measurement: with its value in a range).
EVENT_OUTCOMES = (
    OutcomeKind.CONDITION,
    OutcomeKind.PROCEDURE,
    OutcomeKind.DRUG,
    OutcomeKind.VISIT,
    OutcomeKind.MEASUREMENT,
)
# Outcomes about the index visit itself: only a visit-level cohort has one (discharge as a time_to_event's event).
VISIT_OUTCOMES = (OutcomeKind.LONG_STAY, OutcomeKind.READMISSION, OutcomeKind.DISCHARGE)
# What a time_to_event outcome may wait for.
TIME_TO_EVENT_EVENTS = (OutcomeKind.DEATH, OutcomeKind.DISCHARGE, *EVENT_OUTCOMES)


class OutcomeTiming(StrEnum):
    """Prognostic: the outcome is what happens after the prediction time. Diagnostic: what is recorded in a
    window around the index (`window`), which may overlap the covariates' windows."""

    PROGNOSTIC = "prognostic"
    DIAGNOSTIC = "diagnostic"


class OutcomeSpec(_Strict):
    """What is predicted, measured from the prediction time (index + `prediction_hours`).

    * death: death within `window_days` after the prediction time (or during the visit if window_days is None);
    * condition, procedure, drug, visit: one of `concept_ids` (a visit: of those kinds) recorded within
      `window_days` after the prediction time;
    * measurement: one of `concept_ids` with its value in `value` (the threshold crossed) within the window;
    * long_stay: the visit lasts longer than `threshold_days` (visit-level cohorts);
    * readmission: a new visit of the cohort's kind starts within `window_days` after discharge (visit-level);
    * time_to_event: days from the prediction time to `event` (death, or the first of one of the event kinds
      above), censored at the end of observation, at `window_days`, and (for an event other than death) at
      death, which ends the follow-up as censoring. `event: discharge` is the length of stay (visit-level):
      days from the prediction time to the end of the index visit, however it ends (home, transfer, death: the
      bed is free), censored at `window_days` and, for a visit still running when the data end, there.

    With `timing: diagnostic` (condition, procedure, drug, visit, measurement) the outcome is what is
    recorded in `window` relative to the index, [start, end): it may overlap the covariates (a diagnosis
    recorded the day of the tests); `prediction_hours` then defaults to 0.
    """

    kind: OutcomeKind
    prediction_hours: float = Field(24.0, ge=0, description="Features stop here; the outcome is counted after it.")
    window_days: float | None = Field(None, gt=0)
    threshold_days: float | None = Field(None, gt=0)
    concept_ids: ConceptIds = Field(default_factory=list)
    value: ValueRange | None = Field(None, description="measurement: the range a value must be in to count.")
    event: OutcomeKind | None = Field(None, description="time_to_event: the event (default death).")
    timing: OutcomeTiming = OutcomeTiming.PROGNOSTIC
    window: Window | None = Field(None, description="diagnostic: the outcome window relative to the index.")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        if data.get("kind") == OutcomeKind.TIME_TO_EVENT.value and data.get("event") is None:
            data = {**data, "event": OutcomeKind.DEATH.value}
        if data.get("timing") == OutcomeTiming.DIAGNOSTIC.value and "prediction_hours" not in data:
            data = {**data, "prediction_hours": 0.0}
        return data

    @property
    def event_kind(self) -> OutcomeKind:
        """What is looked for: the kind itself, or a time_to_event outcome's event."""
        if self.kind == OutcomeKind.TIME_TO_EVENT:
            return self.event or OutcomeKind.DEATH
        return self.kind

    @property
    def diagnostic(self) -> bool:
        return self.timing == OutcomeTiming.DIAGNOSTIC

    def summary(self) -> str:
        """One line for people (e.g. `twinfed study check`)."""
        kind = self.kind.value if self.kind != OutcomeKind.TIME_TO_EVENT else f"time to {self.event_kind.value}"
        if self.diagnostic and self.window is not None:
            return f"{kind} (diagnostic) from {self.window.start_hours:g} h to {self.window.end_hours:g} h of the index"
        window = f", within {self.window_days:g} days" if self.window_days else ""
        return f"{kind} after {self.prediction_hours:g} h{window}"

    @model_validator(mode="after")
    def _complete(self) -> OutcomeSpec:
        kind, looked_for = self.kind.value, self.event_kind
        if self.kind == OutcomeKind.DISCHARGE:
            raise ValueError(
                "'discharge' is the event of a time_to_event outcome (the length of stay: kind time_to_event, event "
                "discharge); as a yes/no outcome use long_stay with threshold_days"
            )
        if self.kind == OutcomeKind.TIME_TO_EVENT and looked_for not in TIME_TO_EVENT_EVENTS:
            raise ValueError(
                f"a 'time_to_event' outcome's event is death, discharge, condition, procedure, drug, visit or "
                f"measurement, not '{looked_for.value}'"
            )
        if self.kind != OutcomeKind.TIME_TO_EVENT and self.event is not None:
            raise ValueError(f"event names the event of a 'time_to_event' outcome; a '{kind}' outcome has none")
        if looked_for in EVENT_OUTCOMES and not self.concept_ids:
            raise ValueError(f"a '{looked_for.value}' outcome needs concept_ids")
        if looked_for == OutcomeKind.MEASUREMENT and self.value is None:
            raise ValueError(
                "a 'measurement' outcome needs value, the threshold it crosses: {min: x} (at or above x), {max: x} "
                "(at or below x) or both"
            )
        if self.kind == OutcomeKind.LONG_STAY and self.threshold_days is None:
            raise ValueError("a 'long_stay' outcome needs threshold_days")
        if self.diagnostic:
            if self.kind not in EVENT_OUTCOMES:
                raise ValueError(
                    f"a diagnostic outcome is a condition, procedure, drug, visit or measurement recorded in a window "
                    f"around the index, not '{kind}'"
                )
            if self.window is None:
                raise ValueError(
                    "a diagnostic outcome needs window, relative to the index (e.g. {start_hours: 0, end_hours: 24} "
                    "for the day of a day index)"
                )
            if self.window_days is not None:
                raise ValueError(
                    "window_days counts after the prediction time (a prognostic outcome); a diagnostic outcome's "
                    "window is `window`, relative to the index"
                )
        else:
            if self.window is not None:
                raise ValueError(
                    "window is the window of a diagnostic outcome (timing: diagnostic); a prognostic outcome counts "
                    "within window_days after the prediction time"
                )
            if self.kind in (OutcomeKind.READMISSION, *EVENT_OUTCOMES) and self.window_days is None:
                raise ValueError(f"a '{kind}' outcome needs window_days")
        if looked_for not in EVENT_OUTCOMES and self.concept_ids:
            raise ValueError(
                f"concept_ids only apply to a condition, procedure, drug, visit or measurement outcome (or a "
                f"time_to_event outcome of one of those events), not '{kind}'"
            )
        if looked_for != OutcomeKind.MEASUREMENT and self.value is not None:
            raise ValueError(f"value (the threshold crossed) applies to a 'measurement' outcome, not '{kind}'")
        return self


def _cohort_fits_outcome(cohort: CohortSpec, outcome: OutcomeSpec) -> None:
    """Outcomes about the index visit need a visit-level cohort (and a length of stay, one indexed at its start)."""
    event = cohort.index.event.value
    kind = outcome.kind.value if outcome.kind != OutcomeKind.TIME_TO_EVENT else f"time to {outcome.event_kind.value}"
    if cohort.visit_level:
        if outcome.event_kind == OutcomeKind.DISCHARGE and cohort.index.event != IndexEvent.VISIT_START:
            raise ValueError(
                "a length of stay (time to discharge) is counted from the visit's start: the cohort's index is "
                f"{event}, after the discharge; use index visit_start"
            )
        return
    if outcome.kind in VISIT_OUTCOMES or outcome.event_kind == OutcomeKind.DISCHARGE:
        raise ValueError(
            f"outcome '{kind}' is about the index visit, and the cohort is person-level (cohort.index is a {event}, "
            "not a visit): use a visit-level cohort (index visit_start or visit_end) or another outcome"
        )
    if outcome.kind == OutcomeKind.DEATH and outcome.window_days is None:
        raise ValueError(
            "outcome 'death' without window_days counts deaths during the index visit, and the cohort is "
            f"person-level (cohort.index is a {event}, not a visit): give outcome.window_days"
        )


class TrainingSpec(_Strict):
    rounds: int = Field(5, ge=1, le=1000)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(64, ge=1, description="Expected batch size; with Poisson sampling batches vary around it.")
    learning_rate: float = Field(0.05, gt=0, le=10)
    optimizer: Literal["sgd", "adam"] = "sgd"
    proximal_mu: float = Field(0.0, ge=0, description="FedProx proximal term; 0 is plain local training.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Model initialisation and shuffling (0 to 2^32 - 1).")


class PrivacySpec(_Strict):
    """Record-level DP-SGD at each site, where the record is the patient (one example per patient).

    `target_epsilon` is the study's training total at one site over every round; the noise is calibrated
    once for the whole schedule. The evaluation releases have their own budget (`evaluation.epsilon`),
    accounted in the same ledger and composed with training. `target_delta` defaults to 1/(10 n) of each
    site's training-set size n.

    `mode: none` is a non-private study (a baseline under a data-sharing agreement): no noise, no epsilon,
    and only sites whose policy says `allow_non_private: true` take part; everything it releases is
    labelled "not differentially private".
    """

    mode: Literal["dp", "none"] = "dp"
    target_epsilon: float | None = Field(None, gt=0, le=100)
    target_delta: float | None = Field(None, gt=0, lt=1)
    max_grad_norm: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="Per-patient clipping bound C; the noise is proportional to it. Usual values are 0.1 to 10; above "
        "1000 no gradient is clipped and the noise is all there is.",
    )
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _mode_fits(self) -> PrivacySpec:
        if self.mode == "dp" and self.target_epsilon is None:
            raise ValueError(
                "a differentially private study needs target_epsilon (its training budget per site); a study "
                "without DP says 'mode: none', which only sites whose policy allows it will run"
            )
        if self.mode == "none" and (self.target_epsilon is not None or self.target_delta is not None):
            raise ValueError(
                "a non-private study (mode: none) has no epsilon or delta: remove target_epsilon and target_delta, "
                "or use mode: dp"
            )
        return self

    @property
    def private(self) -> bool:
        return self.mode == "dp"


class RandomSplit(_Strict):
    """Each patient falls in one part by a keyed hash of their person id and the site's secret: stable
    across rounds, unknowable outside the site. A validation share of 0 does not cut a validation part."""

    kind: Literal["random"] = "random"
    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.0, ge=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _whole(self) -> RandomSplit:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"the split fractions must add up to 1 (train + validation + test = {total:g})")
        return self

    @property
    def has_validation(self) -> bool:
        return self.validation > 0


class TemporalSplit(_Strict):
    """Temporal validation (TRIPOD type 2b): examples whose index date is before `test_from` train, on or
    after it test. With `validation_from`, the examples from that date up to `test_from` are validation."""

    kind: Literal["temporal"] = "temporal"
    test_from: dt.date
    validation_from: dt.date | None = None

    @model_validator(mode="after")
    def _ordered(self) -> TemporalSplit:
        if self.validation_from is not None and self.validation_from >= self.test_from:
            raise ValueError(
                f"validation_from ({self.validation_from}) must come before test_from ({self.test_from}): the "
                "validation period lies between training and test"
            )
        return self

    @property
    def has_validation(self) -> bool:
        return self.validation_from is not None


SplitSpec = Annotated[RandomSplit | TemporalSplit, Field(discriminator="kind")]

# Fixed risk strata (strata: fixed), as predicted probabilities. Every stratum's count carries its own
# noise, so few strata keep the noise on the pooled figures small; these six suit well-calibrated models
# of uncommon outcomes. Measured against ten strata and against adaptive strata in docs/benchmarks.md.
DEFAULT_SCORE_EDGES = (0.02, 0.05, 0.1, 0.2, 0.5)


class EvaluationSpec(_Strict):
    """How the study is evaluated: the split, the release every site makes, and which model is reported.

    What leaves a site is, by default, a differentially private release: the twin kind's histograms of its
    held-out patients (for a risk score, per outcome class, how many the model scored in each risk stratum),
    with Gaussian noise. The coordinator adds the sites' histograms and computes the pooled metrics (AUROC,
    calibration and the threshold metrics; for survival the C-index, Brier score and calibration at the
    horizon) from the sum. `subgroups` adds the same histograms within each sex and each age band
    (`age_bands`), with `subgroup_budget_share` of the outcome release's budget: performance by subgroup
    (TRIPOD), shown in the model card with each site's own. The
    strata are `adaptive` (cut at the quantiles of a first DP release of the same scores without outcomes,
    which takes `strata_budget_share` of each release's budget) or `fixed` at `score_edges`. `epsilon` is
    each site's budget for all of the study's evaluation releases together. A site whose policy says
    `evaluation_release: exact` sends exact aggregates under its cell-count floor instead.

    A validation part, when the split cuts one, is used: every round's model is scored on it, the round with the
    best pooled validation metric (the kind's: AUROC, C-index) is the study's model, and
    `early_stopping_patience` (if set) ends training after that many rounds without improvement. Without a
    validation part the last round's model is reported.
    """

    split: SplitSpec = RandomSplit()
    threshold: float = Field(0.5, gt=0, lt=1, description="Risk at or above which a patient counts as positive.")
    strata: Literal["adaptive", "fixed"] = "adaptive"
    adaptive_strata: int = Field(6, ge=2, le=20, description="adaptive: strata of about equal size (+ threshold).")
    strata_budget_share: float = Field(
        0.2, gt=0, lt=1, description="adaptive: the share of each release's budget spent on placing the strata."
    )
    score_edges: list[float] = Field(default=list(DEFAULT_SCORE_EDGES), min_length=1, max_length=63)
    epsilon: float = Field(1.0, gt=0, le=20, description="Per site, for all evaluation releases of the study.")
    every_round: bool = Field(False, description="Release test metrics after every round, not only at the end.")
    early_stopping_patience: int | None = Field(None, ge=1)
    subgroups: list[Literal["sex", "age"]] = Field(
        default=["sex", "age"],
        max_length=2,
        description="Subgroups whose performance each release also carries (TRIPOD); [] releases none.",
    )
    age_bands: list[Annotated[int, Field(ge=1, le=120)]] = Field(
        default=[50, 70], min_length=1, max_length=10, description="Ages (years at the index) that start a new band."
    )
    subgroup_budget_share: float = Field(
        0.3, gt=0, lt=1, description="The share of each outcome release's budget spent on the subgroups."
    )

    @model_validator(mode="after")
    def _coherent(self) -> EvaluationSpec:
        edges = self.score_edges
        if any(not 0 < e < 1 for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("score_edges are predicted risks strictly between 0 and 1, in increasing order")
        if not any(math.isclose(e, self.threshold, abs_tol=1e-12) for e in edges):
            raise ValueError(
                f"the threshold {self.threshold:g} must be one of the score_edges (the threshold metrics are read "
                "off the histograms at a stratum boundary): add it to score_edges"
            )
        if len(set(self.subgroups)) != len(self.subgroups):
            raise ValueError("each subgroup grouping (sex, age) is named at most once")
        if any(b <= a for a, b in itertools.pairwise(self.age_bands)):
            raise ValueError("age_bands are the ages that start each band, in increasing order")
        if self.early_stopping_patience is not None and not self.split.has_validation:
            raise ValueError(
                "early_stopping_patience needs a validation part: give the split a validation share (random) or "
                "validation_from (temporal)"
            )
        return self


# Strategies that look at each site's update separately: impossible when only the sum is revealed.
ROBUST_STRATEGIES = ("trimmed_mean", "median")
SECURE_AGGREGATION_MIN_SITES = 3


class FederationSpec(_Strict):
    """How the coordinator runs the rounds (used by the coordinator; sites see and approve it too)."""

    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "trimmed_mean", "median"] = "fedavg"
    min_sites: int = Field(2, ge=1)
    secure_aggregation: bool = False
    round_timeout_seconds: float = Field(600.0, gt=0)

    # Server-side aggregation settings (federation.coordinator.strategies). They are part of the hash because
    # they change the global model as much as the sites' training does.
    # fedadam / fedyogi: the server optimiser of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021).
    server_learning_rate: float = Field(
        0.1, gt=0, le=10, description="fedadam/fedyogi: eta, the server step on the pseudo-gradient."
    )
    server_beta1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi: first-moment (momentum) decay.")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay.")
    server_tau: float = Field(
        1e-3, gt=0, le=1, description="fedadam/fedyogi: floor added to sqrt(v); > 0 so a zero v never divides."
    )
    # trimmed_mean: share of the updates dropped from each end of every coordinate (at least one each end).
    trim_fraction: float = Field(0.2, gt=0, lt=0.5, description="trimmed_mean: fraction cut from each end.")

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> FederationSpec:
        """SecAgg+ gives the coordinator only the weighted sum of the sites' updates, which fixes two things."""
        if not self.secure_aggregation:
            return self
        if self.strategy in ROBUST_STRATEGIES:
            raise ValueError(
                f"strategy '{self.strategy}' needs every site's own update, and secure aggregation reveals only "
                "their sum: use fedavg, fedprox, fedadam or fedyogi with secure aggregation"
            )
        if self.min_sites < SECURE_AGGREGATION_MIN_SITES:
            raise ValueError(
                f"secure aggregation needs at least {SECURE_AGGREGATION_MIN_SITES} sites in every round (SecAgg+ "
                "shares each site's mask key among the others, and with two sites the sum tells each site the "
                f"other's update anyway); set min_sites >= {SECURE_AGGREGATION_MIN_SITES}"
            )
        return self


STUDY_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{1,63}$"  # what a study id may be (ids of derived studies too)


class StudyInfo(_Strict):
    """Who runs the study and what its model is for: the model card's first lines (TRIPOD asks for the
    intended use and the limitations the developers know of)."""

    id: str = Field(pattern=STUDY_ID_PATTERN)
    title: str = Field(min_length=1)
    description: str = ""
    sponsor: str = ""
    intended_use: str = Field("", description="Who would use the model, for which patients and which decision.")
    limitations: str = Field("", description="What the model is not for, known weaknesses of its data.")


class StudySpec(_Strict):
    """A whole study file."""

    study: StudyInfo
    cohort: CohortSpec = CohortSpec()
    covariates: CovariateSpec
    outcome: OutcomeSpec
    model: ModelSpec = LogisticRegressionSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec
    evaluation: EvaluationSpec = EvaluationSpec()
    federation: FederationSpec = FederationSpec()

    @model_validator(mode="after")
    def _coherent(self) -> StudySpec:
        self._model_fits_outcome()
        features_end = max(
            [c.window.end_hours for c in self.covariates.values]
            + [c.window.end_hours for c in self.covariates.occurrences]
            + [c.window.end_hours for c in self.covariates.categorical]
            + [c.window.end_hours for c in self.covariates.time_series]
            + [0.0]
        )
        outcome = self.outcome
        if outcome.diagnostic and outcome.window is not None:
            # A diagnostic study's covariates may overlap the outcome's window (the tests of the day the
            # diagnosis is recorded), but not reach beyond it: that would be the follow-up, not the diagnosis.
            if features_end > outcome.window.end_hours:
                raise ValueError(
                    f"a covariate window ends {features_end:g} h after the index, after the diagnostic outcome's "
                    f"window ends ({outcome.window.end_hours:g} h): the model would see data from after the time "
                    "the diagnosis is about"
                )
        elif features_end > outcome.prediction_hours:
            raise ValueError(
                f"a covariate window ends {features_end} h after the index, after the prediction time "
                f"({outcome.prediction_hours} h): the model would see data from after the moment it predicts (a "
                "study whose outcome is recorded at the same time as its covariates says `timing: diagnostic`)"
            )
        _cohort_fits_outcome(self.cohort, outcome)
        return self

    def _model_fits_outcome(self) -> None:
        """The twin kind learns from what the outcome gives: a yes/no label, or a time with censoring."""
        targets, kind = self.model.targets, self.model.kind
        if self.outcome.kind == OutcomeKind.TIME_TO_EVENT and targets != TIME_TO_EVENT:
            raise ValueError(
                f"a 'time_to_event' outcome is censored, and model '{kind}' learns a yes/no label (it would count "
                "every censored patient as having no event): use model kind 'discrete_time_survival'"
            )
        if targets == TIME_TO_EVENT and self.outcome.kind != OutcomeKind.TIME_TO_EVENT:
            raise ValueError(
                f"model '{kind}' learns a time to an event: the outcome must be 'time_to_event', not "
                f"'{self.outcome.kind}'"
            )
        window = self.outcome.window_days
        if targets == TIME_TO_EVENT and window is not None and self.model.interval_days[-1] > window:
            raise ValueError(
                f"the survival grid reaches {self.model.interval_days[-1]:g} days, beyond the outcome's window of "
                f"{window:g} days, after which everyone is censored: end the grid at or before the window"
            )

    def evaluation_releases(self, part: str | None = None) -> int:
        """How many evaluation releases the study plans at each site (of `part`, or of both parts): one
        validation release per round when a validation part is cut, and test releases every round or once."""
        validation = self.training.rounds if self.evaluation.split.has_validation else 0
        test = self.training.rounds if self.evaluation.every_round else 1
        if part == "validation":
            return validation
        if part == "test":
            return test
        return validation + test

    def epsilon_budget(self) -> float | None:
        """The study's whole budget per site (training plus evaluation); None for a non-private study."""
        if not self.privacy.private:
            return None
        return float(self.privacy.target_epsilon) + self.evaluation.epsilon
