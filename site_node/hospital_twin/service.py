"""The hospital twin as the site runs it (`twinfed twin hospital`): read the history from the site's OMOP
database, learn as of the start, run the replications, report, and write the run into the audit log.

Nothing of it leaves the site: the history, the fitted parts and the report stay in the site's folder.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from site_node.cohort.omop_source import OmopSource
from site_node.config import SiteConfig
from site_node.governance import Governance
from site_node.hospital_twin.backtest import actual_census, compare
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
    if backtest:
        if start is None:
            raise HospitalTwinError("a backtest needs the past day to start from")
        if at + days * DAY_S > history.data_end_s:
            last = dt.datetime.fromtimestamp(history.data_end_s - days * DAY_S, tz=dt.UTC)
            raise HospitalTwinError(
                f"a {days}-day backtest from {start} runs past the data's end; start on {last:%Y-%m-%d} at the latest"
            )
    plan = learn(history, config.hospital, at, history_days)
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
            "note": "simulated at the site from its own history; nothing left it",
        },
    )
    return report
