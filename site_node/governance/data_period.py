"""The calendar period a site's training data cover, as it may leave the site (TRIPOD: the study dates).

A model card that says which years trained a model is what a clinician asks first ("is this from before
the new sepsis protocol?"), but the earliest and the latest index date are each one patient's date. So the
period that leaves is trimmed and coarsened under the site's cell-count floor k: it runs from the month of
the k-th earliest index date to the month of the k-th latest. Every month it names therefore has at least
k patients at or beyond it on its side, and the k-1 patients at each edge are not located at all (they are
somewhere before the start month's end or after the end month's start). Fewer than 2k patients give no
period: the release is withheld, and says so.

The period is ISO 8601's interval of months, "2016-03/2024-11". A site whose policy says
`disclose_data_period: false` sends none. It costs no epsilon: it is not a differentially private release,
it follows the same floor rule as the training-set size beside it, and the steward can turn it off.
"""

from __future__ import annotations

import datetime as dt

import numpy as np


def _month(seconds: float) -> str:
    return dt.datetime.fromtimestamp(float(seconds), dt.UTC).strftime("%Y-%m")


def data_period(index_s: np.ndarray | None, min_cell_count: int) -> str | None:
    """'YYYY-MM/YYYY-MM' from the month of the k-th earliest to that of the k-th latest index (k the floor),
    or None when there are fewer than 2k dated examples (or none)."""
    if index_s is None:
        return None
    times = np.sort(np.asarray(index_s, dtype=np.float64)[np.isfinite(index_s)])
    k = max(int(min_cell_count), 1)
    if times.size < 2 * k:
        return None
    return f"{_month(times[k - 1])}/{_month(times[-k])}"
