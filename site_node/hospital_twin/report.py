"""What a hospital twin run reports: per ward and day the midnight census and peak occupancy (median and
80%/95% bands), the chance of being full, boarding; per scenario the same and its paired effect on the
baseline with a 95% interval. As JSON (`HospitalTwinReport`), terminal tables and an HTML page with fan
charts (baseline bands, the scenario's median over them, the beds)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io

import numpy as np
from pydantic import BaseModel, Field
from rich.table import Table

from site_node.hospital_twin.backtest import BacktestReport
from site_node.hospital_twin.twin import EFFECTS, ArmSummary, TwinRun


class Band(BaseModel):
    """A day's distribution over the replications: median and the 80% and 95% bands."""

    low95: int
    low80: int
    median: int
    high80: int
    high95: int


class WardDay(BaseModel):
    date: dt.date
    census: Band = Field(description="midnight census at the start of the day")
    peak: Band = Field(description="most beds occupied at once during the day")
    full_probability: float = Field(description="share of replications in which the ward was full at some hour")
    boarded_mean: float = Field(description="arrivals that day who waited for a bed, mean over replications")
    boarding_hours_mean: float = Field(description="their hours of waiting, summed, mean over replications")


class WardReport(BaseModel):
    name: str
    beds: int
    days: list[WardDay]


class Effect(BaseModel):
    name: str
    what: str
    mean: float
    low95: float | None
    high95: float | None


class ArmReport(BaseModel):
    name: str
    description: str = ""
    wards: list[WardReport]
    effects: list[Effect] = Field(default_factory=list, description="scenario minus baseline, paired")


class HospitalTwinReport(BaseModel):
    """One run of the hospital twin at this site (nothing in it leaves the site)."""

    site_id: str
    start: dt.datetime = Field(description="the run's first midnight; the state of the wards then")
    days: int
    runs: int
    seed: int
    history_days: int
    occupants_at_start: dict[str, int]
    notes: list[str]
    baseline: ArmReport
    scenarios: list[ArmReport]
    backtest: BacktestReport | None = Field(None, description="with --backtest: the run against what happened")


def _bands(summary: ArmSummary, histogram: np.ndarray) -> np.ndarray:
    return summary.quantiles(histogram)  # (wards, days, 5) in twin.QUANTILES order


def _band(values: np.ndarray) -> Band:
    return Band(**dict(zip(("low95", "low80", "median", "high80", "high95"), map(int, values), strict=True)))


def _arm(name: str, description: str, summary: ArmSummary, run: TwinRun, beds: dict[str, int]) -> ArmReport:
    census, peak = _bands(summary, summary.census), _bands(summary, summary.peak)
    runs = max(summary.runs, 1)
    start = run.plan.at.date()
    wards = []
    for w, ward in enumerate(summary.wards):
        days = [
            WardDay(
                date=start + dt.timedelta(days=d),
                census=_band(census[w, d]),
                peak=_band(peak[w, d]),
                full_probability=float(summary.full_days[w, d] / runs),
                boarded_mean=float(summary.boarded[w, d] / runs),
                boarding_hours_mean=float(summary.boarding_hours[w, d] / runs),
            )
            for d in range(summary.days)
        ]  # fmt: skip
        wards.append(WardReport(name=ward, beds=beds[ward], days=days))
    return ArmReport(name=name, description=description, wards=wards)


def build_report(run: TwinRun, site_id: str, scenarios: list) -> HospitalTwinReport:
    plan = run.plan
    beds = {w.name: w.beds for w in plan.config.wards}
    arms = []
    for scenario in scenarios:
        arm = _arm(scenario.name, scenario.description, run.scenarios[scenario.name], run,
                   {w: scenario.beds(w, b)[0] for w, b in beds.items()})  # fmt: skip
        for name, paired in run.effects[scenario.name].items():
            low, high = paired.interval()
            known = not np.isnan(low)
            arm.effects.append(Effect(name=name, what=EFFECTS[name], mean=paired.mean,
                                      low95=low if known else None, high95=high if known else None))  # fmt: skip
        arms.append(arm)
    occupants: dict[str, int] = {}
    for ward, _, _ in plan.occupants:
        occupants[ward] = occupants.get(ward, 0) + 1
    return HospitalTwinReport(
        site_id=site_id,
        start=plan.at,
        days=run.days,
        runs=run.baseline.runs,
        seed=run.seed,
        history_days=plan.history_days,
        occupants_at_start={w: occupants.get(w, 0) for w in beds},
        notes=list(plan.notes),
        baseline=_arm("baseline", "as the history goes on", run.baseline, run, beds),
        scenarios=arms,
    )


# ------------------------------------------------------------------------------------------ terminal


def _band_text(band: Band) -> str:
    return f"{band.median} ({band.low80}-{band.high80})"


