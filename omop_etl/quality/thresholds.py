"""Check types and thresholds of the data-quality checks, read from the bundled data files.

The numbers come from the OHDSI DataQualityDashboard (DQD v2.8.4) threshold files, so a twinfed site's
results mean the same as a DQD run would: a check fails when the percentage of violating rows exceeds the
threshold, or, for a threshold of 0, when any row violates. The bundled files are extracted from the DQD
CSVs by `build_from_dqd` (run `python -m omop_etl.quality.thresholds DQD_CSV_DIR`), keeping only facts
(ids, names, numbers) and only the tables twinfed checks; see README.md here for provenance.

DQD defines no numeric value ranges for measurements in CDM v5.4, so `twinfed_concept_thresholds.csv`
adds the physiological limits the ETL already quarantines by (`omop_etl.units`), marked source "twinfed".
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from omop_etl.schema import TWIN_TABLES

# The CDM tables twinfed writes and checks (the vocabulary and metadata tables are not checked).
CHECKED_TABLES = tuple(
    t
    for t in TWIN_TABLES
    if t not in ("cdm_source", "concept", "concept_relationship", "vocabulary", "source_to_concept_map")
)

# Tables the CDM requires to hold data (DQD table-level isRequired): an empty one is a failure, not "n/a".
REQUIRED_TABLES = ("person", "observation_period")

# twinfed defaults where DQD has no number (documented in docs/data-quality.md).
DEFAULT_THRESHOLD = 0.0  # DQD evaluates a missing threshold as 0: any violating row fails
WITHIN_VISIT_TOLERANCE_DAYS = 1  # twinfed is stricter than DQD's 7 days: its ETL dates events from the encounter
DEATH_GRACE_DAYS = 60  # DQD: administrative records may follow death by up to 60 days

# Tokens the bundled files use for DQD's SQL expressions in plausibleValueLow/High.
TODAY_PLUS_ONE_DAY = "today+1d"  # DATEADD(dd,1,GETDATE())
CURRENT_YEAR_PLUS_ONE = "year+1"  # YEAR(GETDATE())+1

_PACKAGE = "omop_etl.quality"
CHECK_TYPES_FILE = "dqd_check_types.csv"
TABLE_THRESHOLDS_FILE = "dqd_table_thresholds.csv"
FIELD_THRESHOLDS_FILE = "dqd_field_thresholds.csv"
CONCEPT_THRESHOLDS_FILE = "dqd_concept_thresholds.csv"
TWINFED_CONCEPT_THRESHOLDS_FILE = "twinfed_concept_thresholds.csv"

CONCEPT_COLUMNS = (
    "table",
    "field",
    "concept_id",
    "concept_name",
    "unit_concept_id",
    "unit_concept_name",
    "check",
    "threshold",
    "parameter",
)


@dataclass(frozen=True)
class CheckType:
    """One DQD check type with its place in the Kahn framework."""

    level: str  # TABLE, FIELD or CONCEPT
    name: str
    context: str  # Verification or Validation
    category: str  # Conformance, Completeness or Plausibility
    subcategory: str | None
    severity: str  # fatal, convention or characterization


@dataclass(frozen=True)
class TableRule:
    """A table-level check DQD runs on a table, with its threshold in percent."""

    table: str
    check: str
    threshold: float


@dataclass(frozen=True)
class FieldRule:
    """A field-level check on one field; `parameter` holds the check's argument (a domain, a bound, a field)."""

    table: str
    field: str
    check: str
    threshold: float
    parameter: str


@dataclass(frozen=True)
class ConceptRule:
    """A concept-level check on one concept (and unit, for value ranges)."""

    table: str
    field: str
    concept_id: int
    concept_name: str
    unit_concept_id: int | None
    unit_concept_name: str
    check: str
    threshold: float
    parameter: str
    source: str  # "DQD" or "twinfed"


def _read(name: str) -> list[dict[str, str]]:
    with resources.files(_PACKAGE).joinpath(name).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _threshold(text: str) -> float:
    return float(text) if text.strip() else DEFAULT_THRESHOLD


@lru_cache(maxsize=1)
def check_types() -> dict[str, CheckType]:
    """DQD check types by name (the Kahn context, category, subcategory and severity of each)."""
    return {
        row["check_name"]: CheckType(
            level=row["check_level"],
            name=row["check_name"],
            context=row["kahn_context"],
            category=row["kahn_category"],
            subcategory=row["kahn_subcategory"] or None,
            severity=row["severity"],
        )
        for row in _read(CHECK_TYPES_FILE)
    }


