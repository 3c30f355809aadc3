"""The clinical codes the synthetic hospitals use, all taken from the bundled vocabulary.

Everything is referenced by OMOP concept id and resolved through the bundled catalogue at import time,
so a code that is not in core_concepts.csv (or the supplementary procedure list) cannot be emitted.
Hospitals differ in which of two equally valid codes they pick (specific vs generic SNOMED, ingredient
vs clinical-drug RxNorm) and in the unit they report a lab in.
"""

from __future__ import annotations

from dataclasses import dataclass

from omop_etl.vocabulary import Concept, bundled_catalog
from synthetic.config import AdmissionReason, SiteProfile

_CATALOG = bundled_catalog()


def concept(concept_id: int) -> Concept:
    """A bundled concept by id (KeyError at import time if a table below names an unknown id)."""
    return _CATALOG.by_id(concept_id)


@dataclass(frozen=True)
class Unit:
    """A UCUM unit as FHIR carries it: the UCUM code and a human-readable display."""

    code: str
    display: str

    @property
    def concept(self) -> Concept:
        found = _CATALOG.by_code("UCUM", self.code)
        if found is None:
            raise KeyError(f"UCUM unit {self.code!r} is not in the bundled vocabulary")
        return found


UNITS = {
    "/min": Unit("/min", "/min"),
    "mm[Hg]": Unit("mm[Hg]", "mmHg"),
    "Cel": Unit("Cel", "Cel"),
    "[degF]": Unit("[degF]", "degF"),
    "%": Unit("%", "%"),
    "kg": Unit("kg", "kg"),
    "cm": Unit("cm", "cm"),
    "kg/m2": Unit("kg/m2", "kg/m2"),
    "mg/dL": Unit("mg/dL", "mg/dL"),
    "mmol/L": Unit("mmol/L", "mmol/L"),
    "umol/L": Unit("umol/L", "umol/L"),
    "g/dL": Unit("g/dL", "g/dL"),
    "g/L": Unit("g/L", "g/L"),
    "10*3/uL": Unit("10*3/uL", "10*3/uL"),
    "mg/L": Unit("mg/L", "mg/L"),
    "ng/L": Unit("ng/L", "ng/L"),
    "mg": Unit("mg", "mg"),
    "[iU]": Unit("[iU]", "IU"),
}


@dataclass(frozen=True)
class MeasurementCode:
    """A vital sign or lab: its LOINC concept, canonical unit, FHIR category and printed precision."""

    key: str
    concept_id: int
    unit: str
    category: str
    decimals: int

    @property
    def concept(self) -> Concept:
        return concept(self.concept_id)


MEASUREMENTS: dict[str, MeasurementCode] = {
    m.key: m
    for m in (
        MeasurementCode("heart_rate", 3027018, "/min", "vital-signs", 0),
        MeasurementCode("sbp", 3004249, "mm[Hg]", "vital-signs", 0),
        MeasurementCode("dbp", 3012888, "mm[Hg]", "vital-signs", 0),
        MeasurementCode("resp_rate", 3024171, "/min", "vital-signs", 0),
        MeasurementCode("temperature", 3020891, "Cel", "vital-signs", 1),
        MeasurementCode("spo2", 40762499, "%", "vital-signs", 0),
        MeasurementCode("weight", 3025315, "kg", "vital-signs", 1),
        MeasurementCode("height", 3036277, "cm", "vital-signs", 0),
        MeasurementCode("bmi", 3038553, "kg/m2", "vital-signs", 1),
        MeasurementCode("glucose", 3004501, "mg/dL", "laboratory", 0),
        MeasurementCode("glucose_poc", 3000483, "mg/dL", "laboratory", 0),
        MeasurementCode("creatinine", 3016723, "mg/dL", "laboratory", 2),
        MeasurementCode("bun", 3013682, "mg/dL", "laboratory", 0),
        MeasurementCode("sodium", 3019550, "mmol/L", "laboratory", 0),
        MeasurementCode("potassium", 3023103, "mmol/L", "laboratory", 1),
        MeasurementCode("wbc", 3000905, "10*3/uL", "laboratory", 1),
        MeasurementCode("hemoglobin", 3000963, "g/dL", "laboratory", 1),
        MeasurementCode("platelets", 3024929, "10*3/uL", "laboratory", 0),
        MeasurementCode("crp", 3020460, "mg/L", "laboratory", 0),
        MeasurementCode("albumin", 3024561, "g/dL", "laboratory", 1),
        MeasurementCode("lactate", 3047181, "mmol/L", "laboratory", 1),
        MeasurementCode("troponin", 36306105, "ng/L", "laboratory", 0),
        MeasurementCode("hba1c", 3004410, "%", "laboratory", 1),
    )
}
BP_PANEL_CONCEPT_ID = 36203185  # LOINC 85354-9, the vital-signs profile's blood-pressure panel

