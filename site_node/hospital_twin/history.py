"""The hospital's history as its twin reads it from OMOP: every stay in a ward (visit_detail in one of the
ward's care sites), the admissions that needed a bed, the transfers between wards, and who lay in which
bed at a given time.

Read as an OMOP database written by any tool has it: visit_detail rows by care site, times as datetimes or,
failing those, dates. A stay whose end has no datetime and whose end date is on or after the last day the
database records is still running (censored) at the data's end; the ETL writes open stays that way.
Consecutive stays of one visit in the same ward (e.g. two rooms of one ward) are one ward stay. Stays in the
emergency department are not ward stays: they tell an emergency admission from an elective one.

Why ward entry is the arrival: what the history shows is when a patient got a bed, not when they started
needing one (a past boarding delay is inside the emergency department's stay, not separable from its own
work); the simulation's arrivals are requests for a bed, and its boarding is any wait beyond them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import func, select

from site_node.cohort.omop_source import OmopSource
from site_node.hospital_twin.config import HospitalConfig

HOUR_S = 3600
DAY_S = 86400
EMERGENCY = "emergency"
ELECTIVE = "elective"
KINDS_SEEN = (EMERGENCY, ELECTIVE)


class HospitalHistoryError(ValueError):
    """The database's history cannot feed the hospital twin; the message says what is missing."""


@dataclass(frozen=True)
class WardStays:
    """Every ward stay of the history, one row each, in time order of start.

    Columns: visit (visit_occurrence_id), ward (the twin's name), kind (emergency/elective: how the visit
    began), start_s, end_s (seconds since 1970; the data's end for a stay still running), ended (False:
    still running), next_ward (the ward the patient moved to straight after, '' for none)."""

    stays: pd.DataFrame
    data_end_s: int
    unmatched_care_sites: dict[str, int]  # care sites of visit_detail rows that are no ward and no ED: rows

    def as_of(self, at_s: int) -> WardStays:
        """The history as it stood at `at_s`: stays begun by then, those running then cut there (censored),
        transfers only when the next stay had begun. For a backtest from a past day."""
        s = self.stays[self.stays.start_s < at_s].copy()
        running = (s.end_s > at_s) | ~s.ended
        s["end_s"] = np.where(running, np.minimum(s.end_s, at_s), s.end_s)
        s["ended"] = ~running
        s["next_ward"] = np.where(running, "", s.next_ward)
        return WardStays(s.reset_index(drop=True), int(at_s), self.unmatched_care_sites)

    def occupants(self, at_s: int) -> pd.DataFrame:
        """The ward stays running at `at_s` (started at or before it, ended after it or still running):
        who is in which bed."""
        s = self.stays
        return s[(s.start_s <= at_s) & ((s.end_s > at_s) | ~s.ended)]


def _care_site_names(source: OmopSource) -> pd.DataFrame:
    care_site = source.table("care_site")
    return source.frame(
        select(
            care_site.c.care_site_id,
            care_site.c.care_site_name,
            care_site.c.care_site_source_value,
            care_site.c.place_of_service_source_value,
        )
    )


def _match(care_sites: pd.DataFrame, config: HospitalConfig) -> tuple[dict[int, str], set[int]]:
    """care_site_id -> ward name, and the ids of the emergency department."""
    by_value: dict[str, str] = {s: w.name for w in config.wards for s in w.care_sites}
    emergency_values = set(config.emergency_department)
    wards: dict[int, str] = {}
    emergency: set[int] = set()
    for row in care_sites.itertuples(index=False):
        values = {v for v in (row.care_site_name, row.care_site_source_value, row.place_of_service_source_value) if v}
        hit = sorted({by_value[v] for v in values if v in by_value})
        if len(hit) > 1:
            raise HospitalHistoryError(
                f"care site {row.care_site_id} ({row.care_site_name}) matches wards {hit}; name it under one ward"
            )
        if hit:
            wards[int(row.care_site_id)] = hit[0]
        if values & emergency_values:
            emergency.add(int(row.care_site_id))
    missing = [s for s in [*by_value, *emergency_values] if not (care_sites.isin([s]).any().any())]
    if missing:
        known = sorted({str(v) for v in care_sites.care_site_name.dropna()})
        raise HospitalHistoryError(
            f"the site file's hospital section names care sites the database does not have: {missing}; "
            f"its care sites are: {known}"
        )
    return wards, emergency


