"""Generate one synthetic hospital: simulate it, export it as FHIR Bulk Data, write its ground truth."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from synthetic.codes import (
    ADMISSION_DIAGNOSES,
    CHRONIC_CONDITIONS,
    CHRONIC_MEDICATION,
    COMPLICATIONS,
    DRUGS,
    MEASUREMENTS,
    PROCEDURES,
    SITE_UNIT_CONVERSIONS,
    SITE_UNIT_DECIMALS,
    site_unit,
)
from synthetic.config import SiteProfile, SynthConfig
from synthetic.consent import ConsentPlan, plan_consents
from synthetic.counterfactuals import CounterfactualPlan
from synthetic.defects import DefectInjector, RecordContext
from synthetic.fhir_resources import ResourceFactory
from synthetic.ground_truth import (
    ConsentSummary,
    DefectSummary,
    MissingnessTruth,
    OutcomeTruth,
    PatientTruth,
    SiteGroundTruth,
    StayTruth,
    SurvivalTruth,
    realized_c_index,
)
from synthetic.inpatient import (
    COMPLICATION_EVENTS,
    DRUG_EVENTS,
    ITEMS,
    LOCATIONS,
    PROCEDURE_EVENTS,
    StayOutcomes,
)
from synthetic.operations import SiteOperations
from synthetic.physiology import PREDICTION_HOUR
from synthetic.population import Population, generate_population
from synthetic.timeline import (
    READMISSION_WINDOW,
    StayRef,
    Timeline,
    Visit,
    admission_rates,
    build_timeline,
    to_seconds,
)
from synthetic.writer import BulkExportWriter

MONTE_CARLO_REPLICATES = 64
_DOSES_PER_DAY = {
    "insulin_lispro": 4,
    "furosemide": 2,
    "acetaminophen": 4,
    "metoprolol": 2,
    "prednisone": 1,
    "dexamethasone": 1,
    "ceftriaxone": 1,
    "piperacillin": 3,
    "vancomycin": 2,
    "albuterol": 4,
    "aspirin": 1,
    "clopidogrel": 1,
    "heparin": 2,
    "enoxaparin": 1,
    "norepinephrine": 1,
}


@dataclass
class SiteResult:
    """What one site's generation produced (returned to the consortium runner and printed)."""

    site_id: str
    name: str
    export_dir: Path
    ground_truth_file: Path
    patients: int
    stays: int
    lines_by_type: dict[str, int]
    defects: int
    denying_consent: int
    in_hospital_deaths: int
    outcome_auroc: dict[str, float]
    missing_rate: float
    seconds: float


