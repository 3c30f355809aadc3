"""Who must be left out of a study because they deny research use of their data.

The ETL keeps the site's consent registry in `twinfed_consent` (one row per FHIR Consent, with the OMOP
person id). A person is withheld when one of their consents is active, denies, is about research (or names
no scope: a denial we cannot place is honoured rather than ignored) and its period covers `as_of`. A
withdrawal is recorded as exactly that: the earlier permit ends and an active denial starts. Withdrawals
the site node learned of by other means (its own registry) arrive as `extra_excluded_person_ids`.

A hospital's existing OMOP database that twinfed did not load has no `twinfed_consent` table. Nobody is
then treated as denying: the hospital's own governance decided who is in its OMOP database, and the site
can still pass its exclusions as extra person ids.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd
from sqlalchemy import select

from omop_etl.load.state import etl_metadata, table
from site_node.cohort.omop_source import OmopSource

RESEARCH_SCOPES = {"research", ""}


def local_naive(moment: datetime) -> datetime:
    """OMOP and the consent registry hold local wall-clock times; compare `moment` as one of those."""
    return moment.astimezone().replace(tzinfo=None) if moment.tzinfo is not None else moment


def denying_person_ids(source: OmopSource, as_of: datetime) -> set[int]:
    """Person ids with an active research denial whose period covers `as_of` (empty without a registry)."""
    consent = source.extra_table(table(etl_metadata(), "twinfed_consent"))
    if consent is None:
        return set()
    rows = source.frame(
        select(consent.c.person_id, consent.c.scope, consent.c.period_start, consent.c.period_end).where(
            consent.c.person_id.is_not(None), consent.c.status == "active", consent.c.provision == "deny"
        )
    )
    if rows.empty:
        return set()
    scope = rows["scope"].fillna("").astype(str).str.strip().str.lower()
    rows = rows[scope.isin(RESEARCH_SCOPES)]
    moment = pd.Timestamp(local_naive(as_of))
    started = _parse(rows["period_start"])
    ended = _parse(rows["period_end"])
    # A period end given as a date covers that whole day.
    date_only = rows["period_end"].fillna("").astype(str).str.len() == 10
    ended = ended.where(~date_only, ended + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1))
    # An unreadable date is treated as open: the denial still counts.
    covers = (started.isna() | (started <= moment)) & (ended.isna() | (moment <= ended))
    return {int(p) for p in rows.loc[covers.to_numpy(), "person_id"]}


def _parse(values: pd.Series) -> pd.Series:
    return pd.to_datetime(
        values.astype("string").str.replace("T", " ", regex=False).str[:19], errors="coerce", format="mixed"
    )
