"""The hospital twin checked against the hospital's own past (`twinfed twin hospital --backtest DAY`):
simulate a past period from the state at its start, with only what was known then, and compare the
simulated bands with the midnight census that happened.

Measured per ward over the period's days after the first (the first midnight is the known start state,
covered by construction): the share of days whose real census lies inside the 80% and the 95% band
(nominal 0.80 and 0.95: a well-calibrated twin covers about that), and the mean absolute error of the
median against the real census as a share of the ward's beds. Waiting for a bed is not compared: OMOP does
not record when a patient started to need a bed, so the history holds no boarding time to check against.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydantic import BaseModel, Field

from site_node.hospital_twin.history import DAY_S, WardStays
from site_node.hospital_twin.twin import ArmSummary


class WardBacktest(BaseModel):
    ward: str
    beds: int
    days: int = Field(description="days compared (the period's days after the first)")
    coverage_80: float
    coverage_95: float
    census_mae_share_of_beds: float
    actual_census: list[int] = Field(description="the real midnight census of every day of the period")


class BacktestReport(BaseModel):
    start: dt.datetime
    days: int
    runs: int
    wards: list[WardBacktest]
    coverage_80: float = Field(description="over every ward and compared day")
    coverage_95: float
    census_mae_share_of_beds: float = Field(description="mean over the wards, each as a share of its beds")


def actual_census(history: WardStays, wards: list[str], start_s: int, days: int) -> np.ndarray:
    """(wards, days): patients in each ward at each midnight of the period, from the full history."""
    out = np.zeros((len(wards), days), dtype=np.int64)
    for d in range(days):
        counts = history.occupants(start_s + d * DAY_S).ward.value_counts()
        out[:, d] = [int(counts.get(w, 0)) for w in wards]
    return out


def compare(summary: ArmSummary, actual: np.ndarray, beds: list[int], start: dt.datetime) -> BacktestReport:
    """The backtest's figures from the baseline's histograms and the real census (wards, days)."""
    q = summary.quantiles(summary.census)  # (wards, days, 5): 2.5, 10, 50, 90, 97.5%
    compared = slice(1, summary.days)
    wards = []
    inside80, inside95, shares = [], [], []
    for w, ward in enumerate(summary.wards):
        real = actual[w, compared]
        low95, low80, median, high80, high95 = (q[w, compared, k] for k in range(5))
        in80 = (real >= low80) & (real <= high80)
        in95 = (real >= low95) & (real <= high95)
        share = float(np.abs(median - real).mean() / beds[w]) if real.size else float("nan")
        inside80.append(in80)
        inside95.append(in95)
        shares.append(share)
        wards.append(WardBacktest(
            ward=ward, beds=beds[w], days=int(real.size), coverage_80=float(in80.mean()) if real.size else float("nan"),
            coverage_95=float(in95.mean()) if real.size else float("nan"), census_mae_share_of_beds=share,
            actual_census=[int(v) for v in actual[w]],
        ))  # fmt: skip
    all80, all95 = np.concatenate(inside80), np.concatenate(inside95)
    return BacktestReport(
        start=start, days=summary.days, runs=summary.runs, wards=wards,
        coverage_80=float(all80.mean()) if all80.size else float("nan"),
        coverage_95=float(all95.mean()) if all95.size else float("nan"),
        census_mae_share_of_beds=float(np.mean(shares)),
    )  # fmt: skip
