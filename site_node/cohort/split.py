"""Which part (train, validation, test) each example falls in, as the study's evaluation section declares.

The study chooses the split, not the site: a consortium that validates temporally (TRIPOD type 2b) needs
every hospital to cut at the same dates, and one that splits at random needs the same shares everywhere.

* Random: a keyed hash of the person id (`keyed_hash.keyed_split`), so a patient stays in one part
  across rounds and when other patients are added, and nobody without the site's key knows which.
* Temporal: the example's index date at this site's own data. OMOP holds local wall-clock times, which
  the cohort reads as seconds since 1970 of that wall-clock time, so the date compared is the local date
  of the index, exactly as recorded; no time zone is applied.

A part the study does not cut (a random validation share of 0, a temporal split without
`validation_from`) has no rows. A temporal split can also leave a part empty at a site whose data ends
before `test_from`: that is the site's data, not an error; whoever needs the part refuses, with a reason.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from federation.contract.spec import RandomSplit, SplitSpec, TemporalSplit
from site_node.cohort.keyed_hash import SPLIT_PARTS, keyed_split

__all__ = ["SPLIT_PARTS", "assign_split", "temporal_split"]


def assign_split(person_ids: np.ndarray, index_s: np.ndarray, split: SplitSpec, split_key: bytes) -> np.ndarray:
    """'train' | 'validation' | 'test' per example ('<U10'), from the person id or the index time."""
    if isinstance(split, RandomSplit):
        return keyed_split(person_ids, split_key, (split.train, split.validation, split.test))
    if isinstance(split, TemporalSplit):
        return temporal_split(index_s, split)
    raise TypeError(f"unknown split kind {type(split).__name__}")


def temporal_split(index_s: np.ndarray, split: TemporalSplit) -> np.ndarray:
    """By index date: before `validation_from` (or `test_from`) train, [validation_from, test_from)
    validation, on or after `test_from` test."""
    dates = index_dates(index_s)
    parts = np.full(dates.shape, "train", dtype="<U10")
    if split.validation_from is not None:
        parts[dates >= np.datetime64(split.validation_from, "D")] = "validation"
    parts[dates >= np.datetime64(split.test_from, "D")] = "test"
    return parts


def index_dates(index_s: np.ndarray) -> np.ndarray:
    """The calendar date (datetime64[D]) of each index time in seconds of local wall-clock time."""
    seconds = np.asarray(index_s, dtype=np.float64)
    if not np.isfinite(seconds).all():
        raise ValueError("an example has no index time; the temporal split cannot place it")
    return pd.to_datetime(seconds, unit="s").to_numpy().astype("datetime64[D]")


def part_boundaries(split: TemporalSplit) -> list[tuple[str, dt.date | None, dt.date | None]]:
    """(part, first date, first date after) of each part a temporal split cuts, for reports."""
    if split.validation_from is None:
        return [("train", None, split.test_from), ("test", split.test_from, None)]
    return [
        ("train", None, split.validation_from),
        ("validation", split.validation_from, split.test_from),
        ("test", split.test_from, None),
    ]