@lru_cache(maxsize=1)
def table_rules() -> tuple[TableRule, ...]:
    """Table-level checks (measurePersonCompleteness, measureObservationPeriodOverlap) with DQD thresholds."""
    return tuple(
        TableRule(table=row["table"], check=row["check"], threshold=_threshold(row["threshold"]))
        for row in _read(TABLE_THRESHOLDS_FILE)
    )


@lru_cache(maxsize=1)
def field_rules() -> tuple[FieldRule, ...]:
    """Field-level checks with DQD thresholds and parameters, in DQD file order."""
    return tuple(
        FieldRule(
            table=row["table"],
            field=row["field"],
            check=row["check"],
            threshold=_threshold(row["threshold"]),
            parameter=row["parameter"],
        )
        for row in _read(FIELD_THRESHOLDS_FILE)
    )


def field_threshold(table: str, field: str, check: str) -> tuple[float, str]:
    """(threshold, source) for a field check: DQD's number where it has one, else twinfed's default."""
    for rule in field_rules():
        if rule.table == table and rule.field == field and rule.check == check:
            return rule.threshold, "DQD"
    return DEFAULT_THRESHOLD, "twinfed"


def _concept_rules_from(name: str, source: str) -> list[ConceptRule]:
    return [
        ConceptRule(
            table=row["table"],
            field=row["field"],
            concept_id=int(row["concept_id"]),
            concept_name=row["concept_name"],
            unit_concept_id=int(row["unit_concept_id"]) if row["unit_concept_id"] else None,
            unit_concept_name=row["unit_concept_name"],
            check=row["check"],
            threshold=_threshold(row["threshold"]),
            parameter=row["parameter"],
            source=source,
        )
        for row in _read(name)
    ]


@lru_cache(maxsize=1)
def concept_rules() -> tuple[ConceptRule, ...]:
    """Concept-level checks: DQD's (gender, units, value ranges) followed by twinfed's measurement ranges."""
    return tuple(
        _concept_rules_from(CONCEPT_THRESHOLDS_FILE, "DQD")
        + _concept_rules_from(TWINFED_CONCEPT_THRESHOLDS_FILE, "twinfed")
    )


def resolve_bound(parameter: str, today: dt.date) -> float | dt.date:
    """A plausibleValueLow/High parameter as a number or date, evaluating the DQD 'now' expressions."""
    if parameter == TODAY_PLUS_ONE_DAY:
        return today + dt.timedelta(days=1)
    if parameter == CURRENT_YEAR_PLUS_ONE:
        return float(today.year + 1)
    if len(parameter) == 10 and parameter[4] == "-":
        return dt.date.fromisoformat(parameter)
    return float(parameter)


def parse_unit_ids(parameter: str) -> tuple[int, ...]:
    """The plausibleUnitConceptIds list (';'-separated in the bundled file; -1 stands for 'no unit')."""
    return tuple(sorted({int(part) for part in parameter.split(";") if part.strip()}))


# ---------------------------------------------------------------------------------------------------------
# Extraction from the DQD CSVs (maintainers only; the package reads the bundled files above).

_FIELD_CHECKS_WITH_THRESHOLD = (
    # (DQD flag column, threshold column, parameter column or None)
    ("isRequired", "isRequiredThreshold", None),
    ("isPrimaryKey", "isPrimaryKeyThreshold", None),
    ("isForeignKey", "isForeignKeyThreshold", "fkTableName"),
    ("isStandardValidConcept", "isStandardValidConceptThreshold", None),
    ("standardConceptRecordCompleteness", "standardConceptRecordCompletenessThreshold", None),
    ("plausibleStartBeforeEnd", "plausibleStartBeforeEndThreshold", "plausibleStartBeforeEndFieldName"),
    ("plausibleAfterBirth", "plausibleAfterBirthThreshold", None),
    ("plausibleBeforeDeath", "plausibleBeforeDeathThreshold", None),
    ("withinVisitDates", "withinVisitDatesThreshold", None),
)
# Date-based checks run on *_date fields only (see README.md); these DQD flags are skipped on datetimes.
_DATE_CHECKS = {"plausibleStartBeforeEnd", "plausibleAfterBirth", "plausibleBeforeDeath", "withinVisitDates"}


def _dqd_bound(text: str) -> str:
    text = text.strip()
    if text == "DATEADD(dd,1,GETDATE())":
        return TODAY_PLUS_ONE_DAY
    if text == "YEAR(GETDATE())+1":
        return CURRENT_YEAR_PLUS_ONE
    if text.startswith("'") and text.endswith("'") and len(text) == 10:
        return dt.datetime.strptime(text.strip("'"), "%Y%m%d").date().isoformat()
    float(text)  # raises on an expression this extractor does not know
    return text