def read_ward_stays(source: OmopSource, config: HospitalConfig) -> WardStays:
    """Every ward stay of the database's history (see the module's docstring for the rules)."""
    source.require(["visit_detail", "care_site", "visit_occurrence"])
    wards, emergency = _match(_care_site_names(source), config)
    vd = source.table("visit_detail")
    start = source.epoch(vd.c.visit_detail_start_datetime, vd.c.visit_detail_start_date).label("start_s")
    end = source.epoch(vd.c.visit_detail_end_datetime, vd.c.visit_detail_end_date).label("end_s")
    open_end = (vd.c.visit_detail_end_datetime.is_(None)).label("open_end")
    end_day = source.epoch(vd.c.visit_detail_end_date).label("end_day_s")
    rows = source.frame(
        select(vd.c.visit_occurrence_id.label("visit"), vd.c.care_site_id, start, end, open_end, end_day)
        .where(vd.c.visit_occurrence_id.is_not(None))
        .order_by(vd.c.visit_occurrence_id, start, vd.c.visit_detail_id)
    )
    vo = source.table("visit_occurrence")
    latest = source.connection.execute(
        select(func.max(source.epoch(vo.c.visit_end_datetime, vo.c.visit_end_date, vo.c.visit_start_datetime)))
    ).scalar()
    latest_detail = rows[["start_s", "end_s"]].max().max() if len(rows) else None
    candidates = [int(v) for v in (latest, latest_detail) if v is not None and not pd.isna(v)]
    if not candidates:
        raise HospitalHistoryError("the database holds no visits: the hospital twin has no history to learn from")
    data_end_s = max(candidates)
    data_end_day = data_end_s - data_end_s % DAY_S
    rows["care_site_id"] = rows.care_site_id.astype("Int64")
    rows["ward"] = rows.care_site_id.map(lambda c: wards.get(int(c), "") if not pd.isna(c) else "")
    rows["emergency"] = rows.care_site_id.map(lambda c: (not pd.isna(c)) and int(c) in emergency)
    unmatched = rows[(rows.ward == "") & ~rows.emergency]
    unmatched_counts = {str(k): int(v) for k, v in unmatched.care_site_id.astype(str).value_counts().items()}
    # how each visit began: with the emergency department, or straight into a ward
    first_rows = rows[(rows.ward != "") | rows.emergency].drop_duplicates("visit", keep="first")
    kind = dict(zip(first_rows.visit, np.where(first_rows.emergency, EMERGENCY, ELECTIVE), strict=True))
    ward_rows = rows[rows.ward != ""].copy()
    running = ward_rows.open_end.astype(bool) & (ward_rows.end_day_s.fillna(0) >= data_end_day)
    ward_rows["end_s"] = np.where(running, data_end_s, ward_rows.end_s)
    ward_rows["ended"] = ~running
    merged = _merge_same_ward(ward_rows)
    merged["kind"] = merged.visit.map(kind)
    merged = merged.sort_values(["start_s", "visit"], kind="stable").reset_index(drop=True)
    return WardStays(merged[["visit", "ward", "kind", "start_s", "end_s", "ended", "next_ward"]], data_end_s,
                     unmatched_counts)  # fmt: skip


def _merge_same_ward(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run of consecutive stays of a visit in one ward; next_ward: the ward the visit went to next."""
    rows = rows.sort_values(["visit", "start_s"], kind="stable")
    new_run = (rows.visit != rows.visit.shift()) | (rows.ward != rows.ward.shift())
    run = new_run.cumsum()
    merged = rows.groupby(run, sort=False).agg(
        visit=("visit", "first"), ward=("ward", "first"), start_s=("start_s", "first"), end_s=("end_s", "last"),
        ended=("ended", "last"),
    )  # fmt: skip
    following = merged.ward.shift(-1).where(merged.visit.shift(-1) == merged.visit, "")
    merged["next_ward"] = following.fillna("")
    return merged.reset_index(drop=True)

