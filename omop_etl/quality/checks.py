"""The data-quality checks behind `twinfed dq`: DQD check types run as SQL inside the OMOP database.

Every check counts violating rows and a denominator in the database (SQLite or PostgreSQL, through
SQLAlchemy) and compares the percentage with the DataQualityDashboard threshold, so no table is ever
loaded into Python and results read like a DQD run. The field-level checks of one table are answered by
one query (one scan); if that query fails, each check runs alone so one bad column cannot hide the rest.

Status rules follow DQD: a check on a missing or empty table, an unpopulated field or an empty
denominator is "not_applicable"; a check whose SQL fails is "error"; otherwise it fails when the
percentage of violating rows exceeds the threshold, or when any row violates a threshold of 0.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, computed_field
from sqlalchemy import Date, bindparam, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from omop_etl.database import DatabaseUnavailable
from omop_etl.quality import thresholds as th
from omop_etl.schema import CDM_VERSION, field_specs

DQD_VERSION = "2.8.4"
KAHN_CATEGORIES = ("Conformance", "Completeness", "Plausibility")
GENDER_CONCEPTS = {"Male": 8507, "Female": 8532}

# Short human titles of the check types, for the report tables.
CHECK_TITLES = {
    "cdmTable": "Table present",
    "cdmField": "Fields present",
    "isRequired": "Required field filled",
    "isPrimaryKey": "Primary key unique",
    "isForeignKey": "Reference resolves",
    "fkDomain": "Concept in expected domain",
    "isStandardValidConcept": "Standard, valid concept",
    "standardConceptRecordCompleteness": "Mapped to a standard concept",
    "plausibleValueLow": "Value not implausibly low",
    "plausibleValueHigh": "Value not implausibly high",
    "plausibleStartBeforeEnd": "Start on or before end",
    "plausibleAfterBirth": "Event on or after birth",
    "plausibleBeforeDeath": "Event not long after death",
    "withinVisitDates": "Event within its visit",
    "measurePersonCompleteness": "Persons with a record",
    "measureObservationPeriodOverlap": "Observation periods apart",
    "plausibleGender": "Plausible gender",
    "plausibleUnitConceptIds": "Plausible unit",
}

# The main concept field of each clinical table, for the mapping-coverage summary.
COVERAGE_FIELDS = (
    ("visit_occurrence", "visit_concept_id"),
    ("condition_occurrence", "condition_concept_id"),
    ("drug_exposure", "drug_concept_id"),
    ("procedure_occurrence", "procedure_concept_id"),
    ("measurement", "measurement_concept_id"),
    ("observation", "observation_concept_id"),
)


class Status(StrEnum):
    """Outcome of one check (DQD's isError / notApplicable / failed / passed)."""

    PASSED = "passed"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"
    ERROR = "error"


# Failures first, then checks that could not run, then passes; not-applicable last. Within each, the most
# serious first (DQD severity: a fatal problem breaks OHDSI tools, a characterization one needs a look).
STATUS_ORDER = {Status.FAILED: 0, Status.ERROR: 1, Status.PASSED: 2, Status.NOT_APPLICABLE: 3}
SEVERITY_ORDER = {"fatal": 0, "convention": 1, "characterization": 2}


class CheckResult(BaseModel):
    """One evaluated check: what was checked, how many rows violate it, and whether that is acceptable."""

    model_config = ConfigDict(frozen=True)

    check_id: str
    name: str
    check_type: str
    check_level: str
    kahn_context: str
    kahn_category: str
    kahn_subcategory: str | None = None
    severity: str
    table: str
    field: str | None = None
    concept_id: int | None = None
    concept_name: str | None = None
    unit_concept_id: int | None = None
    violated_rows: int | None = None
    denominator_rows: int | None = None
    pct_violated: float | None = None
    threshold: float
    threshold_source: str
    status: Status
    explanation: str

    @property
    def where(self) -> str:
        """table.field, plus the concept (and unit) for concept-level checks."""
        text_ = f"{self.table}.{self.field}" if self.field else self.table
        if self.concept_id is not None:
            text_ += f" [{self.concept_id}" + (f" / unit {self.unit_concept_id}]" if self.unit_concept_id else "]")
        return text_


class CategorySummary(BaseModel):
    """Result counts of one Kahn category."""

    category: str
    passed: int = 0
    failed: int = 0
    not_applicable: int = 0
    error: int = 0


class ConceptCoverage(BaseModel):
    """How many records of a clinical table carry a valid standard concept (a per-site mapping metric)."""

    table: str
    field: str
    rows: int
    concept_zero: int
    non_standard: int
    not_in_vocabulary: int
    pct_standard: float


class DqReport(BaseModel):
    """Everything one `twinfed dq` run found; `model_dump_json()` is the JSON report."""

    database: str
    dialect: str
    cdm_schema: str | None = None
    cdm_version: str = CDM_VERSION
    dqd_version: str = DQD_VERSION
    run_date: dt.date
    started_at: dt.datetime
    duration_s: float
    warnings: list[str] = []
    coverage: list[ConceptCoverage] = []
    results: list[CheckResult]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def counts(self) -> dict[str, int]:
        """Number of results per status."""
        counts = {status.value: 0 for status in Status}
        for result in self.results:
            counts[result.status.value] += 1
        return counts

    @computed_field  # type: ignore[prop-decorator]
    @property
    def summary(self) -> list[CategorySummary]:
        """Passed / failed / not applicable / error per Kahn category."""
        rows = {category: CategorySummary(category=category) for category in KAHN_CATEGORIES}
        for result in self.results:
            row = rows.setdefault(result.kahn_category, CategorySummary(category=result.kahn_category))
            setattr(row, result.status.value, getattr(row, result.status.value) + 1)
        return list(rows.values())

    @property
    def ok(self) -> bool:
        """True when no check failed and none could not run."""
        return not any(r.status in (Status.FAILED, Status.ERROR) for r in self.results)

    def sorted_results(self) -> list[CheckResult]:
        """Failures first, then errors, passes and not-applicable; the most severe first within each."""
        return sorted(
            self.results,
            key=lambda r: (STATUS_ORDER[r.status], SEVERITY_ORDER.get(r.severity, 3), r.kahn_category, r.check_id),
        )

    def result(self, check_id: str) -> CheckResult:
        """The result with this id (e.g. 'isRequired.person.gender_concept_id')."""
        for result in self.results:
            if result.check_id == check_id:
                return result
        raise KeyError(f"no check '{check_id}' in this report")


# ---------------------------------------------------------------------------------------------------------
# Evaluation and wording


def _evaluate(violated: int, denominator: int, threshold: float) -> tuple[Status, float]:
    pct = 100.0 * violated / denominator if denominator else 0.0
    failed = violated > 0 if threshold == 0 else pct > threshold
    return (Status.FAILED if failed else Status.PASSED), pct


def _sentence(violated: int, denominator: int, noun: str, phrase: str, threshold: float, status: Status) -> str:
    pct = 100.0 * violated / denominator if denominator else 0.0
    if status is Status.FAILED:
        tail = f": {pct:.2f}%, above the {threshold:g}% threshold"
    elif violated:
        tail = f": {pct:.2f}%, within the {threshold:g}% threshold"
    else:
        tail = f" (threshold {threshold:g}%)"
    return f"{violated} of {denominator} {noun} {phrase}{tail}."


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None)
    message = str(original if original is not None else exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


@dataclass
class _Probe:
    """A field-level check on one table, written as SQL conditions on the table alias `t`.

    `violation` and `scope` are boolean SQL; bind parameters are written `:@name` and made unique when the
    probes of a table are batched. The denominator is the rows in `scope` (all rows when None).
    """

    check_type: str
    table: str
    field: str
    violation: str
    phrase: str
    threshold: float
    source: str
    scope: str | None = None
    noun: str = ""
    params: dict[str, object] = field(default_factory=dict)
    date_params: frozenset[str] = frozenset()
    columns: tuple[str, ...] = ()  # columns of `table` the SQL reads
    needs: tuple[str, ...] = ()  # other tables the SQL reads
    populated: str | None = None  # not applicable when this column holds no value
    empty_scope: str = ""  # not-applicable reason when the scope selects no row

    def __post_init__(self) -> None:
        self.noun = self.noun or f"rows in {self.table}"


class _QueryFailed(RuntimeError):
    pass


class _Run:
    """One run of all checks over one connection."""

    def __init__(self, connection: Connection, schema: str | None, today: dt.date) -> None:
        self.conn = connection
        self.dialect = connection.dialect.name
        self.schema = schema
        self.today = today
        self.results: list[CheckResult] = []
        self.warnings: list[str] = []
        self._quote_schema = connection.dialect.identifier_preparer.quote_schema
        inspector = inspect(connection)
        present = {name.lower() for name in inspector.get_table_names(schema=schema)}
        self.columns: dict[str, set[str]] = {
            table: {column["name"].lower() for column in inspector.get_columns(table, schema=schema)}
            for table in (*th.CHECKED_TABLES, "concept")
            if table in present
        }
        self.has_rows = {table: self._has_rows(table) for table in self.columns}
        if not any(table in self.columns for table in th.CHECKED_TABLES):
            where = f"schema '{schema}'" if schema else "the default schema"
            self.warnings.append(
                f"No OMOP CDM table was found in {where}. Check --db and --schema (PostgreSQL sites often use "
                "a schema such as 'cdm')."
            )
        elif not self.has_rows.get("concept"):
            self.warnings.append(
                "The CONCEPT table is missing or empty, so the concept checks (references to CONCEPT, domains, "
                "standard concepts, gender and units) were not run. Load the vocabulary first."
            )
        if self.dialect == "sqlite" and self.has_rows.get("observation_period"):
            stored = self.conn.execute(
                text(f"SELECT typeof(observation_period_start_date) FROM {self.q('observation_period')} LIMIT 1")
            ).scalar()
            if stored != "text":
                self.warnings.append(
                    f"Dates in this SQLite database are stored as {stored} values, not ISO-8601 text (twinfed and "
                    "the OHDSI DDL write text); the date checks compare text dates, so their results are unreliable."
                )

    # -- SQL helpers ----------------------------------------------------------------------------------------

    def q(self, table: str) -> str:
        """The schema-qualified table name for SQL."""
        return f"{self._quote_schema(self.schema)}.{table}" if self.schema else table

    def add_days(self, expr: str, days: int) -> str:
        """A date expression shifted by whole days (dates are ISO text on SQLite)."""
        if self.dialect == "sqlite":
            return f"date({expr}, '{days:+d} days')"
        return f"(CAST({expr} AS DATE) + {days})"

    def ymd(self, expr: str) -> str:
        """A date as the integer YYYYMMDD, so dates compare the same way on every database."""
        if self.dialect == "sqlite":
            return f"CAST(strftime('%Y%m%d', {expr}) AS INTEGER)"
        return f"CAST(to_char({expr}, 'YYYYMMDD') AS INTEGER)"

    def _has_rows(self, table: str) -> bool:
        return self.conn.execute(text(f"SELECT 1 FROM {self.q(table)} LIMIT 1")).first() is not None

    def _fetch(self, sql: str, params: dict[str, object], date_params: Iterable[str] = (), expanding=()) -> list:
        statement = text(sql)
        binds = [bindparam(name, type_=Date()) for name in date_params]
        binds += [bindparam(name, expanding=True) for name in expanding]
        if binds:
            statement = statement.bindparams(*binds)
        try:
            return list(self.conn.execute(statement, params))
        except SQLAlchemyError as exc:
            self.conn.rollback()  # PostgreSQL refuses further statements in a failed transaction
            raise _QueryFailed(_first_line(exc)) from exc

    # -- results --------------------------------------------------------------------------------------------

    def add(
        self,
        check_type: str,
        table: str,
        field_: str | None,
        *,
        status: Status,
        explanation: str,
        threshold: float,
        source: str,
        violated: int | None = None,
        denominator: int | None = None,
        pct: float | None = None,
        concept_id: int | None = None,
        concept_name: str | None = None,
        unit_concept_id: int | None = None,
        level: str | None = None,
    ) -> CheckResult:
        kind = th.check_types()[check_type]
        parts = [check_type, table] + ([field_] if field_ else [])
        parts += [str(concept_id)] if concept_id is not None else []
        parts += [str(unit_concept_id)] if unit_concept_id is not None else []
        result = CheckResult(
            check_id=".".join(parts),
            name=CHECK_TITLES.get(check_type, check_type),
            check_type=check_type,
            check_level=level or kind.level,
            kahn_context=kind.context,
            kahn_category=kind.category,
            kahn_subcategory=kind.subcategory,
            severity=kind.severity,
            table=table,
            field=field_,
            concept_id=concept_id,
            concept_name=concept_name,
            unit_concept_id=unit_concept_id,
            violated_rows=violated,
            denominator_rows=denominator,
            pct_violated=None if pct is None else round(pct, 4),
            threshold=threshold,
            threshold_source=source,
            status=status,
            explanation=explanation,
        )
        self.results.append(result)
        return result

    def add_counted(
        self,
        check_type: str,
        table: str,
        field_: str | None,
        violated: int,
        denominator: int,
        noun: str,
        phrase: str,
        threshold: float,
        source: str,
        **extra,
    ) -> CheckResult:
        status, pct = _evaluate(violated, denominator, threshold)
        return self.add(
            check_type,
            table,
            field_,
            status=status,
            explanation=_sentence(violated, denominator, noun, phrase, threshold, status),
            threshold=threshold,
            source=source,
            violated=violated,
            denominator=denominator,
            pct=pct,
            **extra,
        )

    def not_applicable(
        self, check_type: str, table: str, field_: str | None, reason: str, threshold: float, source: str, **extra
    ) -> CheckResult:
        return self.add(
            check_type,
            table,
            field_,
            status=Status.NOT_APPLICABLE,
            explanation=f"Not applicable: {reason}.",
            threshold=threshold,
            source=source,
            **extra,
        )

    def error(
        self, check_type: str, table: str, field_: str | None, message: str, threshold: float, source: str, **extra
    ) -> CheckResult:
        return self.add(
            check_type,
            table,
            field_,
            status=Status.ERROR,
            explanation=f"The check could not run: {message}. Compare the tables it reads with the CDM v5.4 DDL.",
            threshold=threshold,
            source=source,
            **extra,
        )

    # -- why a check cannot apply ---------------------------------------------------------------------------

    def table_gap(self, table: str) -> str | None:
        """Why checks on `table` do not apply (missing or empty), or None."""
        if table not in self.columns:
            return f"table {table} is missing"
        if not self.has_rows[table]:
            return f"{table} has no rows"
        return None

    def needs_gap(self, tables: Iterable[str]) -> str | None:
        """Why a check that reads `tables` cannot run, or None."""
        for table in tables:
            if table not in self.columns:
                return f"table {table} is missing"
            if table == "concept" and not self.has_rows[table]:
                return "the CONCEPT table is empty (load the vocabulary)"
        return None


# ---------------------------------------------------------------------------------------------------------
# Table and field presence (cdmTable, cdmField)


def _structure_checks(run: _Run) -> None:
    specs: dict[str, list[str]] = defaultdict(list)
    for spec in field_specs():
        specs[spec.table].append(spec.field)
    for table in (*th.CHECKED_TABLES, "concept"):
        present = table in run.columns
        where = f"schema '{run.schema}'" if run.schema else "the database"
        if present:
            explanation = f"Table {table} is present in {where}."
        else:
            explanation = (
                f"Table {table} is missing from {where}; create it with the CDM v5.4 DDL (twinfed does on load)."
            )
        run.add(
            "cdmTable",
            table,
            None,
            status=Status.PASSED if present else Status.FAILED,
            explanation=explanation,
            threshold=0.0,
            source="DQD",
            violated=0 if present else 1,
            denominator=1,
            pct=0.0 if present else 100.0,
        )
        if not present:
            continue
        missing = [name for name in specs[table] if name not in run.columns[table]]
        expected = len(specs[table])
        if missing:
            explanation = (
                f"{len(missing)} of {expected} CDM v5.4 fields are missing from {table}: {', '.join(missing)}; "
                "checks on them were skipped."
            )
        else:
            explanation = f"All {expected} CDM v5.4 fields of {table} are present."
        run.add(
            "cdmField",
            table,
            None,
            status=Status.FAILED if missing else Status.PASSED,
            explanation=explanation,
            threshold=0.0,
            source="DQD",
            violated=len(missing),
            denominator=expected,
            pct=100.0 * len(missing) / expected,
        )


# ---------------------------------------------------------------------------------------------------------
# Field-level probes


def _field_probes(run: _Run, table: str) -> list[_Probe]:
    """All field-level checks of one table, from the CDM spec (structure) and DQD (thresholds, parameters)."""
    probes: list[_Probe] = []
    concept = run.q("concept")
    for spec in (s for s in field_specs() if s.table == table):
        f = spec.field
        if spec.required:
            threshold, source = th.field_threshold(table, f, "isRequired")
            probes.append(
                _Probe(
                    "isRequired",
                    table,
                    f,
                    f"t.{f} IS NULL",
                    f"have no value in {f}, which the CDM requires",
                    threshold,
                    source,
                    columns=(f,),
                )
            )
        if spec.primary_key:
            threshold, source = th.field_threshold(table, f, "isPrimaryKey")
            duplicates = f"SELECT d.{f} FROM {run.q(table)} d GROUP BY d.{f} HAVING COUNT(*) > 1"
            probes.append(
                _Probe(
                    "isPrimaryKey",
                    table,
                    f,
                    f"t.{f} IN ({duplicates})",
                    f"share their {f} with another row",
                    threshold,
                    source,
                    columns=(f,),
                    populated=f,
                )
            )
        target = spec.foreign_key_table.lower()
        if target and (target in th.CHECKED_TABLES or target == "concept"):
            threshold, source = th.field_threshold(table, f, "isForeignKey")
            key = spec.foreign_key_field.lower()
            if target == "concept":
                violation = f"t.{f} <> 0 AND NOT EXISTS (SELECT 1 FROM {concept} c WHERE c.concept_id = t.{f})"
                phrase = f"have a {f} that is neither 0 nor in the CONCEPT table"
            else:
                violation = f"NOT EXISTS (SELECT 1 FROM {run.q(target)} r WHERE r.{key} = t.{f})"
                phrase = f"have a {f} that is not in {target}.{key}"
            probes.append(
                _Probe(
                    "isForeignKey",
                    table,
                    f,
                    f"t.{f} IS NOT NULL AND {violation}",
                    phrase,
                    threshold,
                    source,
                    columns=(f,),
                    needs=(target,),
                    populated=f,
                )
            )
    for rule in (r for r in th.field_rules() if r.table == table):
        probe = _rule_probe(run, rule, concept)
        if probe is not None:
            probes.append(probe)
    return probes


def _rule_probe(run: _Run, rule: th.FieldRule, concept: str) -> _Probe | None:
    """The probe for one DQD field rule (None for the rules handled from the CDM spec instead)."""
    t, f, thr = rule.table, rule.field, rule.threshold
    if rule.check == "fkDomain":
        return _Probe(
            "fkDomain",
            t,
            f,
            f"t.{f} <> 0 AND EXISTS (SELECT 1 FROM {concept} c WHERE c.concept_id = t.{f} AND c.domain_id <> :@domain)",
            f"have a {f} that is neither 0 nor in the {rule.parameter} domain",
            thr,
            "DQD",
            params={"domain": rule.parameter},
            columns=(f,),
            needs=("concept",),
            populated=f,
        )
    if rule.check == "isStandardValidConcept":
        not_standard = "(c.standard_concept IS NULL OR c.standard_concept <> 'S' OR c.invalid_reason IS NOT NULL)"
        return _Probe(
            "isStandardValidConcept",
            t,
            f,
            f"t.{f} <> 0 AND EXISTS (SELECT 1 FROM {concept} c WHERE c.concept_id = t.{f} AND {not_standard})",
            f"have a {f} that is neither 0 nor a valid standard concept",
            thr,
            "DQD",
            columns=(f,),
            needs=("concept",),
            populated=f,
        )
    if rule.check == "standardConceptRecordCompleteness":
        return _Probe(
            "standardConceptRecordCompleteness",
            t,
            f,
            f"t.{f} = 0",
            f"have {f} 0, no standard concept",
            thr,
            "DQD",
            columns=(f,),
            populated=f,
        )
    if rule.check in ("plausibleValueLow", "plausibleValueHigh"):
        bound = th.resolve_bound(rule.parameter, run.today)
        low = rule.check == "plausibleValueLow"
        shown = bound.isoformat() if isinstance(bound, dt.date) else f"{bound:g}"
        return _Probe(
            rule.check,
            t,
            f,
            f"t.{f} {'<' if low else '>'} :@bound",
            f"have {f} {'below' if low else 'above'} {shown}",
            thr,
            "DQD",
            scope=f"t.{f} IS NOT NULL",
            params={"bound": bound},
            date_params=frozenset({"bound"}) if isinstance(bound, dt.date) else frozenset(),
            columns=(f,),
            populated=f,
        )
    if rule.check == "plausibleStartBeforeEnd":
        end = rule.parameter
        return _Probe(
            "plausibleStartBeforeEnd",
            t,
            f,
            f"t.{f} > t.{end}",
            f"have {f} after {end}",
            thr,
            "DQD",
            scope=f"t.{f} IS NOT NULL AND t.{end} IS NOT NULL",
            columns=(f, end),
            populated=end,
            empty_scope=f"no row has both {f} and {end}",
        )
    if rule.check == "plausibleAfterBirth":
        birth = (
            f"COALESCE({run.ymd('p.birth_datetime')}, p.year_of_birth * 10000 + "
            "COALESCE(p.month_of_birth, 1) * 100 + COALESCE(p.day_of_birth, 1))"
        )
        before_birth = f"p.person_id = t.person_id AND {run.ymd(f't.{f}')} < {birth}"
        return _Probe(
            "plausibleAfterBirth",
            t,
            f,
            f"EXISTS (SELECT 1 FROM {run.q('person')} p WHERE {before_birth})",
            f"have {f} before the person's birth date",
            thr,
            "DQD",
            scope=f"t.{f} IS NOT NULL",
            columns=(f, "person_id"),
            needs=("person",),
            populated=f,
        )
    if rule.check == "plausibleBeforeDeath":
        died = f"SELECT 1 FROM {run.q('death')} d WHERE d.person_id = t.person_id"
        grace = th.DEATH_GRACE_DAYS
        return _Probe(
            "plausibleBeforeDeath",
            t,
            f,
            f"EXISTS ({died} AND t.{f} > {run.add_days('d.death_date', grace)})",
            f"have {f} more than {grace} days after the person's death_date",
            thr,
            "DQD",
            scope=f"t.{f} IS NOT NULL AND EXISTS ({died})",
            noun=f"rows of deceased persons in {t}",
            columns=(f, "person_id"),
            needs=("death",),
            empty_scope=f"no {t} row belongs to a person with a death record",
        )
    if rule.check == "withinVisitDates":
        visit = f"SELECT 1 FROM {run.q('visit_occurrence')} v WHERE v.visit_occurrence_id = t.visit_occurrence_id"
        days = th.WITHIN_VISIT_TOLERANCE_DAYS
        outside = (
            f"(t.{f} < {run.add_days('v.visit_start_date', -days)} OR t.{f} > {run.add_days('v.visit_end_date', days)})"
        )
        return _Probe(
            "withinVisitDates",
            t,
            f,
            f"EXISTS ({visit} AND {outside})",
            f"have {f} more than {days} day{'s' if days != 1 else ''} outside their visit's start and end dates",
            thr,
            "DQD",
            scope=f"t.{f} IS NOT NULL AND EXISTS ({visit})",
            noun=f"rows in {t} linked to a visit",
            columns=(f, "visit_occurrence_id"),
            needs=("visit_occurrence",),
            empty_scope=f"no {t} row is linked to a visit_occurrence",
        )
    return None  # isRequired, isPrimaryKey, isForeignKey: built from the CDM spec


def _run_field_checks(run: _Run, table: str) -> None:
    probes = _field_probes(run, table)
    gap = run.table_gap(table)
    ready: list[_Probe] = []
    for probe in probes:
        reason = gap
        if reason is None:
            missing = [c for c in probe.columns if c not in run.columns[table]]
            reason = f"field {', '.join(missing)} is missing from {table}" if missing else run.needs_gap(probe.needs)
        if reason:
            run.not_applicable(probe.check_type, table, probe.field, reason, probe.threshold, probe.source)
        else:
            ready.append(probe)
    if not ready:
        return
    try:
        _evaluate_batch(run, table, ready)
    except _QueryFailed:
        for probe in ready:  # isolate the failing check(s); the others still report
            try:
                _evaluate_batch(run, table, [probe])
            except _QueryFailed as exc:
                run.error(probe.check_type, table, probe.field, str(exc), probe.threshold, probe.source)


def _evaluate_batch(run: _Run, table: str, probes: Sequence[_Probe]) -> None:
    """Answer all probes of a table with one SELECT over the table, then record their results."""
    select = ["COUNT(*) AS n_rows"]
    populated = sorted({p.populated for p in probes if p.populated})
    select += [f"COUNT(t.{column}) AS pop_{j}" for j, column in enumerate(populated)]
    params: dict[str, object] = {}
    date_params: list[str] = []
    for i, probe in enumerate(probes):
        prefix = f"p{i}_"
        violation = probe.violation.replace(":@", f":{prefix}")
        if probe.scope:
            scope = probe.scope.replace(":@", f":{prefix}")
            select.append(f"SUM(CASE WHEN {scope} THEN 1 ELSE 0 END) AS d_{i}")
            select.append(f"SUM(CASE WHEN ({scope}) AND ({violation}) THEN 1 ELSE 0 END) AS v_{i}")
        else:
            select.append(f"SUM(CASE WHEN {violation} THEN 1 ELSE 0 END) AS v_{i}")
        for name, value in probe.params.items():
            params[prefix + name] = value
            if name in probe.date_params:
                date_params.append(prefix + name)
    sql = f"SELECT {', '.join(select)} FROM {run.q(table)} t"
    row = run._fetch(sql, params, date_params)[0]._mapping
    filled = {column: row[f"pop_{j}"] or 0 for j, column in enumerate(populated)}
    for i, probe in enumerate(probes):
        denominator = int(row[f"d_{i}"] or 0) if probe.scope else int(row["n_rows"])
        violated = int(row[f"v_{i}"] or 0)
        if probe.populated and not filled[probe.populated]:
            reason = f"{table}.{probe.populated} holds no value"
        elif denominator == 0:
            reason = probe.empty_scope or f"no row of {table} has a value to check"
        else:
            reason = ""
        if reason:
            run.not_applicable(probe.check_type, table, probe.field, reason, probe.threshold, probe.source)
        else:
            run.add_counted(
                probe.check_type,
                table,
                probe.field,
                violated,
                denominator,
                probe.noun,
                probe.phrase,
                probe.threshold,
                probe.source,
            )


# ---------------------------------------------------------------------------------------------------------
# Table-level checks


def _table_checks(run: _Run) -> None:
    for rule in th.table_rules():
        try:
            if rule.check == "measurePersonCompleteness":
                _person_completeness(run, rule)
            elif rule.check == "measureObservationPeriodOverlap":
                _observation_period_overlap(run, rule)
        except _QueryFailed as exc:
            run.error(rule.check, rule.table, None, str(exc), rule.threshold, "DQD")


def _person_completeness(run: _Run, rule: th.TableRule) -> None:
    reason = run.table_gap("person")
    if reason is None and rule.table not in run.columns:
        reason = f"table {rule.table} is missing"
    elif reason is None and not run.has_rows[rule.table] and rule.table not in th.REQUIRED_TABLES:
        reason = f"{rule.table} has no rows (no data of this kind was loaded)"
    if reason:
        run.not_applicable(rule.check, rule.table, None, reason, rule.threshold, "DQD")
        return
    lacking = f"NOT EXISTS (SELECT 1 FROM {run.q(rule.table)} x WHERE x.person_id = p.person_id)"
    row = run._fetch(
        f"SELECT COUNT(*) AS n, SUM(CASE WHEN {lacking} THEN 1 ELSE 0 END) AS v FROM {run.q('person')} p", {}
    )[0]
    run.add_counted(
        rule.check,
        rule.table,
        None,
        int(row.v or 0),
        int(row.n),
        "persons",
        f"have no record in {rule.table}",
        rule.threshold,
        "DQD",
    )


def _observation_period_overlap(run: _Run, rule: th.TableRule) -> None:
    reason = run.table_gap("observation_period")
    if reason:
        run.not_applicable(rule.check, rule.table, None, reason, rule.threshold, "DQD")
        return
    op = run.q("observation_period")
    touching = (
        f"EXISTS (SELECT 1 FROM {op} b WHERE b.person_id = a.person_id "
        "AND b.observation_period_id <> a.observation_period_id "
        f"AND b.observation_period_start_date <= {run.add_days('a.observation_period_end_date', 1)} "
        f"AND b.observation_period_end_date >= {run.add_days('a.observation_period_start_date', -1)})"
    )
    row = run._fetch(
        f"SELECT COUNT(DISTINCT a.person_id) AS n, COUNT(DISTINCT CASE WHEN {touching} THEN a.person_id END) AS v "
        f"FROM {op} a",
        {},
    )[0]
    run.add_counted(
        rule.check,
        rule.table,
        None,
        int(row.v or 0),
        int(row.n),
        "persons with observation periods",
        "have overlapping or back-to-back observation periods",
        rule.threshold,
        "DQD",
    )


# ---------------------------------------------------------------------------------------------------------
# Concept-level checks (gender, units, value ranges)


def _concept_checks(run: _Run) -> None:
    grouped: dict[tuple[str, str, str], list[th.ConceptRule]] = defaultdict(list)
    for rule in th.concept_rules():
        check = "plausibleValue" if rule.check.startswith("plausibleValue") else rule.check
        if rule.table in th.CHECKED_TABLES:
            grouped[(rule.table, rule.field, check)].append(rule)
    for (table, field_, check), rules in grouped.items():
        columns = {
            "plausibleGender": (field_, "person_id"),
            "plausibleUnitConceptIds": (field_, "unit_concept_id", "value_as_number"),
            "plausibleValue": (field_, "unit_concept_id", "value_as_number"),
        }[check]
        needs = ("concept", "person") if check == "plausibleGender" else ("concept",)
        reason = run.table_gap(table)
        if reason is None:
            missing = [c for c in columns if c not in run.columns[table]]
            reason = f"field {', '.join(missing)} is missing from {table}" if missing else run.needs_gap(needs)
        try:
            if reason is None:
                reason = {
                    "plausibleGender": _plausible_gender,
                    "plausibleUnitConceptIds": _plausible_units,
                    "plausibleValue": _plausible_values,
                }[check](run, table, field_, rules)
        except _QueryFailed as exc:
            for name in sorted({r.check for r in rules}):
                run.error(name, table, field_, str(exc), rules[0].threshold, rules[0].source, level="CONCEPT")
            continue
        if reason:
            for name in sorted({r.check for r in rules}):
                run.not_applicable(name, table, field_, reason, rules[0].threshold, rules[0].source, level="CONCEPT")


def _absent(rules: Sequence[th.ConceptRule], table: str) -> str:
    return f"none of the {len({r.concept_id for r in rules})} concepts this check covers occurs in {table}"


def _plausible_gender(run: _Run, table: str, field_: str, rules: list[th.ConceptRule]) -> str | None:
    person = run.q("person")
    mismatch = {
        gender: f"SUM(CASE WHEN EXISTS (SELECT 1 FROM {person} p WHERE p.person_id = t.person_id "
        f"AND p.gender_concept_id <> {concept_id}) THEN 1 ELSE 0 END)"
        for gender, concept_id in GENDER_CONCEPTS.items()
    }
    rows = run._fetch(
        f"SELECT t.{field_} AS concept_id, COUNT(*) AS n, {mismatch['Male']} AS not_male, "
        f"{mismatch['Female']} AS not_female FROM {run.q(table)} t WHERE t.{field_} IN :ids GROUP BY t.{field_}",
        {"ids": sorted({r.concept_id for r in rules})},
        expanding=("ids",),
    )
    by_concept = {int(row.concept_id): row for row in rows}
    found = False
    for rule in rules:
        row = by_concept.get(rule.concept_id)
        if row is None:
            continue
        found = True
        violated = int((row.not_male if rule.parameter == "Male" else row.not_female) or 0)
        run.add_counted(
            "plausibleGender",
            table,
            field_,
            violated,
            int(row.n),
            f"{table} rows of concept {rule.concept_id} ({rule.concept_name})",
            f"belong to persons whose gender is not {rule.parameter.upper()}",
            rule.threshold,
            rule.source,
            concept_id=rule.concept_id,
            concept_name=rule.concept_name,
            level="CONCEPT",
        )
    return None if found else _absent(rules, table)


def _plausible_units(run: _Run, table: str, field_: str, rules: list[th.ConceptRule]) -> str | None:
    rows = run._fetch(
        f"SELECT t.{field_} AS concept_id, COALESCE(t.unit_concept_id, -1) AS unit, COUNT(*) AS n "
        f"FROM {run.q(table)} t WHERE t.value_as_number IS NOT NULL AND t.{field_} IN :ids "
        f"GROUP BY t.{field_}, COALESCE(t.unit_concept_id, -1)",
        {"ids": sorted({r.concept_id for r in rules})},
        expanding=("ids",),
    )
    units: dict[int, dict[int, int]] = defaultdict(dict)
    for row in rows:
        units[int(row.concept_id)][int(row.unit)] = int(row.n)
    found = False
    for rule in rules:
        if rule.concept_id not in units:
            continue
        found = True
        allowed = th.parse_unit_ids(rule.parameter)
        counts = units[rule.concept_id]
        violated = sum(n for unit, n in counts.items() if unit not in allowed)
        shown = ", ".join("none" if u == -1 else str(u) for u in allowed)
        run.add_counted(
            "plausibleUnitConceptIds",
            table,
            field_,
            violated,
            sum(counts.values()),
            f"{table} values of concept {rule.concept_id} ({rule.concept_name})",
            f"have a unit_concept_id outside {{{shown}}}",
            rule.threshold,
            rule.source,
            concept_id=rule.concept_id,
            concept_name=rule.concept_name,
            level="CONCEPT",
        )
    return None if found else _absent(rules, table)


def _plausible_values(run: _Run, table: str, field_: str, rules: list[th.ConceptRule]) -> str | None:
    rules = [r for r in rules if r.unit_concept_id is not None]
    ids = sorted({r.concept_id for r in rules})
    base = f"FROM {run.q(table)} t WHERE t.value_as_number IS NOT NULL AND t.{field_} IN :ids"
    pairs = run._fetch(
        f"SELECT t.{field_} AS concept_id, t.unit_concept_id AS unit, COUNT(*) AS n {base} "
        f"GROUP BY t.{field_}, t.unit_concept_id",
        {"ids": ids},
        expanding=("ids",),
    )
    present = {(int(row.concept_id), int(row.unit)): int(row.n) for row in pairs if row.unit is not None}
    applicable = [r for r in rules if (r.concept_id, r.unit_concept_id) in present]
    if not applicable:
        return _absent(rules, table) + " with the unit its range is given in"
    params: dict[str, object] = {"ids": ids}
    select = []
    for i, rule in enumerate(applicable):
        sign = "<" if rule.check == "plausibleValueLow" else ">"
        params.update({f"c{i}": rule.concept_id, f"u{i}": rule.unit_concept_id, f"b{i}": float(rule.parameter)})
        select.append(
            f"SUM(CASE WHEN t.{field_} = :c{i} AND t.unit_concept_id = :u{i} AND t.value_as_number {sign} :b{i} "
            f"THEN 1 ELSE 0 END) AS v_{i}"
        )
    row = run._fetch(f"SELECT {', '.join(select)} {base}", params, expanding=("ids",))[0]._mapping
    for i, rule in enumerate(applicable):
        low = rule.check == "plausibleValueLow"
        unit = f"unit {rule.unit_concept_id}" + (f" ({rule.unit_concept_name})" if rule.unit_concept_name else "")
        run.add_counted(
            rule.check,
            table,
            field_,
            int(row[f"v_{i}"] or 0),
            present[(rule.concept_id, rule.unit_concept_id)],
            f"{table} values of concept {rule.concept_id} ({rule.concept_name}) in {unit}",
            f"are {'below' if low else 'above'} {float(rule.parameter):g}",
            rule.threshold,
            rule.source,
            concept_id=rule.concept_id,
            concept_name=rule.concept_name,
            unit_concept_id=rule.unit_concept_id,
            level="CONCEPT",
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# Front door


def _coverage(results: list[CheckResult]) -> list[ConceptCoverage]:
    by_id = {r.check_id: r for r in results}
    coverage = []
    for table, field_ in COVERAGE_FIELDS:
        parts = [
            by_id.get(f"{check}.{table}.{field_}")
            for check in ("standardConceptRecordCompleteness", "isStandardValidConcept", "isForeignKey")
        ]
        if any(p is None or p.status not in (Status.PASSED, Status.FAILED) for p in parts):
            continue
        zero, non_standard, missing = (int(p.violated_rows or 0) for p in parts)  # type: ignore[union-attr]
        rows = int(parts[0].denominator_rows or 0)  # type: ignore[union-attr]
        standard = rows - zero - non_standard - missing
        coverage.append(
            ConceptCoverage(
                table=table,
                field=field_,
                rows=rows,
                concept_zero=zero,
                non_standard=non_standard,
                not_in_vocabulary=missing,
                pct_standard=round(100.0 * standard / rows, 2) if rows else 0.0,
            )
        )
    return coverage


def run_checks(engine: Engine, schema: str | None = None, *, today: dt.date | None = None) -> DqReport:
    """Run every data-quality check on the OMOP CDM in `engine` (optionally in a PostgreSQL `schema`).

    Only reads: counts are computed by the database. Raises DatabaseUnavailable with a sentence saying what
    to check when the database cannot be reached or is not SQLite/PostgreSQL.
    """
    if engine.dialect.name not in ("sqlite", "postgresql"):
        raise DatabaseUnavailable(f"twinfed dq runs on SQLite and PostgreSQL; {engine.dialect.name} is not supported.")
    safe_url = engine.url.render_as_string(hide_password=True)
    today = today or dt.date.today()
    started = dt.datetime.now(dt.UTC)
    began = time.perf_counter()
    try:
        connection = engine.connect()
    except OperationalError as exc:
        raise DatabaseUnavailable(
            f"Cannot connect to {safe_url}: {_first_line(exc)}. Check that the server is running, the host, port "
            "and database name are right, and that this machine may connect (pg_hba.conf, firewall)."
        ) from None
    with connection:
        try:
            run = _Run(connection, schema, today)
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(f"Database {safe_url} answered with an error: {_first_line(exc)}.") from None
        _structure_checks(run)
        for table in th.CHECKED_TABLES:
            _run_field_checks(run, table)
        _table_checks(run)
        _concept_checks(run)
        connection.rollback()  # read-only: end the implicit transaction
    return DqReport(
        database=safe_url,
        dialect=engine.dialect.name,
        cdm_schema=schema,
        run_date=today,
        started_at=started,
        duration_s=round(time.perf_counter() - began, 3),
        warnings=run.warnings,
        coverage=_coverage(run.results),
        results=run.results,
    )