# Conversions from the canonical unit to the unit a site reports in: value_site = a * value + b.
SITE_UNIT_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("glucose", "mmol/L"): (1 / 18.016, 0.0),
    ("glucose_poc", "mmol/L"): (1 / 18.016, 0.0),
    ("creatinine", "umol/L"): (88.42, 0.0),
    ("hemoglobin", "g/L"): (10.0, 0.0),
    ("temperature", "[degF]"): (9 / 5, 32.0),
}
SITE_UNIT_DECIMALS = {"mmol/L": 1, "umol/L": 0, "g/L": 0, "[degF]": 1}


def site_unit(profile: SiteProfile, key: str) -> str:
    """The unit this site reports measurement `key` in."""
    units = profile.units
    if key in ("glucose", "glucose_poc"):
        return units.glucose
    if key == "creatinine":
        return units.creatinine
    if key == "hemoglobin":
        return units.hemoglobin
    if key == "temperature":
        return units.temperature
    return MEASUREMENTS[key].unit


# --- conditions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionCode:
    """A condition with the code a careful coder picks (specific) and the one a hurried coder picks."""

    key: str
    specific_id: int
    generic_id: int

    def for_site(self, profile: SiteProfile) -> Concept:
        return concept(self.specific_id if profile.condition_coding == "specific" else self.generic_id)


CHRONIC_CONDITIONS: dict[str, ConditionCode] = {
    c.key: c
    for c in (
        ConditionCode("hypertension", 320128, 316866),
        ConditionCode("type2_diabetes", 201826, 201820),
        ConditionCode("obesity", 433736, 433736),
        ConditionCode("hyperlipidemia", 432867, 432867),
        ConditionCode("coronary_disease", 317576, 317576),
        ConditionCode("heart_failure", 4229440, 316139),
        ConditionCode("atrial_fibrillation", 313217, 313217),
        ConditionCode("copd", 255573, 255573),
        ConditionCode("asthma", 317009, 317009),
        ConditionCode("ckd", 443597, 46271022),
        ConditionCode("dementia", 4182210, 4182210),
        ConditionCode("anemia", 439777, 439777),
    )
}

ADMISSION_DIAGNOSES: dict[AdmissionReason, ConditionCode] = {
    AdmissionReason.SEPSIS: ConditionCode("sepsis", 132797, 132797),
    AdmissionReason.PNEUMONIA: ConditionCode("pneumonia", 255848, 255848),
    AdmissionReason.COVID19: ConditionCode("covid19", 37311061, 37311061),
    AdmissionReason.HEART_FAILURE: ConditionCode("heart_failure", 4229440, 316139),
    AdmissionReason.ACUTE_MI: ConditionCode("acute_mi", 312327, 4329847),
    AdmissionReason.STROKE: ConditionCode("stroke", 443454, 381316),
    AdmissionReason.ACUTE_KIDNEY_INJURY: ConditionCode("aki", 197320, 197320),
    AdmissionReason.COPD_EXACERBATION: ConditionCode("copd", 255573, 255573),
}

COMPLICATIONS: dict[str, ConditionCode] = {
    "septic_shock": ConditionCode("septic_shock", 196236, 196236),
    "aki": ConditionCode("aki", 197320, 197320),
    "hyperkalemia": ConditionCode("hyperkalemia", 434610, 434610),
}


# --- drugs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrugCode:
    """A drug: its RxNorm ingredient and, where the vocabulary has one, a clinical or branded drug."""

    key: str
    ingredient_id: int | None
    product_id: int | None
    route: str  # v3 RouteOfAdministration display: oral, intravenous, subcutaneous, inhalation
    dose: float
    dose_unit: str

    def for_site(self, profile: SiteProfile) -> Concept:
        """Ingredient-coding sites send the ingredient where one exists; others send the product."""
        prefer_product = profile.drug_coding == "clinical_drug" or self.ingredient_id is None
        chosen = self.product_id if (prefer_product and self.product_id is not None) else self.ingredient_id
        assert chosen is not None, self.key
        return concept(chosen)


