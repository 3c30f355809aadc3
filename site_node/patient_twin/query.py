"""The patient twin at its hospital: one patient's state, forecast with calibrated intervals, and what-if.

`PatientTwin.open` loads, once, what every query needs: the study's model (the global model the coordinator
last sent this site, or a model card's final-model.pt) and this site's conformal calibration of the
intervals (from its calibration patients, kept out of training; kept on disk while current, see
site_node.patient_twin.calibration). `answer` then takes one patient, named by the hospital's own Patient
id (or MRN), resolved through the ETL's keyed id map and never shown back in clear, builds that patient's
row as a round would (cohort criteria, consent and withdrawals applied; only their events are read), and
returns their recorded history, the twin's forecast, and the forecast under each scenario: many patients
and scenarios per loaded twin (batch mode: `load` builds all their rows in one pass), each query one
audit entry. It opens neither Opacus nor Flower, nor torch while the site's calibration is current: the
answer comes from a numpy copy of the calibrated weights (federation.twins.trajectory_inference), so a cold
query costs the database driver's import, the cohort selection, and that patient's events. Only the first
query after a new model (or new data) imports torch, to read the weights and compute the calibration.

The twin answers at the patient's latest decision time of the study by default (the prediction time, then
every horizon while in hospital), or at any time `at` of the stay: within a minute of a decision time, that
one; otherwise that patient's rows are built with the history up to that very time. The planned treatments
of the factual forecast are those recorded after that time (none when it is now); a scenario changes them,
nothing else.

Governance: the study must be approved at this site and listed in the policy's `twin_query_studies`;
nothing patient-level leaves the site (the answer is for the clinician at the site).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import Engine, MetaData, Table, select
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from federation.contract import StudySpec, study_hash
from federation.contract.features import feature_names
from federation.contract.twin_specs import INTERVALS, WEIGHT_RANGE, TrajectorySpec
from federation.twins.trajectory_inference import TrajectoryForward, sigmoid
from federation.twins.trajectory_rows import TrajectoryLayout, unscale_signals
from omop_etl.database import open_engine
from omop_etl.identity import SiteKeys, load_or_create_secret
from site_node.cohort import CohortError, StudyDataset
from site_node.cohort.build import build_dataset
from site_node.cohort.cache import cached_dataset, cohort_key
from site_node.cohort.dataset import CALIBRATION
from site_node.config import SiteConfig
from site_node.governance import Governance, SitePolicy, load_policy
from site_node.patient_twin.answer import ScenarioForecast, SignalForecast, TwinAnswer
from site_node.patient_twin.calibration import (
    SiteCalibration,
    calibration_file,
    load_calibration,
    load_weights,
    save_calibration,
    save_weights,
    weights_file,
)
from site_node.patient_twin.scenario import Scenario, apply
from site_node.releases import global_model_file, weights_digest

if TYPE_CHECKING:
    from site_node.participation import SiteNode


# A time asked within this of one of the study's decision times is that decision time (OMOP times are to the
# minute).
SAME_TIME_HOURS = 1 / 60

# A plan choice the practice makes for fewer than this share of patients in the state is outside the data
# whatever the average (see _outside_practice).
RAREST = 0.01


class TwinQueryError(RuntimeError):
    """A twin query that cannot be answered; the message says why and what to do."""


@dataclass
class TwinSite:
    """What a twin query needs of a site: its configuration, policy and governance. A `SiteNode` is one;
    `TwinSite.of` opens one without the training machinery (Opacus, Flower), so a cold query starts fast."""

    config: SiteConfig
    policy: SitePolicy
    governance: Governance

    @classmethod
    def of(cls, config: SiteConfig) -> TwinSite:
        policy = load_policy(config.policy)
        return cls(config, policy, Governance.of_site(config, policy))


@dataclass
class _Rows:
    """The loaded patients' packed rows (features, index times, which decision times are used)."""

    person_ids: np.ndarray
    features: np.ndarray
    index_s: np.ndarray
    valid: np.ndarray


