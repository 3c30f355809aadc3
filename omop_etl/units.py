"""One canonical unit per measurement concept, the conversions into it, and plausible value ranges.

Hospitals report the same lab in different units (glucose in mg/dL in the US, mmol/L in Europe). OMOP
analyses across sites only make sense when each concept has one unit, so the ETL converts every value
to the canonical unit below and keeps the unit as sent in `unit_source_value`. A unit we cannot
convert is loaded as sent (with its own unit concept) and counted in the report, never guessed.

Plausible ranges are physiological limits in the canonical unit: a value outside them is impossible
(a decimal or unit slip), not just abnormal, and the record is quarantined with the range it broke.
"""

from __future__ import annotations

from dataclasses import dataclass

UCUM_SYSTEM = "http://unitsofmeasure.org"

# Unit strings seen in real exports that are not UCUM codes -> the UCUM code they mean.
UNIT_ALIASES: dict[str, str] = {
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    "bpm": "/min",
    "beats/min": "/min",
    "beats/minute": "/min",
    "breaths/min": "/min",
    "/min": "/min",
    "degC": "Cel",
    "°C": "Cel",
    "C": "Cel",
    "degF": "[degF]",
    "°F": "[degF]",
    "F": "[degF]",
    "mEq/L": "mmol/L",
    "meq/L": "mmol/L",
    "U/L": "[U]/L",
    "IU/L": "[U]/L",
    "K/uL": "10*3/uL",
    "10^3/uL": "10*3/uL",
    "x10^9/L": "10*3/uL",
    "10*9/L": "10*3/uL",
    "µmol/L": "umol/L",
    "lbs": "[lb_av]",
    "lb": "[lb_av]",
    "in": "[in_i]",
}


@dataclass(frozen=True)
class CanonicalUnit:
    """The unit a concept is stored in, and how to convert other units into it (value * factor + offset)."""

    unit: str
    conversions: dict[str, tuple[float, float]]
    plausible: tuple[float, float]


_GLUCOSE = CanonicalUnit("mg/dL", {"mmol/L": (18.016, 0.0)}, (10.0, 1500.0))
_TEMPERATURE = CanonicalUnit("Cel", {"[degF]": (5 / 9, -32 * 5 / 9), "K": (1.0, -273.15)}, (25.0, 45.0))

# concept_id -> canonical unit (concepts from the bundled vocabulary; see omop_etl/vocabulary)
CANONICAL: dict[int, CanonicalUnit] = {
    3027018: CanonicalUnit("/min", {"{counts}/min": (1.0, 0.0)}, (10.0, 300.0)),  # heart rate
    3004249: CanonicalUnit("mm[Hg]", {}, (20.0, 300.0)),  # systolic blood pressure
    3012888: CanonicalUnit("mm[Hg]", {}, (10.0, 200.0)),  # diastolic blood pressure
    3027598: CanonicalUnit("mm[Hg]", {}, (10.0, 250.0)),  # mean blood pressure
    3024171: CanonicalUnit("/min", {"{counts}/min": (1.0, 0.0)}, (2.0, 80.0)),  # respiratory rate
    3020891: _TEMPERATURE,  # body temperature
    3006322: _TEMPERATURE,  # oral temperature
    40762499: CanonicalUnit("%", {}, (30.0, 100.0)),  # SpO2 (pulse oximetry)
    3016502: CanonicalUnit("%", {}, (30.0, 100.0)),  # O2 saturation arterial
    3025315: CanonicalUnit("kg", {"[lb_av]": (0.45359237, 0.0), "g": (0.001, 0.0)}, (0.5, 400.0)),  # weight
    3036277: CanonicalUnit("cm", {"[in_i]": (2.54, 0.0), "m": (100.0, 0.0)}, (40.0, 250.0)),  # height
    3038553: CanonicalUnit("kg/m2", {}, (8.0, 90.0)),  # BMI
    3004501: _GLUCOSE,  # glucose serum/plasma
    3000483: _GLUCOSE,  # glucose blood
    3004410: CanonicalUnit("%", {"%{HbA1c}": (1.0, 0.0)}, (2.0, 20.0)),  # HbA1c
    3016723: CanonicalUnit("mg/dL", {"umol/L": (1 / 88.42, 0.0)}, (0.1, 25.0)),  # creatinine
    3013682: CanonicalUnit("mg/dL", {"mmol/L": (2.801, 0.0)}, (1.0, 300.0)),  # urea nitrogen
    3019550: CanonicalUnit("mmol/L", {"10*-3.eq/L": (1.0, 0.0)}, (90.0, 200.0)),  # sodium
    3023103: CanonicalUnit("mmol/L", {"10*-3.eq/L": (1.0, 0.0)}, (1.0, 10.0)),  # potassium
    3014576: CanonicalUnit("mmol/L", {"10*-3.eq/L": (1.0, 0.0)}, (50.0, 150.0)),  # chloride
    3000905: CanonicalUnit("10*3/uL", {"10*9/L": (1.0, 0.0)}, (0.1, 200.0)),  # leukocytes
    3000963: CanonicalUnit("g/dL", {"g/L": (0.1, 0.0), "mmol/L": (1.611, 0.0)}, (2.0, 25.0)),  # hemoglobin
    3024929: CanonicalUnit("10*3/uL", {"10*9/L": (1.0, 0.0)}, (1.0, 2000.0)),  # platelets
    3020460: CanonicalUnit("mg/L", {"mg/dL": (10.0, 0.0)}, (0.0, 1000.0)),  # CRP
    3024561: CanonicalUnit("g/dL", {"g/L": (0.1, 0.0)}, (0.5, 8.0)),  # albumin
    3047181: CanonicalUnit("mmol/L", {"mg/dL": (1 / 9.008, 0.0)}, (0.1, 30.0)),  # lactate blood
    3014111: CanonicalUnit("mmol/L", {"mg/dL": (1 / 9.008, 0.0)}, (0.1, 30.0)),  # lactate serum/plasma
    36306105: CanonicalUnit("ng/L", {"ng/mL": (1000.0, 0.0), "pg/mL": (1.0, 0.0)}, (0.0, 100000.0)),  # hs-TnI
}


def normalise_unit(code: str | None, text: str | None) -> str | None:
    """The UCUM code of a quantity's unit: the coded unit when present, else a known alias of the text."""
    if code:
        return UNIT_ALIASES.get(code, code)
    if text:
        return UNIT_ALIASES.get(text, text)
    return None


def to_canonical(concept_id: int, value: float, unit: str | None) -> tuple[float, str | None, bool]:
    """(value in the concept's canonical unit, that unit, converted?) — unchanged when no rule applies.

    The third element is False when the concept has a canonical unit but `unit` is neither it nor a
    known convertible unit: the caller loads the value as sent and counts it.
    """
    canonical = CANONICAL.get(concept_id)
    if canonical is None or unit == canonical.unit:
        return value, unit, True
    rule = canonical.conversions.get(unit or "")
    if rule is None:
        return value, unit, False
    factor, offset = rule
    return value * factor + offset, canonical.unit, True


def plausible_range(concept_id: int) -> tuple[float, float] | None:
    """Physiological limits of a concept's value in its canonical unit (None when we define none)."""
    canonical = CANONICAL.get(concept_id)
    return canonical.plausible if canonical else None