def tables(report: HospitalTwinReport, every: int = 7) -> list[Table]:
    """Per ward: the first day and every `every`-th, baseline and scenarios; then the scenarios' effects."""
    out = []
    for w, ward in enumerate(report.baseline.wards):
        table = Table(title=f"{ward.name} ({ward.beds} beds): midnight census, median (80% band); P(full); boarded")
        table.add_column("day")
        for arm in [report.baseline, *report.scenarios]:
            table.add_column(arm.name)
        for d in sorted({0, *range(every - 1, report.days, every), report.days - 1}):
            cells = []
            for arm in [report.baseline, *report.scenarios]:
                day = arm.wards[w].days[d]
                cells.append(f"{_band_text(day.census)}; {day.full_probability:.0%}; {day.boarded_mean:.1f}")
            table.add_row(ward.days[d].date.isoformat(), *cells)
        out.append(table)
    if report.backtest is not None:
        bt = report.backtest
        table = Table(title=f"Backtest from {bt.start:%Y-%m-%d}: the real midnight census against the bands "
                      f"(days 2-{bt.days}; nominal 80% and 95%)")  # fmt: skip
        for column in ("ward", "beds", "inside 80% band", "inside 95% band", "median's error, share of beds"):
            table.add_column(column)
        for ward in bt.wards:
            table.add_row(ward.ward, str(ward.beds), f"{ward.coverage_80:.0%}", f"{ward.coverage_95:.0%}",
                          f"{ward.census_mae_share_of_beds:.1%}")  # fmt: skip
        table.add_row("all", "", f"{bt.coverage_80:.0%}", f"{bt.coverage_95:.0%}", f"{bt.census_mae_share_of_beds:.1%}")
        out.append(table)
    if report.scenarios:
        table = Table(title=f"Scenario minus baseline over {report.days} days, mean (95% interval), {report.runs} runs")
        table.add_column("effect")
        for arm in report.scenarios:
            table.add_column(arm.name)
        for name, what in EFFECTS.items():
            row = []
            for arm in report.scenarios:
                effect = next(e for e in arm.effects if e.name == name)
                interval = "" if effect.low95 is None else f" ({effect.low95:+.1f} to {effect.high95:+.1f})"
                row.append(f"{effect.mean:+.1f}{interval}")
            table.add_row(what, *row)
        out.append(table)
    return out


# ------------------------------------------------------------------------------------------------ html


def fan_chart_png(report: HospitalTwinReport) -> bytes:
    """One panel per ward: the baseline's 95% and 80% bands of midnight census and its median, each scenario's
    median over them, and the beds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wards = report.baseline.wards
    figure, axes = plt.subplots(len(wards), 1, figsize=(9, 3.2 * len(wards)), squeeze=False)
    colours = ["tab:red", "tab:green", "tab:purple", "tab:orange"]
    for axis, (w, ward) in zip(axes[:, 0], enumerate(wards), strict=True):
        dates = [d.date for d in ward.days]
        axis.fill_between(dates, [d.census.low95 for d in ward.days], [d.census.high95 for d in ward.days],
                          color="tab:blue", alpha=0.15, step="mid", label="baseline 95%")  # fmt: skip
        axis.fill_between(dates, [d.census.low80 for d in ward.days], [d.census.high80 for d in ward.days],
                          color="tab:blue", alpha=0.3, step="mid", label="baseline 80%")  # fmt: skip
        axis.step(dates, [d.census.median for d in ward.days], where="mid", color="tab:blue", label="baseline median")
        for arm, colour in zip(report.scenarios, colours, strict=False):
            axis.step(dates, [d.census.median for d in arm.wards[w].days], where="mid", color=colour,
                      linestyle="--", label=f"{arm.name} median")  # fmt: skip
        if report.backtest is not None:
            axis.plot(dates, report.backtest.wards[w].actual_census, color="black", marker=".", linewidth=1.2,
                      label="what happened")  # fmt: skip
        axis.axhline(ward.beds, color="black", linewidth=1, linestyle=":", label=f"{ward.beds} beds")
        axis.set_title(f"{ward.name}: midnight census")
        axis.set_ylim(bottom=0)
        axis.legend(loc="upper left", fontsize=7, ncols=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def html_page(report: HospitalTwinReport) -> str:
    image = base64.b64encode(fan_chart_png(report)).decode("ascii")
    rows = []
    for arm in report.scenarios:
        for effect in arm.effects:
            interval = "" if effect.low95 is None else f"{effect.low95:+.1f} to {effect.high95:+.1f}"
            rows.append(f"<tr><td>{html.escape(arm.name)}</td><td>{html.escape(effect.what)}</td>"
                        f"<td>{effect.mean:+.1f}</td><td>{interval}</td></tr>")  # fmt: skip
    effects = (
        "<h2>Scenarios against the baseline</h2><table><tr><th>scenario</th><th>effect</th><th>mean</th>"
        f"<th>95% interval</th></tr>{''.join(rows)}</table>" if rows else ""
    )
    if report.backtest is not None:
        bt = report.backtest
        cells = "".join(
            f"<tr><td>{html.escape(w.ward)}</td><td>{w.coverage_80:.0%}</td><td>{w.coverage_95:.0%}</td>"
            f"<td>{w.census_mae_share_of_beds:.1%}</td></tr>" for w in bt.wards
        )
        effects = (
            f"<h2>Backtest from {bt.start:%Y-%m-%d}</h2><p>The real midnight census (black) against the bands "
            f"simulated from the state and the history at the start only (days 2-{bt.days}).</p><table><tr>"
            "<th>ward</th><th>inside 80% band</th><th>inside 95% band</th><th>median's error, share of beds</th>"
            f"</tr>{cells}</table>" + effects
        )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    occupants = ", ".join(f"{w} {n}" for w, n in report.occupants_at_start.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Hospital twin</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;text-align:left}"
        "</style></head><body>"
        f"<h1>Hospital twin: {html.escape(report.site_id)}</h1>"
        f"<p>{report.days} days from {report.start:%Y-%m-%d %H:%M}, {report.runs} replications (seed {report.seed}), "
        f"learnt from {report.history_days} days of this hospital's history; in bed at the start: "
        f"{html.escape(occupants)}. Bands are over replications: what may happen, not a promise.</p>"
        f"{'<ul>' + notes + '</ul>' if notes else ''}"
        f"<img alt='midnight census by ward' src='data:image/png;base64,{image}'>{effects}"
        "</body></html>"
    )


__all__ = ["HospitalTwinReport", "build_report", "fan_chart_png", "html_page", "tables"]
