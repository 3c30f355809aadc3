"""Check-digit rules of the code systems we emit, so a malformed code can be told from an unknown one.

A LOINC code ends in a Mod-10 check digit and a SNOMED CT identifier ends in a Verhoeff check digit.
A code that fails its rule was mistyped somewhere; a code that passes but is not in the vocabulary is
merely unknown to us (it may be real). The ETL and the synthetic generator's tests both rely on this
difference.
"""

from __future__ import annotations

import re

_LOINC_RE = re.compile(r"^(\d{1,7})-(\d)$")
_SNOMED_RE = re.compile(r"^[1-9]\d{5,17}$")

_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def loinc_check_digit(number: str) -> int:
    """The Mod-10 check digit LOINC appends to the numeric part of a code."""
    total = 0
    for position, char in enumerate(reversed(number)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            digit = digit // 10 + digit % 10
        total += digit
    return (10 - total % 10) % 10


def is_valid_loinc(code: str) -> bool:
    """True when `code` has LOINC's shape (digits, dash, check digit) and its check digit is right."""
    match = _LOINC_RE.match(code)
    return bool(match) and loinc_check_digit(match.group(1)) == int(match.group(2))


def is_valid_snomed(code: str) -> bool:
    """True when `code` is a SNOMED CT identifier whose Verhoeff check digit is right."""
    if not _SNOMED_RE.match(code):
        return False
    check = 0
    for position, char in enumerate(reversed(code)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[position % 8][int(char)]]
    return check == 0