DRUGS: dict[str, DrugCode] = {
    d.key: d
    for d in (
        # inpatient: drugs whose effect the physiology model knows
        DrugCode("insulin_lispro", None, 40166274, "subcutaneous", 4, "[iU]"),
        DrugCode("furosemide", 956874, None, "intravenous", 40, "mg"),
        DrugCode("norepinephrine", None, 1321363, "intravenous", 4, "mg"),
        DrugCode("acetaminophen", 1125315, None, "oral", 1000, "mg"),
        DrugCode("metoprolol", 1307046, None, "oral", 25, "mg"),
        DrugCode("dexamethasone", 1518254, None, "intravenous", 6, "mg"),
        DrugCode("prednisone", 1551099, None, "oral", 40, "mg"),
        DrugCode("ceftriaxone", 1777806, None, "intravenous", 2000, "mg"),
        DrugCode("piperacillin", 1746114, None, "intravenous", 4000, "mg"),
        DrugCode("vancomycin", 1707687, None, "intravenous", 1000, "mg"),
        DrugCode("albuterol", 1154343, None, "inhalation", 2.5, "mg"),
        DrugCode("aspirin", 1112807, None, "oral", 81, "mg"),
        DrugCode("clopidogrel", 1322184, None, "oral", 75, "mg"),
        DrugCode("heparin", 1367571, 46275507, "subcutaneous", 5000, "[iU]"),
        DrugCode("enoxaparin", None, 40160973, "subcutaneous", 40, "mg"),
        # outpatient chronic medication
        DrugCode("lisinopril", 1308216, None, "oral", 10, "mg"),
        DrugCode("amlodipine", 1332418, None, "oral", 5, "mg"),
        DrugCode("hydrochlorothiazide", 974166, None, "oral", 25, "mg"),
        DrugCode("metformin", 1503297, 40163924, "oral", 500, "mg"),
        DrugCode("insulin_humulin", None, 19009384, "subcutaneous", 20, "[iU]"),
        DrugCode("empagliflozin", 45774751, None, "oral", 10, "mg"),
        DrugCode("atorvastatin", 1545958, 1545959, "oral", 80, "mg"),
        DrugCode("simvastatin", 1539403, None, "oral", 20, "mg"),
        DrugCode("spironolactone", 970250, None, "oral", 25, "mg"),
        DrugCode("losartan", 1367500, None, "oral", 50, "mg"),
        DrugCode("apixaban", 43013024, None, "oral", 5, "mg"),
        DrugCode("warfarin", 1310149, 40163554, "oral", 5, "mg"),
        DrugCode("furosemide_oral", 956874, 957136, "oral", 40, "mg"),
    )
}

# Chronic condition -> the medication a patient with it takes at home (first match per condition).
CHRONIC_MEDICATION: dict[str, tuple[str, ...]] = {
    "hypertension": ("lisinopril", "amlodipine", "hydrochlorothiazide", "losartan"),
    "type2_diabetes": ("metformin", "empagliflozin", "insulin_humulin"),
    "hyperlipidemia": ("atorvastatin", "simvastatin"),
    "heart_failure": ("furosemide_oral", "spironolactone"),
    "atrial_fibrillation": ("apixaban", "warfarin"),
    "copd": ("albuterol",),
    "asthma": ("albuterol",),
    "coronary_disease": ("aspirin",),
}

# --- procedures -----------------------------------------------------------------------------------

PROCEDURES: dict[str, int] = {
    "chest_xray": 4163872,
    "ecg": 4163951,
    "intubation": 4202832,
    "pci": 4216130,
    "transfusion": 4108705,
    "cardioversion": 4078793,
}

# --- demographics ---------------------------------------------------------------------------------

# US Core race (CDC Race & Ethnicity code system) with the population share used by US sites.
US_CORE_RACE: tuple[tuple[str, str, float], ...] = (
    ("2106-3", "White", 0.70),
    ("2054-5", "Black or African American", 0.16),
    ("2028-9", "Asian", 0.08),
    ("1002-5", "American Indian or Alaska Native", 0.04),
    ("2076-8", "Native Hawaiian or Other Pacific Islander", 0.02),
)
US_CORE_ETHNICITY = {True: ("2135-2", "Hispanic or Latino"), False: ("2186-5", "Not Hispanic or Latino")}