def _groups(stay_column: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorted by stay (stable, so hours stay ascending) and each stay's [start, end) offsets."""
    stays = stay_column.astype(np.int64)
    order = np.argsort(stays, kind="stable")
    bounds = np.searchsorted(stays[order], np.arange(n + 1))
    return order, bounds


class SiteExporter:
    """Turns one simulated site into FHIR resources, record by record."""

    def __init__(
        self,
        profile: SiteProfile,
        config: SynthConfig,
        population: Population,
        timeline: Timeline,
        consents: ConsentPlan,
        writer: BulkExportWriter,
        rng: np.random.Generator,
    ) -> None:
        self.p = profile
        self.config = config
        self.pop = population
        self.tl = timeline
        self.consents = consents
        self.w = writer
        self.rng = rng
        self.f = ResourceFactory(profile, config.seed)
        self.export_time = timeline.export_time
        self.patient_ids = [self.f.new_id("Patient", i) for i in range(population.n)]
        self._counter = 0
        self.stay_truth: list[StayTruth] = []
        self.stay_start: dict[str, float] = {}
        self.encounter_of: dict[tuple[int, int], str] = {}  # (batch, row) -> encounter id, for the counterfactuals
        self._contexts: dict[int, RecordContext] = {}
        self._recorded_conditions: list[set[str]] = [set() for _ in range(population.n)]
        self._height_known = np.zeros(population.n, dtype=bool)
        self._groups = [self._batch_groups(b) for b in timeline.batches]
        self._jitter = [rng.integers(0, 40, b.observations["stay"].size) * 60.0 for b in timeline.batches]

    @staticmethod
    def _batch_groups(batch: StayOutcomes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        n = len(batch.admissions)
        return {
            name: _groups(getattr(batch, name)["stay"], n)
            for name in ("observations", "drugs", "infusions", "procedures", "complications", "locations")
        }

    def _id(self, resource_type: str) -> str:
        self._counter += 1
        return self.f.new_id(resource_type, self._counter)

    def _context(self, patient: int) -> RecordContext:
        context = self._contexts.get(patient)
        if context is None:
            context = self._contexts[patient] = RecordContext(birth_date=self.pop.birth_date[patient])
        return context

    # --- top level -------------------------------------------------------------------------------------

    def export(self, on_progress: Callable[[float], None] | None = None) -> None:
        self.w.write(self.f.organization())
        for location in self.f.locations():
            self.w.write(location)
        encounters: dict[int, list[tuple[float, str, object]]] = {}
        for visit in self.tl.visits:
            encounters.setdefault(visit.patient, []).append((visit.start, "visit", visit))
        for stay in self.tl.stays:
            encounters.setdefault(stay.patient, []).append((stay.start, "stay", stay))
        step = max(1, self.pop.n // 50)
        for patient in range(self.pop.n):
            if on_progress is not None and patient % step == 0:
                on_progress(patient / self.pop.n)
            self._patient(patient)
            for _, kind, item in sorted(encounters.get(patient, []), key=lambda e: e[0]):
                if kind == "visit":
                    self._visit(patient, item)  # type: ignore[arg-type]
                else:
                    self._stay(patient, item)  # type: ignore[arg-type]

    def _patient(self, i: int) -> None:
        pop = self.pop
        death = self.tl.death_time[i]
        resource = self.f.patient(
            self.patient_ids[i],
            f"MRN{100000 + i}",
            bool(pop.female[i]),
            pop.birth_date[i],
            pop.given_name[i],
            pop.family_name[i],
            pop.street[i],
            pop.postal_code[i],
            pop.phone[i],
            pop.race[i],
            bool(pop.hispanic[i]),
            float(death) if math.isfinite(death) else None,
        )
        self.w.write(resource)
        status = self.consents.status[i]
        recorded = float(self.consents.recorded[i])
        if status == "permit":
            self.w.write(
                self.f.consent(self._id("Consent"), self.patient_ids[i], "permit", "active", recorded, recorded, None)
            )
        elif status == "opt_out":
            self.w.write(
                self.f.consent(self._id("Consent"), self.patient_ids[i], "deny", "active", recorded, recorded, None)
            )
        elif status == "withdrawn":
            withdrawn = float(self.consents.withdrawn_at[i])
            self.w.write(
                self.f.consent(
                    self._id("Consent"), self.patient_ids[i], "permit", "inactive", recorded, recorded, withdrawn
                )
            )
            self.w.write(
                self.f.consent(self._id("Consent"), self.patient_ids[i], "deny", "active", withdrawn, withdrawn, None)
            )

    # --- measurements -------------------------------------------------------------------------------------

    def _measurement(self, patient: int, encounter_id: str, key: str, when: float, value: float) -> None:
        if when >= self.export_time:
            return
        unit = site_unit(self.p, key)
        scale, shift = SITE_UNIT_CONVERSIONS.get((key, unit), (1.0, 0.0))
        decimals = MEASUREMENTS[key].decimals if unit == MEASUREMENTS[key].unit else SITE_UNIT_DECIMALS[unit]
        resource = self.f.observation(
            self._id("Observation"),
            self.patient_ids[patient],
            encounter_id,
            key,
            when,
            value * scale + shift,
            unit,
            decimals,
        )
        self.w.write(resource, self._context(patient))

    def _blood_pressure(self, patient: int, encounter_id: str, when: float, sbp: float, dbp: float) -> None:
        if when >= self.export_time:
            return
        self.w.write(
            self.f.blood_pressure(self._id("Observation"), self.patient_ids[patient], encounter_id, when, sbp, dbp),
            self._context(patient),
        )

    def _chronic_conditions(self, patient: int, encounter_id: str, when: float) -> None:
        """Record the chronic conditions known by `when` that this hospital has not recorded yet."""
        for name, flags in self.pop.conditions.items():
            if not flags[patient] or name in self._recorded_conditions[patient]:
                continue
            onset = self.pop.onset[name][patient]
            if onset is None or to_seconds(onset) > when:
                continue
            self._recorded_conditions[patient].add(name)
            self.w.write(
                self.f.condition(
                    self._id("Condition"),
                    self.patient_ids[patient],
                    encounter_id,
                    CHRONIC_CONDITIONS[name],
                    "problem-list-item",
                    onset.isoformat(),
                    when,
                ),
                self._context(patient),
            )
            options = CHRONIC_MEDICATION.get(name)
            if options:
                drug = DRUGS[options[int(self.rng.integers(0, len(options)))]]
                alive = not math.isfinite(self.tl.death_time[patient])
                self.w.write(
                    self.f.medication_request(
                        self._id("MedicationRequest"),
                        self.patient_ids[patient],
                        encounter_id,
                        drug,
                        when + 900,
                        "active" if alive else "stopped",
                        1,
                    ),
                    self._context(patient),
                )

    # --- visits ---------------------------------------------------------------------------------------------

    def _visit(self, patient: int, visit: Visit) -> None:
        encounter_id = self._id("Encounter")
        where = "clinic" if visit.kind == "AMB" else "emergency"
        self.w.write(
            self.f.encounter(
                encounter_id,
                self.patient_ids[patient],
                visit.kind,
                visit.start,
                visit.end,
                location_segments=[(where, visit.start, visit.end)],
            ),
            self._context(patient),
        )
        self._chronic_conditions(patient, encounter_id, visit.start)
        b = {k: v[patient] for k, v in self.pop.baseline.items()}
        rng = self.rng
        t = visit.start + 300
        skip = self.p.missingness.base_rate
        if rng.random() >= skip:
            self._blood_pressure(
                patient, encounter_id, t, b["sbp"] + rng.normal(0, 9), 0.5 * b["sbp"] + 14 + rng.normal(0, 6)
            )
        if rng.random() >= skip:
            self._measurement(
                patient, encounter_id, "heart_rate", t, np.clip(b["heart_rate"] + rng.normal(0, 6), 35, 180)
            )
        if visit.kind == "EMER":
            self._measurement(patient, encounter_id, "resp_rate", t, b["resp_rate"] + abs(rng.normal(1, 1.5)))
            self._measurement(patient, encounter_id, "temperature", t, b["temperature"] + abs(rng.normal(0.2, 0.4)))
            self._measurement(patient, encounter_id, "spo2", t, min(100.0, b["spo2"] + rng.normal(0, 1)))
            return
        self._measurement(patient, encounter_id, "weight", t, b["weight"] + rng.normal(0, 1.0))
        if not self._height_known[patient]:
            self._height_known[patient] = True
            self._measurement(patient, encounter_id, "height", t, b["height"])
            self._measurement(patient, encounter_id, "bmi", t, b["weight"] / (b["height"] / 100) ** 2)
        lab_time = t + 1200
        diabetic = self.pop.conditions["type2_diabetes"][patient]
        ckd = self.pop.conditions["ckd"][patient]
        if diabetic and rng.random() < 0.6:
            self._measurement(patient, encounter_id, "hba1c", lab_time, np.clip(b["hba1c"] + rng.normal(0, 0.3), 4, 15))
        if (diabetic and rng.random() < 0.5) or rng.random() < 0.15:
            self._measurement(
                patient, encounter_id, "glucose", lab_time, max(50.0, b["glucose"] * np.exp(rng.normal(0, 0.1)))
            )
        if (ckd and rng.random() < 0.7) or rng.random() < 0.15:
            self._measurement(
                patient, encounter_id, "creatinine", lab_time, b["creatinine"] * np.exp(rng.normal(0, 0.06))
            )
            self._measurement(patient, encounter_id, "potassium", lab_time, b["potassium"] + rng.normal(0, 0.2))

    # --- inpatient stays --------------------------------------------------------------------------------------

    def _stay(self, patient: int, ref: StayRef) -> None:
        batch = self.tl.batches[ref.batch]
        row = ref.row
        groups = self._groups[ref.batch]
        start = ref.start
        end = ref.end  # None when censored
        censored = end is None
        stay_end = end if end is not None else self.export_time
        reason = batch.admissions.reason[row]
        pid = self.patient_ids[patient]
        ctx = self._context(patient)
        encounter_id = self._id("Encounter")

        segments: list[tuple[str, float, float | None]] = []
        if ref.segments is not None:  # a site with operations: the beds decided the segments (operations.py)
            for where, seg_start, seg_end in ref.segments:
                if seg_start >= self.export_time:
                    break
                segments.append((where, seg_start, None if seg_end is None or seg_end >= self.export_time else seg_end))
        else:
            order, bounds = groups["locations"]
            rows = order[bounds[row] : bounds[row + 1]]
            loc = batch.locations
            for k, r in enumerate(rows):
                seg_start = start + float(loc["hour"][r]) * 3600
                seg_end: float | None = start + float(loc["hour"][rows[k + 1]]) * 3600 if k + 1 < len(rows) else end
                if seg_start >= self.export_time:
                    break
                if seg_end is not None and seg_end >= self.export_time:
                    seg_end = None
                segments.append((LOCATIONS[int(loc["location"][r])], seg_start, seg_end))
        disposition = None if censored else batch.disposition[row]
        self.w.write(
            self.f.encounter(
                encounter_id,
                pid,
                "IMP",
                start,
                end,
                reason=reason,
                disposition=disposition,
                location_segments=segments,
                admit_source="mp" if ref.elective else "emd",
            ),
            ctx,
        )

        self.w.write(
            self.f.condition(
                self._id("Condition"),
                pid,
                encounter_id,
                ADMISSION_DIAGNOSES[reason],
                "encounter-diagnosis",
                self.f.instant(start),
                start + 1800,
                abatement=None if (censored or batch.died[row]) else end,
            ),
            ctx,
        )
        self._chronic_conditions(patient, encounter_id, start + 3600)
        order, bounds = groups["complications"]
        for r in order[bounds[row] : bounds[row + 1]]:
            when = start + float(batch.complications["hour"][r]) * 3600
            if when < self.export_time:
                name = COMPLICATION_EVENTS[int(batch.complications["complication"][r])]
                self.w.write(
                    self.f.condition(
                        self._id("Condition"),
                        pid,
                        encounter_id,
                        COMPLICATIONS[name],
                        "encounter-diagnosis",
                        self.f.instant(when),
                        when + 1800,
                    ),
                    ctx,
                )

        obs = batch.observations
        jitter = self._jitter[ref.batch]
        order, bounds = groups["observations"]
        for r in order[bounds[row] : bounds[row + 1]]:
            item = ITEMS[int(obs["item"][r])]
            when = start + float(obs["hour"][r]) * 3600 + float(jitter[r])
            if when >= stay_end:
                when = stay_end - 60
            if item == "bp":
                self._blood_pressure(patient, encounter_id, when, float(obs["value"][r]), float(obs["value2"][r]))
            else:
                self._measurement(patient, encounter_id, item, when, float(obs["value"][r]))

        self._drugs(patient, ref, encounter_id, batch, groups, stay_end, censored)

        order, bounds = groups["procedures"]
        for r in order[bounds[row] : bounds[row + 1]]:
            when = start + float(batch.procedures["hour"][r]) * 3600 + 900
            if when < min(stay_end, self.export_time):
                name = PROCEDURE_EVENTS[int(batch.procedures["procedure"][r])]
                self.w.write(self.f.procedure(self._id("Procedure"), pid, encounter_id, PROCEDURES[name], when), ctx)

        self._record_stay_truth(patient, ref, encounter_id, batch)

    def _drugs(
        self,
        patient: int,
        ref: StayRef,
        encounter_id: str,
        batch: StayOutcomes,
        groups: dict[str, tuple[np.ndarray, np.ndarray]],
        stay_end: float,
        censored: bool,
    ) -> None:
        pid = self.patient_ids[patient]
        ctx = self._context(patient)
        row, start = ref.row, ref.start
        order, bounds = groups["drugs"]
        rows = order[bounds[row] : bounds[row + 1]]
        requests: dict[str, str] = {}
        doses = batch.drugs
        for r in rows:
            name = DRUG_EVENTS[int(doses["drug"][r])]
            when = start + float(doses["hour"][r]) * 3600 + 600
            if when >= min(stay_end, self.export_time):
                continue
            drug = DRUGS[name]
            if name not in requests:
                requests[name] = self._id("MedicationRequest")
                self.w.write(
                    self.f.medication_request(
                        requests[name],
                        pid,
                        encounter_id,
                        drug,
                        max(start, when - 600),
                        "active" if censored else "completed",
                        _DOSES_PER_DAY[name],
                    ),
                    ctx,
                )
            self.w.write(
                self.f.medication_administration(
                    self._id("MedicationAdministration"),
                    pid,
                    encounter_id,
                    requests[name],
                    drug,
                    when,
                    float(doses["dose"][r]),
                ),
                ctx,
            )
        order, bounds = groups["infusions"]
        drug = DRUGS["norepinephrine"]
        for r in order[bounds[row] : bounds[row + 1]]:
            begin = start + float(batch.infusions["start"][r]) * 3600 + 600
            finish = start + float(batch.infusions["end"][r]) * 3600
            if begin >= min(stay_end, self.export_time):
                continue
            if "norepinephrine" not in requests:
                requests["norepinephrine"] = self._id("MedicationRequest")
                self.w.write(
                    self.f.medication_request(
                        requests["norepinephrine"],
                        pid,
                        encounter_id,
                        drug,
                        begin - 300,
                        "active" if censored else "completed",
                        1,
                    ),
                    ctx,
                )
            running = finish >= self.export_time or finish <= begin
            self.w.write(
                self.f.medication_administration(
                    self._id("MedicationAdministration"),
                    pid,
                    encounter_id,
                    requests["norepinephrine"],
                    drug,
                    begin,
                    None,
                    until=None if running else finish,
                ),
                ctx,
            )

    def _record_stay_truth(self, patient: int, ref: StayRef, encounter_id: str, batch: StayOutcomes) -> None:
        row = ref.row
        censored = ref.end is None
        alive24 = bool(batch.alive_at_prediction[row])

        def prob(values: np.ndarray) -> float | None:
            value = float(values[row])
            return None if math.isnan(value) else round(value, 6)

        start_tx = float(batch.treatment_start[row])
        self.stay_start[encounter_id] = ref.start
        self.encounter_of[(ref.batch, ref.row)] = encounter_id
        self.stay_truth.append(
            StayTruth(
                encounter_id=encounter_id,
                patient_id=self.patient_ids[patient],
                reason=batch.admissions.reason[row].value,
                admitted=self.f.instant(ref.start),
                is_readmission=ref.is_readmission,
                age=round(float(batch.age[row]), 2),
                frailty=round(float(self.pop.frailty[patient]), 4),
                initial_severity=round(float(batch.initial_severity[row]), 4),
                treatment_start_hours=start_tx if math.isfinite(start_tx) else None,
                censored=censored,
                alive_at_prediction_time=alive24,
                p_in_hospital_death=prob(batch.p_death),
                p_los_over_7_days=prob(batch.p_los_over_7_days),
                p_readmission_30d=None if censored else prob(batch.p_readmission_30d),
                died_in_hospital=None if censored else bool(batch.died[row]),
                length_of_stay_hours=None if censored else self._length_of_stay(ref, batch),
                readmitted_within_30d=ref.readmitted_within_30d,
            )
        )

    @staticmethod
    def _length_of_stay(ref: StayRef, batch: StayOutcomes) -> int:
        """Hours in hospital: the clinical course's, or with operations the encounter's (waits for beds and the
        discharge window included), rounded."""
        if ref.segments is None or ref.end is None:
            return int(batch.end_hour[ref.row])
        return round((ref.end - ref.start) / 3600)


SURVIVAL_HORIZON_DAYS = 90.0  # configs/study-survival-example.yaml's window


def _outcome_truth(
    stays: list[StayTruth], export_time: float, to_secs
) -> tuple[dict[str, OutcomeTruth], dict[str, SurvivalTruth]]:
    at_24 = [s for s in stays if s.alive_at_prediction_time and not s.censored]
    death_p = np.array([s.p_in_hospital_death for s in at_24], dtype=float)
    death_y = np.array([s.died_in_hospital for s in at_24], dtype=bool)
    los_p = np.array([s.p_los_over_7_days for s in at_24], dtype=float)
    los_y = np.array([(s.length_of_stay_hours or 0) > 7 * 24 for s in at_24], dtype=bool)
    readmit = [
        s
        for s in stays
        if not s.censored
        and not s.died_in_hospital
        and s.readmitted_within_30d is not None
        and to_secs(s) + (s.length_of_stay_hours or 0) * 3600 + READMISSION_WINDOW < export_time
    ]
    readmit_p = np.array([s.p_readmission_30d for s in readmit], dtype=float)
    readmit_y = np.array([s.readmitted_within_30d for s in readmit], dtype=bool)
    outcomes = {
        "in_hospital_death": OutcomeTruth.from_arrays(
            f"alive in hospital {PREDICTION_HOUR} h after admission; outcome known at export", death_p, death_y
        ),
        "los_over_7_days": OutcomeTruth.from_arrays(
            f"alive in hospital {PREDICTION_HOUR} h after admission; outcome known at export", los_p, los_y
        ),
        "readmission_30d": OutcomeTruth.from_arrays(
            "discharged alive at least 30 days before the export date; state at discharge", readmit_p, readmit_y
        ),
    }
    return outcomes, {"death_within_90d": _death_within(stays, export_time, to_secs, SURVIVAL_HORIZON_DAYS)}


def _death_within(stays: list[StayTruth], export_time: float, to_secs, horizon_days: float) -> SurvivalTruth:
    """Time to death from 24 h into each patient's first stay alive then (the example survival study's
    examples), censored at the horizon or the export date, ranked by the true in-stay death probability."""
    death_at: dict[str, float] = {}
    for stay in stays:
        if stay.died_in_hospital:
            death_at[stay.patient_id] = to_secs(stay) + (stay.length_of_stay_hours or 0) * 3600.0
    first: dict[str, StayTruth] = {}
    for stay in sorted(stays, key=to_secs):
        if stay.alive_at_prediction_time and stay.p_in_hospital_death is not None:
            first.setdefault(stay.patient_id, stay)
    horizon = horizon_days * 86400.0
    risk, time, event = [], [], []
    for patient, stay in first.items():
        origin = to_secs(stay) + PREDICTION_HOUR * 3600.0
        until = min(horizon, export_time - origin)
        died = death_at.get(patient, np.inf) - origin
        risk.append(stay.p_in_hospital_death)
        event.append(bool(died <= until))
        time.append(min(died, until) / 86400.0)
    return SurvivalTruth(
        information_set=(
            f"first stay per patient alive in hospital {PREDICTION_HOUR} h after admission; time to death from "
            f"then, censored at {horizon_days:g} days or the export date; ranked by the true in-stay death probability"
        ),
        evaluable_stays=len(risk),
        events=int(np.sum(event)),
        horizon_days=horizon_days,
        bayes_optimal_c_index=realized_c_index(np.array(risk), np.array(time), np.array(event)),
    )


ProgressSink = Callable[[str, str, float], None]


def generate_site(
    profile: SiteProfile,
    config: SynthConfig,
    site_index: int,
    out_dir: Path,
    progress: ProgressSink | None = None,
) -> SiteResult:
    """Simulate and export one hospital. Deterministic for (config.seed, site_index).

    `progress(site_id, stage, fraction)` is called as the work advances (fraction of the whole site).
    """
    import time

    began = time.perf_counter()

    def report(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(profile.site_id, stage, fraction)

    report("simulating patients", 0.0)
    operations = SiteOperations.of(profile, config, site_index)
    streams = np.random.SeedSequence([config.seed, site_index, 0x7417F3D]).spawn(5)
    rng_pop, rng_course, rng_mc, rng_export, rng_defects = (np.random.default_rng(s) for s in streams)
    history_start, export_date = config.history_start, config.export_date

    population = generate_population(profile, config.patients_per_site, history_start, rng_pop)
    # The counterfactual sample has its own seed: it must never consume a stream the export depends on.
    counterfactuals = CounterfactualPlan(
        stays=config.counterfactual_stays,
        horizon_hours=config.counterfactual_horizon_hours,
        export_time=to_seconds(export_date),
        seed=np.random.SeedSequence([config.seed, site_index, 0xCF5A3]),
    )
    timeline = build_timeline(
        profile,
        population,
        history_start,
        export_date,
        rng_course,
        rng_mc,
        replicates=MONTE_CARLO_REPLICATES,
        counterfactuals=counterfactuals,
        clock=operations.clock if operations is not None else None,
    )
    if operations is not None:
        report("simulating the beds", 0.25)
        operations.apply(timeline, admission_rates(profile, population))
    consents = plan_consents(
        profile.consent, timeline.first_contact, to_seconds(history_start), timeline.export_time, rng_export
    )
    report("writing FHIR export", 0.3)

    export_dir = out_dir / profile.site_id / "fhir"
    injector = DefectInjector(profile.defects, rng_defects, export_date)
    factory = ResourceFactory(profile, config.seed)
    with BulkExportWriter(export_dir, injector, f"https://{profile.site_id}.hospital.example/fhir") as writer:
        exporter = SiteExporter(profile, config, population, timeline, consents, writer, rng_export)
        exporter.export(lambda done: report("writing FHIR export", 0.3 + 0.65 * done))
        writer.close(factory.instant(timeline.export_time), export_date)

    stays = exporter.stay_truth
    outcomes, survival = _outcome_truth(stays, timeline.export_time, lambda s: exporter.stay_start[s.encounter_id])
    scheduled = np.sum([b.scheduled for b in timeline.batches], axis=0) if timeline.batches else np.zeros(len(ITEMS))
    recorded = np.sum([b.recorded for b in timeline.batches], axis=0) if timeline.batches else np.zeros(len(ITEMS))
    missingness = {
        item: MissingnessTruth(scheduled=int(s), recorded=int(r), missing_rate=round(1 - r / s, 4) if s else 0.0)
        for item, s, r in zip(ITEMS, scheduled, recorded, strict=True)
        if s > 0
    }
    defects = writer.defects
    by_kind: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for d in defects:
        by_kind[d.kind.value] = by_kind.get(d.kind.value, 0) + 1
        by_type[d.resource_type] = by_type.get(d.resource_type, 0) + 1
    records_written = sum(writer.records.values())
    status = consents.status
    patients = [
        PatientTruth(
            patient_id=exporter.patient_ids[i],
            birth_date=population.birth_date[i],
            female=bool(population.female[i]),
            frailty=round(float(population.frailty[i]), 4),
            conditions=sorted(c for c, flags in population.conditions.items() if flags[i]),
            deceased=bool(math.isfinite(timeline.death_time[i])),
            died_in_hospital=bool(timeline.death_in_hospital[i]),
            consent=status[i],
            denies_research_from=(
                factory.instant(consents.recorded[i])
                if status[i] == "opt_out"
                else factory.instant(consents.withdrawn_at[i])
                if status[i] == "withdrawn"
                else None
            ),
        )
        for i in range(population.n)
    ]
    denying = sum(1 for s in status if s in ("opt_out", "withdrawn"))
    operations_truth = None
    if operations is not None:
        report("re-simulating bed scenarios", 0.955)
        operations_truth = operations.ground_truth(exporter.encounter_of)
        # a stay the beds pushed past the export date is not exported: nor is its counterfactual
        counterfactuals.sampled = [s for s in counterfactuals.sampled if (s.batch, s.row) in exporter.encounter_of]
    report("re-simulating counterfactuals", 0.96)

    def identify(batch: int, row: int) -> tuple[str, str]:
        patient = int(timeline.batches[batch].admissions.patient[row])
        return exporter.encounter_of[(batch, row)], exporter.patient_ids[patient]

    truth = SiteGroundTruth(
        site_id=profile.site_id,
        site_name=profile.name,
        seed=config.seed,
        export_date=export_date,
        history_start=history_start,
        prediction_hour=PREDICTION_HOUR,
        profile=profile.model_dump(mode="json", exclude={"operations"} if profile.operations is None else None),
        export_files={f"{t}.ndjson": n for t, n in writer.lines.items()},
        outcomes=outcomes,
        survival=survival,
        missingness=missingness,
        consent=ConsentSummary(
            patients=population.n,
            denying_research=denying,
            denying_rate=round(denying / population.n, 4),
            withdrawn_later=sum(1 for s in status if s == "withdrawn"),
            explicit_permit=sum(1 for s in status if s == "permit"),
        ),
        defects=DefectSummary(
            total=len(defects),
            records_written=records_written,
            rate_per_record=round(len(defects) / max(records_written, 1), 6),
            by_kind=dict(sorted(by_kind.items())),
            by_resource_type=dict(sorted(by_type.items())),
            records=defects,
        ),
        patients=patients,
        stays=stays,
        counterfactual_design=counterfactuals.design(),
        counterfactuals=counterfactuals.counterfactual_stays(identify),
        confounding=counterfactuals.confounding(),
        operations=operations_truth,
    )
    report("writing ground truth", 0.97)
    truth_file = out_dir / "ground-truth" / f"{profile.site_id}.json"
    truth_file.parent.mkdir(parents=True, exist_ok=True)
    truth_file.write_bytes(orjson.dumps(truth.model_dump(mode="json"), option=orjson.OPT_INDENT_2))

    report("done", 1.0)
    total_scheduled = int(scheduled.sum())
    return SiteResult(
        site_id=profile.site_id,
        name=profile.name,
        export_dir=export_dir,
        ground_truth_file=truth_file,
        patients=population.n,
        stays=len(stays),
        lines_by_type=dict(writer.lines),
        defects=len(defects),
        denying_consent=denying,
        in_hospital_deaths=int(sum(1 for s in stays if s.died_in_hospital)),
        outcome_auroc={k: v.bayes_optimal_auroc for k, v in outcomes.items()},
        missing_rate=1 - int(recorded.sum()) / total_scheduled if total_scheduled else 0.0,
        seconds=time.perf_counter() - began,
    )


__all__ = ["ProgressSink", "SiteResult", "generate_site"]