@dataclass
class PatientTwin:
    """A loaded twin of one study at one site: answer many patients and scenarios."""

    node: TwinSite | SiteNode
    spec: StudySpec
    digest: str
    model: TrajectoryForward | None  # set by `open`: the calibrated network, in numpy
    model_source: str
    layout: TrajectoryLayout
    keys: SiteKeys  # the site secret's keys, read once: every query resolves and keys a hospital id
    engine: Engine  # the OMOP database, opened once for every query's id lookup
    withdrawn: set[int]
    rows: _Rows
    calibration: SiteCalibration | None = None  # set by `open`
    resolved: dict[str, int] = field(default_factory=dict)  # hospital id -> person_id, this twin's lifetime

    @classmethod
    def open(cls, node: TwinSite | SiteNode, spec: StudySpec, model_file: Path | None = None) -> PatientTwin:
        """The study's model with this site's conformal calibration (read back from the site folder while it
        is current, with the numpy copy of the weights, else computed from the calibration patients and kept:
        site_node.patient_twin.calibration). Patients' rows are built when first asked for (`load`), one
        build for a whole batch."""
        if not isinstance(spec.model, TrajectorySpec):
            raise TwinQueryError(
                f"study '{spec.study.id}' has model kind '{spec.model.kind}': a patient twin needs a 'trajectory' "
                "study (docs/twins.md)"
            )
        digest = study_hash(spec)
        if not node.governance.approvals.is_approved(digest):
            raise TwinQueryError(
                f"study '{spec.study.id}' (hash {digest[:12]}) is not approved at {node.config.site_id}: its twin is "
                "not run on this site's patients."
            )
        if spec.study.id not in node.policy.twin_query_studies:
            raise TwinQueryError(
                f"the site policy does not allow twin queries for study '{spec.study.id}': the data steward lists "
                "the study under `twin_query_studies` in the policy file to allow them."
            )
        path = model_file if model_file is not None else global_model_file(node.config.base_dir / "models", digest)
        if model_file is None and not path.exists():
            raise TwinQueryError(
                f"this site holds no model of study '{spec.study.id}' yet (it keeps the global model the coordinator "
                "sends it for evaluation); pass --model with the study's final-model.pt from its model card."
            )
        try:
            file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise TwinQueryError(f"{path}: cannot read the model weights: {exc}") from None
        layout = TrajectoryLayout.of(spec.model, len(feature_names(spec)))
        secret, _ = load_or_create_secret(node.config.secret_file, create=False)
        withdrawn = node.governance.withdrawals.person_ids()
        empty = _Rows(np.zeros(0, np.int64), np.zeros((0, layout.input_width), np.float32), np.zeros(0),
                      np.zeros((0, layout.windows), bool))  # fmt: skip
        twin = cls(node, spec, digest, None, str(path), layout, SiteKeys(secret), open_engine(node.config.omop.url),
                   withdrawn, empty)  # fmt: skip
        twin.calibration, weights = twin._calibrated(path, file_sha256, by_hand=model_file is not None)
        twin.model = TrajectoryForward(spec.model, layout.statics, weights, twin.calibration.offsets_array())
        if model_file is None:
            twin.model_source = f"global model of round {twin.calibration.model_round} (kept at this site)"
        return twin

    def load(self, person_ids: list[int]) -> None:
        """Build the rows of these patients (those not loaded yet), in one pass over the database: only their
        events are read. A patient outside the study's cohort, or withheld, simply gets no row."""
        missing = sorted({int(p) for p in person_ids} - set(self.rows.person_ids.tolist()))
        if missing:
            self._add(self._build(missing))

    def resolvable(self, hospital_ids: list[str]) -> list[int]:
        """The OMOP person ids of those hospital ids that resolve (the others fail, each with its reason,
        when asked)."""
        found = []
        for hospital_id in hospital_ids:
            try:
                found.append(self._person_id(hospital_id))
            except TwinQueryError:
                continue
        return found

    def _person_id(self, hospital_id: str) -> int:
        """`resolve_person`, once per hospital id for this loaded twin (a batch resolves each id up front)."""
        if hospital_id not in self.resolved:
            self.resolved[hospital_id] = resolve_person(self.node, hospital_id, self.keys, self.engine)
        return self.resolved[hospital_id]

    def _build(self, only: list[int] | None, decision_hours: float | None = None) -> StudyDataset:
        config = self.node.config
        try:
            if only is None:
                return cached_dataset(config.omop.url, self.spec, self.digest, split_key=config.split_key(),
                                      schema=config.omop.schema_name, withdrawn=self.withdrawn)  # fmt: skip
            return build_dataset(config.omop.url, self.spec, split_key=config.split_key(),
                                 schema=config.omop.schema_name, extra_excluded_person_ids=self.withdrawn,
                                 only_person_ids=only, decision_hours=decision_hours)  # fmt: skip
        except CohortError as exc:
            raise TwinQueryError(f"the cohort cannot be built at {config.site_id}: {exc}") from None

    def _add(self, dataset: StudyDataset) -> None:
        """Append the rows of a build of patients not loaded yet (`load` asks only for those; the calibration
        builds the whole cohort into a twin that has none)."""
        valid = self.layout.unpack_targets(dataset.targets)[3] > 0
        old = self.rows
        self.rows = _Rows(np.concatenate([old.person_ids, dataset.person_ids]),
                          np.concatenate([old.features, dataset.features]),
                          np.concatenate([old.index_s, dataset.index_s]),
                          np.concatenate([old.valid, valid]))  # fmt: skip

    def _calibrated(self, path: Path, file_sha256: str, *, by_hand: bool) -> tuple[SiteCalibration, dict]:
        """This site's conformal offsets and the numpy weights they hold for: the kept ones while current for
        this model file and this data (no torch), else read the file with torch and calibrate (`_calibrate`)."""
        config = self.node.config
        try:
            key = cohort_key(config.omop.url, self.digest, split_key=config.split_key(),
                             schema=config.omop.schema_name, withdrawn=self.withdrawn)  # fmt: skip
        except CohortError as exc:
            raise TwinQueryError(f"the cohort cannot be built at {config.site_id}: {exc}") from None
        kept_path = calibration_file(config.base_dir, self.digest)
        kept = load_calibration(kept_path)
        if kept is not None and kept.current(self.digest, None, key.digest, dt.datetime.now(dt.UTC), file_sha256):
            weights = load_weights(weights_file(kept_path), kept.weights_sha256)
            if weights is not None:
                return kept, weights
        return self._calibrate(path, file_sha256, by_hand, key, kept, kept_path)

    def _calibrate(self, path: Path, file_sha256: str, by_hand: bool, key, kept: SiteCalibration | None,
                   kept_path: Path) -> tuple[SiteCalibration, dict]:  # fmt: skip
        """Read the model file (torch), and compute the offsets from the calibration patients (building the
        whole cohort once, whose rows are kept too) unless the kept ones hold for these very weights; keep
        both, with the numpy copy of the weights, for the queries to come."""
        import torch

        from federation.twins import build_model, kind_of
        from federation.twins.trajectory import ConformalTrajectory

        try:
            data = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise TwinQueryError(f"{path}: cannot read the model weights: {exc}") from None
        state, model_round = (data, None) if by_hand else (data["state_dict"], data["round"])
        model = build_model(self.spec.model, self.layout.statics, seed=self.spec.training.seed)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise TwinQueryError(f"the model ({self.model_source}) does not fit study '{self.spec.study.id}': {exc}"
                                 ) from None  # fmt: skip
        model.eval()
        weights = {name: value.detach().cpu().numpy() for name, value in model.state_dict().items()}
        weights_sha256 = weights_digest(state)
        now = dt.datetime.now(dt.UTC)
        if kept is not None and kept.current(self.digest, weights_sha256, key.digest, now):  # the same weights
            fresh = kept.model_copy(update={"model_file_sha256": file_sha256, "model_round": model_round})
        else:
            dataset = self._build(None)
            self._add(dataset)
            calibration = dataset.subset(CALIBRATION)
            conformal = kind_of(self.spec.model).at_site(self.spec.model, model,
                                                         (calibration.features, calibration.targets))  # fmt: skip
            offsets = conformal.offsets.numpy().tolist() if isinstance(conformal, ConformalTrajectory) else None
            fresh = SiteCalibration(study_hash=self.digest, weights_sha256=weights_sha256,
                                    model_file_sha256=file_sha256, model_round=model_round, data_key=key.digest,
                                    data_state_readable=key.omop_state is not None,
                                    calibration_patients=len(calibration.person_ids), offsets=offsets,
                                    practice_overall=self._practice(weights, calibration), computed_at=now)  # fmt: skip
        save_weights(weights_file(kept_path), weights)
        save_calibration(kept_path, fresh)
        return fresh, weights

    def _practice(self, weights: dict, calibration: StudyDataset) -> list[float]:
        """Per treatment, the model's mean probability of it in the first step ahead over the calibration
        patients' used decision times (0.5 with none: no plan is then compared against anything)."""
        valid = self.layout.unpack_targets(calibration.targets)[3] > 0  # (P, W)
        if not valid.any():
            return [0.5] * self.layout.treatments
        outputs = TrajectoryForward(self.spec.model, self.layout.statics, weights)(calibration.features)
        propensity = sigmoid(self.layout.unpack_outputs(outputs)[2])  # (P, W, R)
        return [float(v) for v in propensity[valid].mean(axis=0)]

    # --- one query ------------------------------------------------------------------------------------

    def answer(self, hospital_id: str, scenarios: list[Scenario], *, at: dt.datetime | None = None,
               by: str = "") -> TwinAnswer:  # fmt: skip
        """The twin of the patient the hospital knows as `hospital_id`, at their decision time at or before
        `at`, under the factual plan and each scenario. Audited (who, study, keyed person, when)."""
        person_key = self._person_key(hospital_id)
        person_id = self._person_id(hospital_id)
        self.load([person_id])
        rows = np.flatnonzero(self.rows.person_ids == person_id)
        if not len(rows):
            raise TwinQueryError(
                f"patient {person_key[:12]} (keyed) is not in study '{self.spec.study.id}' at this site: not in its "
                "cohort, or withheld by consent or a withdrawal."
            )
        row = int(rows[0])
        spec: TrajectorySpec = self.spec.model  # type: ignore[assignment]
        window, decision_hours = self._decision(row, at)
        features = self.rows.features[row : row + 1]
        if window is None:  # a time between the study's decision times: the patient's rows up to that very time
            anchored = self._build([person_id], decision_hours)
            if not len(anchored.person_ids) or not self.layout.unpack_targets(anchored.targets)[3][0, 0]:
                raise TwinQueryError(f"the patient {person_key[:12]} (keyed) was no longer in hospital at {at}: "
                                     "the twin answers during the stay (omit --at for their latest decision time).")
            window, features = 0, anchored.features
        decision_time = dt.datetime.fromtimestamp(float(self.rows.index_s[row]) + decision_hours * 3600, dt.UTC)
        statics, history, controls = self.layout.unpack_inputs(features)
        base_history, base_controls = history[:, window], controls[:, window]
        plans = [("factual", "the treatments recorded after the decision time (none when it is now)",
                  base_controls[0, spec.history_steps :])]  # fmt: skip
        plans += [(s.name, s.description, apply(s, spec, plans[0][2])) for s in scenarios]
        batch = np.concatenate([base_controls] * len(plans))
        for index, (_, _, planned) in enumerate(plans):
            batch[index, spec.history_steps :] = planned
        quantiles, risks, given = self._run(statics, base_history, batch)
        practice = {t.name: float(given[r]) for r, t in enumerate(spec.treatments)}
        overall = self.calibration.practice_overall  # type: ignore[union-attr] (set by `open`)
        practice_overall = {t.name: float(overall[r]) for r, t in enumerate(spec.treatments)}
        forecasts = [
            self._forecast(name, words, planned, quantiles[i], risks[i], base_history[0])
            for i, (name, words, planned) in enumerate(plans)
        ]
        for forecast, (_, _, planned) in zip(forecasts, plans, strict=True):
            forecast.outside_practice = _outside_practice(spec, practice, practice_overall, planned)
        for forecast in forecasts:
            forecast.median_change = {
                s.signal: [a - b for a, b in zip(s.median, f.median, strict=True)]
                for s, f in zip(forecast.signals, forecasts[0].signals, strict=True)
            }
        self.node.governance.audit.append(
            "twin-query",
            {
                "study_hash": self.digest,
                "study_id": self.spec.study.id,
                "by": by or "unknown",
                "person_key": person_key,
                "decision_time": decision_time.isoformat(),
                "scenarios": [s.name for s in scenarios],
                "note": "answered at the site; nothing left it",
            },
        )
        return TwinAnswer(
            study_id=self.spec.study.id,
            study_hash=self.digest,
            model_source=self.model_source,
            person_key=person_key,
            decision_time=decision_time,
            decision_hours_after_index=decision_hours,
            event=self.spec.outcome.summary(),
            practice=practice,
            practice_overall=practice_overall,
            factual=forecasts[0],
            scenarios=forecasts[1:],
        )

    def answer_lines(self, hospital_ids: list[str], scenarios: list[Scenario], *, at: dt.datetime | None = None,
                     by: str = "") -> tuple[list[str], int]:  # fmt: skip
        """Batch mode: every patient under every plan, one JSON line each, their rows built in one pass; a
        patient that cannot be answered gets a line with the error and their line number. Returns the lines
        and how many failed."""
        self.load(self.resolvable(hospital_ids))
        lines, failed = [], 0
        for number, hospital_id in enumerate(hospital_ids, start=1):
            try:
                lines.append(self.answer(hospital_id, scenarios, at=at, by=by).model_dump_json())
            except TwinQueryError as exc:
                failed += 1
                lines.append(json.dumps({"error": str(exc), "line": number}))
        return lines, failed

    def _run(self, statics: np.ndarray, history: np.ndarray, controls: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Quantiles (K, F, S, Q) and event risks (K,) of K plans of one window, through the site's calibrated
        model, and the practice's probability of each treatment in the first step ahead for this patient (R,:
        from the history alone, the same for every plan): the window is put in the first slot of a patient row."""
        layout, k = self.layout, controls.shape[0]
        rows_history = np.zeros((k, layout.windows, *history.shape[1:]))
        rows_controls = np.zeros((k, layout.windows, *controls.shape[1:]))
        rows_history[:, 0], rows_controls[:, 0] = history, controls
        x = layout.pack_inputs(np.repeat(statics, k, axis=0), rows_history, rows_controls)
        quantiles, logit, propensity, _ = layout.unpack_outputs(self.model(x))
        return quantiles[:, 0], sigmoid(logit[:, 0]), sigmoid(propensity[0, 0])

    def _forecast(self, name: str, words: str, planned: np.ndarray, quantiles: np.ndarray, risk: float,
                  history: np.ndarray) -> ScenarioForecast:  # fmt: skip
        spec: TrajectorySpec = self.spec.model  # type: ignore[assignment]
        levels = list(spec.quantiles)
        own = unscale_signals(spec, quantiles, axis=1)  # (F, S, Q): the signals on axis 1
        seen = history[..., 1] > 0  # (H, S)
        past = unscale_signals(spec, history[..., 0], axis=1)
        hours_back = -(spec.history_steps - np.arange(spec.history_steps) - 0.5) * spec.step_hours
        ahead = (np.arange(spec.horizon_steps) + 1) * spec.step_hours
        signals = []
        for s, signal in enumerate(spec.signals):
            measured = np.flatnonzero(seen[:, s])
            since = None
            if len(measured):  # hours since last measured at the decision time, from the scaled input
                since = float(history[-1, s, 2] * (spec.history_steps + spec.windows_per_patient * spec.horizon_steps)
                              * spec.step_hours)  # fmt: skip
            intervals = {}
            for nominal, (low, high) in INTERVALS.items():
                intervals[nominal] = [(float(own[f, s, levels.index(low)]), float(own[f, s, levels.index(high)]))
                                      for f in range(spec.horizon_steps)]  # fmt: skip
            signals.append(SignalForecast(
                signal=signal.name,
                unit=signal.unit,
                history_hours=[float(h) for h in hours_back],
                history=[float(past[h, s]) if seen[h, s] else None for h in range(spec.history_steps)],
                last_measured_hours_ago=since,
                ahead_hours=[float(h) for h in ahead],
                median=[float(v) for v in own[:, s, levels.index(0.5)]],
                interval_80=intervals[0.8],
                interval_95=intervals[0.95],
            ))  # fmt: skip
        doses = {t.name: [float(v) * (t.typical_dose if t.dose else 1.0) for v in planned[:, r]]
                 for r, t in enumerate(spec.treatments)}  # fmt: skip
        return ScenarioForecast(scenario=name, description=words, planned=doses, signals=signals,
                                event_risk=float(risk), median_change={})  # fmt: skip

    def _decision(self, row: int, at: dt.datetime | None) -> tuple[int | None, float]:
        """Where the twin answers, in hours after the index: the patient's latest used decision time by default
        (its window), else the time asked, which is one of the study's decision times when within a minute of
        one (its window) and otherwise a time of its own (no window: its rows are built for it)."""
        spec: TrajectorySpec = self.spec.model  # type: ignore[assignment]
        first = self.spec.outcome.prediction_hours
        used = np.flatnonzero(self.rows.valid[row])
        if at is None:
            return int(used[-1]), first + int(used[-1]) * spec.horizon_hours
        moment = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
        hours = (moment.timestamp() - float(self.rows.index_s[row])) / 3600
        if hours < first - SAME_TIME_HOURS:
            first_time = dt.datetime.fromtimestamp(float(self.rows.index_s[row]) + first * 3600, dt.UTC)
            raise TwinQueryError(
                f"the patient's first decision time is {first_time.isoformat(timespec='minutes')} (the study's "
                f"prediction time, {first:g} h after admission): --at is before it."
            )
        grid = first + used * spec.horizon_hours
        near = np.flatnonzero(np.abs(grid - hours) <= SAME_TIME_HOURS)
        if len(near):
            return int(used[near[0]]), float(grid[near[0]])
        return None, hours

    def _person_key(self, hospital_id: str) -> str:
        return self.keys.keyed_hex(f"twinfed twin query person v1\x00{hospital_id}")


def _outside_practice(spec: TrajectorySpec, practice: dict[str, float], overall: dict[str, float],
                      planned: np.ndarray) -> list[str]:  # fmt: skip
    """A sentence per treatment that the plan (F, R) gives, or withholds, in the first step ahead where the
    practice almost never does so for a patient in this state: less than RAREST of such patients, or more
    than WEIGHT_RANGE's bound times fewer than on average at the site (the stabilised weight would be cut)."""
    hours = f"{spec.step_hours:g} h"
    out = []
    for r, treatment in enumerate(spec.treatments):
        name = treatment.name
        given = bool(planned[0, r] > 0)
        here, anyone = (practice[name], overall[name]) if given else (1 - practice[name], 1 - overall[name])
        if here < RAREST or here * WEIGHT_RANGE[1] < anyone:
            verb = "gives" if given else "withholds"
            out.append(f"{verb} {name} in the next {hours}, which the hospitals' practice does for {here:.1%} of "
                       f"patients in this state ({anyone:.0%} on average here): the forecast under it is an "
                       "extrapolation")  # fmt: skip
    return out


