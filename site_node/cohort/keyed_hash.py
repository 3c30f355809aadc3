"""Per-person pseudo-random numbers from a site-held key: stable across rounds, unpredictable without the key.

The split (train/validation/test) and the choice of a random visit per person must not change from one
round to the next, or a patient would move between training and test and the privacy accounting would
no longer describe one fixed dataset. A keyed hash gives that stability without storing any state, and
without the key nobody can tell which part a patient is in. A site that wants a different split per study
derives the key per study (e.g. HMAC of the study hash with its secret).
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

SPLIT_FRACTIONS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))
SPLIT_PARTS = tuple(name for name, _ in SPLIT_FRACTIONS)


def check_key(split_key: bytes) -> None:
    """Refuse an empty or non-bytes key: the split would then be the same at every site and guessable."""
    if not isinstance(split_key, bytes | bytearray) or not split_key:
        raise ValueError("split_key must be non-empty bytes (the site's secret that keeps the split stable)")


def keyed_uniform(split_key: bytes, purpose: str, *ids: np.ndarray) -> np.ndarray:
    """One number in [0, 1) per row of `ids` (integer arrays of equal length), from HMAC-SHA256.

    `purpose` separates the uses of one key, so the split of a person says nothing about which visit
    was drawn for them.
    """
    columns = [np.asarray(column, dtype=np.int64) for column in ids]
    prefix = purpose.encode() + b"\x00"
    out = np.empty(len(columns[0]) if columns else 0, dtype=np.float64)
    for row, values in enumerate(zip(*columns, strict=True)):
        message = prefix + b":".join(str(int(v)).encode() for v in values)
        digest = hmac.new(bytes(split_key), message, hashlib.sha256).digest()
        out[row] = (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53  # 53 bits: exact in a float, below 1
    return out


def assign_split(person_ids: np.ndarray, split_key: bytes) -> np.ndarray:
    """'train' | 'validation' | 'test' per person, 70/15/15, as a '<U10' array."""
    u = keyed_uniform(split_key, "split", person_ids)
    upper_bounds = np.cumsum([fraction for _, fraction in SPLIT_FRACTIONS[:-1]])
    return np.asarray(SPLIT_PARTS, dtype="<U10")[np.searchsorted(upper_bounds, u, side="right")]