def _write(path: Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


def build_from_dqd(dqd_dir: Path, out_dir: Path) -> dict[str, int]:
    """Extract the bundled threshold files from DQD's v5.4 CSVs; returns rows written per file.

    Only facts are copied (check names, Kahn labels, table/field names, concept ids and names, numbers);
    DQD's descriptions and notes are left out. Field checks are kept for CHECKED_TABLES; datetime fields
    are dropped from the date-based checks because twinfed compares calendar dates.
    """

    def rows(name: str) -> list[dict[str, str]]:
        with (dqd_dir / name).open(encoding="utf-8-sig", newline="") as handle:
            return list(csv.DictReader(handle))

    written: dict[str, int] = {}
    written[CHECK_TYPES_FILE] = _write(
        out_dir / CHECK_TYPES_FILE,
        ("check_level", "check_name", "kahn_context", "kahn_category", "kahn_subcategory", "severity"),
        (
            (r["checkLevel"], r["checkName"], r["kahnContext"], r["kahnCategory"], r["kahnSubcategory"], r["severity"])
            for r in rows("OMOP_CDMv5.4_Check_Descriptions.csv")
        ),
    )

    table_out = []
    for r in rows("OMOP_CDMv5.4_Table_Level.csv"):
        table = r["cdmTableName"].lower()
        if table not in CHECKED_TABLES:
            continue
        for check in ("measurePersonCompleteness", "measureObservationPeriodOverlap"):
            if r[check] == "Yes":
                table_out.append((table, check, r[f"{check}Threshold"]))
    written[TABLE_THRESHOLDS_FILE] = _write(out_dir / TABLE_THRESHOLDS_FILE, ("table", "check", "threshold"), table_out)

    field_out = []
    for r in rows("OMOP_CDMv5.4_Field_Level.csv"):
        table, field = r["cdmTableName"].lower(), r["cdmFieldName"].lower()
        if table not in CHECKED_TABLES:
            continue
        is_datetime = r["cdmDatatype"] == "datetime"
        for flag, threshold_column, parameter_column in _FIELD_CHECKS_WITH_THRESHOLD:
            if r[flag] != "Yes" or (is_datetime and flag in _DATE_CHECKS):
                continue
            parameter = r[parameter_column].lower() if parameter_column else ""
            field_out.append((table, field, flag, r[threshold_column], parameter))
            if flag == "isForeignKey" and r["fkDomain"]:
                field_out.append((table, field, "fkDomain", r["fkDomainThreshold"], r["fkDomain"]))
        for bound in ("plausibleValueLow", "plausibleValueHigh"):
            if r[bound] and not is_datetime:
                field_out.append((table, field, bound, r[f"{bound}Threshold"], _dqd_bound(r[bound])))
    written[FIELD_THRESHOLDS_FILE] = _write(
        out_dir / FIELD_THRESHOLDS_FILE, ("table", "field", "check", "threshold", "parameter"), field_out
    )

    concept_out = []
    for r in rows("OMOP_CDMv5.4_Concept_Level.csv"):
        if not r["conceptId"].strip().isdigit():
            continue  # plausibleGenderUseDescendants rows list several ancestors; twinfed does not run them
        base = (
            r["cdmTableName"].lower(),
            r["cdmFieldName"].lower(),
            r["conceptId"].strip(),
            r["conceptName"],
            r["unitConceptId"],
            r["unitConceptName"],
        )
        for bound in ("plausibleValueLow", "plausibleValueHigh"):
            if r[bound]:
                concept_out.append((*base, bound, r[f"{bound}Threshold"], r[bound]))
        if r["plausibleGender"]:
            concept_out.append((*base, "plausibleGender", r["plausibleGenderThreshold"], r["plausibleGender"]))
        if r["plausibleUnitConceptIds"]:
            units = ";".join(str(u) for u in sorted({int(u) for u in r["plausibleUnitConceptIds"].split(",")}))
            concept_out.append((*base, "plausibleUnitConceptIds", r["plausibleUnitConceptIdsThreshold"], units))
    written[CONCEPT_THRESHOLDS_FILE] = _write(out_dir / CONCEPT_THRESHOLDS_FILE, CONCEPT_COLUMNS, concept_out)
    return written


if __name__ == "__main__":  # pragma: no cover - maintainer tool
    if len(sys.argv) != 2:
        sys.exit("usage: python -m omop_etl.quality.thresholds DQD_CSV_DIR  (e.g. ../shared/omop/dqd)")
    target = Path(__file__).resolve().parent
    for file_name, count in build_from_dqd(Path(sys.argv[1]), target).items():
        print(f"{file_name}: {count} rows")