def resolve_person(
    node: TwinSite | SiteNode, hospital_id: str, keys: SiteKeys | None = None, engine: Engine | None = None
) -> int:
    """The OMOP person_id of the patient the hospital knows as `hospital_id` (their FHIR Patient id or MRN),
    through the keyed id map the ETL wrote: the id itself is never stored, only its keyed hash."""
    if keys is None:
        keys = SiteKeys(load_or_create_secret(node.config.secret_file, create=False)[0])
    candidates = [keys.key(f"Patient/{hospital_id}"), keys.key(f"Patient/MRN:{hospital_id}")]
    try:
        engine = engine if engine is not None else open_engine(node.config.omop.url)
        with engine.connect() as connection:
            id_map = Table("twinfed_id_map", MetaData(schema=node.config.omop.schema_name), autoload_with=connection)
            found = connection.execute(
                select(id_map.c.omop_id).where(id_map.c.source_key.in_(candidates), id_map.c.omop_table == "person")
            ).scalars().all()
    except NoSuchTableError:
        raise TwinQueryError(
            "this OMOP database has no twinfed id map (it was not loaded by `twinfed etl`), so a hospital id cannot "
            "be resolved to a person here."
        ) from None
    except SQLAlchemyError as exc:
        raise TwinQueryError(f"the site's OMOP database cannot be read: {exc.__class__.__name__}") from None
    ids = sorted({int(v) for v in found})
    if not ids:
        raise TwinQueryError(
            "no patient with that id was loaded at this site (the id is the hospital's FHIR Patient id or MRN, as "
            "exported to the ETL)."
        )
    if len(ids) > 1:
        raise TwinQueryError("that id names more than one loaded patient (one's Patient id, another's MRN)")
    return ids[0]
