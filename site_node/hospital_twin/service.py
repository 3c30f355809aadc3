"""The hospital twin as the site runs it (`twinfed twin hospital`): read the history from the site's OMOP
database, learn as of the start, run the replications, report, and write the run into the audit log.

Nothing of it leaves the site: the history, the fitted parts and the report stay in the site's folder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path

from federation.contract.hashing import study_hash
from site_node.cohort.omop_source import OmopSource
from site_node.config import SiteConfig
from site_node.governance import Governance
from site_node.hospital_twin.backtest import actual_census, compare
from site_node.hospital_twin.case_mix import CaseMixError, load_length_of_stay_study, occupant_factors
from site_node.hospital_twin.history import DAY_S, read_ward_stays
from site_node.hospital_twin.report import HospitalTwinReport, build_report
from site_node.hospital_twin.scenario import load_hospital_scenarios
from site_node.hospital_twin.twin import HospitalTwinError, learn, run


def start_of(day: dt.date | dt.datetime | None, data_end_s: int) -> int:
    """The run's first midnight: the given day's, or by default the one at or before the data's end."""
    if day is None:
        return data_end_s - data_end_s % DAY_S
    day = day.date() if isinstance(day, dt.datetime) else day
    at = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
    if at > data_end_s:
        raise HospitalTwinError(
            f"the run cannot start on {day} after the data's end "
            f"({dt.datetime.fromtimestamp(data_end_s, tz=dt.UTC):%Y-%m-%d %H:%M}): the twin starts from a known state"
        )
    return at


def run_hospital_twin(
    config: SiteConfig,
    governance: Governance,
    *,
    days: int,
    runs: int,
    scenario_file: Path | None = None,
    start: dt.date | None = None,
    history_days: int | None = None,
    seed: int = 0,
    workers: int = 1,
    backtest: bool = False,
    by: str = "",
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> HospitalTwinReport:
    """One run of the hospital twin; see the module's docstring. With `backtest`, `start` is a past day and
    the report compares the run with what happened. `on_start(total replications)` and `on_progress(done)`
    drive a progress bar."""
    if config.hospital is None:
        raise HospitalTwinError(
            "this site file has no `hospital:` section: list the wards the twin simulates, their beds and which "
            "care sites of the OMOP database they are (docs/twins.md, 'The hospital twin')"
        )
    scenarios = load_hospital_scenarios(scenario_file, config.hospital) if scenario_file is not None else []
    with OmopSource.open(config.omop.url, config.omop.schema_name) as source:
        history = read_ward_stays(source, config.hospital)
        at = start_of(start, history.data_end_s)
        case_mix = _case_mix(source, config, governance, history, at)
    if backtest:
        if start is None:
            raise HospitalTwinError("a backtest needs the past day to start from")
        if at + days * DAY_S > history.data_end_s:
            last = dt.datetime.fromtimestamp(history.data_end_s - days * DAY_S, tz=dt.UTC)
            raise HospitalTwinError(
                f"a {days}-day backtest from {start} runs past the data's end; start on {last:%Y-%m-%d} at the latest"
            )
    plan = learn(history, config.hospital, at, history_days, case_mix.factors if case_mix else None)
    if case_mix is not None:
        plan = dataclasses.replace(plan, notes=(*plan.notes, case_mix.note))
    if on_start:
        on_start(runs)
    result = run(plan, days, runs, scenarios, seed=seed, workers=workers, on_progress=on_progress)
    report = build_report(result, config.site_id, scenarios)
    if backtest:
        wards = [w.name for w in config.hospital.wards]
        report.backtest = compare(result.baseline, actual_census(history, wards, at, days),
                                  [w.beds for w in config.hospital.wards], plan.at)  # fmt: skip
    governance.audit.append(
        "hospital-twin-run",
        {
            "by": by or "unknown",
            "start": plan.at.isoformat(),
            "days": days,
            "runs": runs,
            "seed": seed,
            "scenarios": [s.name for s in scenarios],
            "backtest": backtest,
            "length_of_stay_study": los.study.name if (los := config.hospital.length_of_stay) else None,
            "note": "simulated at the site from its own history; nothing left it",
        },
    )
    return report


def _case_mix(source: OmopSource, config: SiteConfig, governance: Governance, history, at: int):
    """The occupants' stay factors from the site file's length-of-stay study, or None without one."""
    los = config.hospital.length_of_stay if config.hospital else None
    if los is None:
        return None
    base = config.base_dir
    study_file = los.study if los.study.is_absolute() else base / los.study
    try:
        spec = load_length_of_stay_study(study_file)
    except CaseMixError as exc:
        raise HospitalTwinError(str(exc)) from None
    digest = study_hash(spec)
    if not governance.approvals.is_approved(digest):
        raise HospitalTwinError(
            f"the length-of-stay study '{spec.study.id}' (hash {digest[:12]}) is not approved at {config.site_id}: "
            "a model of a study the data steward has not approved is not applied to this site's patients"
        )
    weights = _weights(los.model if los.model is None or los.model.is_absolute() else base / los.model,
                       base / "models", digest, spec.study.id)  # fmt: skip
    running = history.as_of(at).occupants(at)
    try:
        return occupant_factors(source, config.omop.url, config.omop.schema_name, spec, weights,
                                [int(v) for v in running.visit], at)  # fmt: skip
    except CaseMixError as exc:
        raise HospitalTwinError(str(exc)) from None


def _weights(model_file: Path | None, models: Path, digest: str, study_id: str) -> dict:
    from site_node.releases import WeightsUnreadable, study_weights

    try:
        found = study_weights(model_file, models, digest)
    except WeightsUnreadable as exc:
        raise HospitalTwinError(f"the length-of-stay model: {exc}") from None
    if found is None:
        raise HospitalTwinError(
            f"this site holds no model of the length-of-stay study '{study_id}' yet (it keeps the global model the "
            "coordinator sends it for evaluation); give `hospital: length_of_stay: model:` the study's final-model.pt "
            "from its model card"
        )
    return found[1]
