"""Placing per-person results into the rows of the examples (sorted by person id)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def row_positions(examples: pd.DataFrame, person_ids: pd.Series | np.ndarray) -> np.ndarray:
    """The row of each person id in `examples` (every id must be one of the examples' persons)."""
    return np.searchsorted(examples["person_id"].to_numpy(), np.asarray(person_ids, dtype=np.int64))


def stack(columns: list[np.ndarray], n: int) -> np.ndarray:
    """Columns side by side as float32 (n, k); (n, 0) when there are none."""
    if not columns:
        return np.zeros((n, 0), dtype=np.float32)
    return np.column_stack([np.asarray(c, dtype=np.float32) for c in columns])
