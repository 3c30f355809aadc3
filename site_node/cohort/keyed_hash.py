"""Per-person pseudo-random numbers from a site-held key: stable across rounds, unpredictable without the key.

The random split (train/validation/test, in the study's fractions) and the choice of a random visit per
person must not change from one round to the next, or a patient would move between training and test and
the privacy accounting would no longer describe one fixed dataset. A keyed hash gives that stability
without storing any state, and without the key nobody can tell which part a patient is in. Each person's
number depends on their id and the key alone, so adding patients to the database never moves anyone
already there to another part. A site that wants a different split per study derives the key per study
(e.g. HMAC of the study hash with its secret).
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

SPLIT_PARTS = ("train", "validation", "test")


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


def keyed_split(person_ids: np.ndarray, split_key: bytes, fractions: tuple[float, float, float]) -> np.ndarray:
    """'train' | 'validation' | 'test' per person, in the shares `fractions` (train, validation, test).

    A person falls in the part whose interval of [0, 1) holds their keyed number (purpose "split"): the
    part depends on the person and the key only. A share of 0 cuts no part (its interval is empty). The
    fractions must add up to 1, as the study contract already checks.
    """
    if len(fractions) != len(SPLIT_PARTS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions are three shares (train, validation, test) adding up to 1, not {fractions}")
    u = keyed_uniform(split_key, "split", person_ids)
    upper_bounds = np.cumsum(fractions[:-1])
    return np.asarray(SPLIT_PARTS, dtype="<U10")[np.searchsorted(upper_bounds, u, side="right")]
