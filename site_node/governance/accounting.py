"""Epsilon from a list of DP-SGD releases, computed by Opacus's own accountants.

The ledger keeps each round as a `PrivacyEvent` (noise multiplier, sample rate, steps), exactly what an
Opacus accountant keeps in its `history`. Composing the stored events with a fresh accountant gives the
same epsilon as one accountant that had run through every round without a restart, so a model rebuilt
each round, a crashed site node or a second study never resets the count (reference/flower_opacus.md §4.4).
Only RDP and PRV are offered: Opacus warns that its GDP accountant can underestimate epsilon.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

ACCOUNTANTS = ("rdp", "prv")
# PRV's numerical grid grows with epsilon: a run far beyond any ceiling (sigma 0.3, q 1, 2000 steps) took
# several GB and minutes. Above this RDP figure PRV is skipped and the RDP bound, also a valid upper bound
# on epsilon and larger than PRV's, is returned: the answer is then "refused" either way.
PRV_SKIP_ABOVE_RDP_EPSILON = 50.0


@dataclass(frozen=True)
class PrivacyEvent:
    """One round's DP-SGD release at this site: `steps` noisy steps at this noise and Poisson sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"a noise multiplier cannot be negative or NaN (got {self.noise_multiplier})")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"a sample rate is a probability in (0, 1] (got {self.sample_rate})")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps is a whole number of optimizer steps, 0 or more (got {self.steps})")

    def as_tuple(self) -> tuple[float, float, int]:
        """The `(noise_multiplier, sample_rate, num_steps)` form of an Opacus accountant's history."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


def merged_history(events: Iterable[PrivacyEvent]) -> tuple[tuple[float, float, int], ...]:
    """Opacus's own history for these events: consecutive rounds at the same noise and rate become one entry.

    An Opacus accountant's `step()` extends its last entry when noise and rate repeat, so merging the same
    way makes the ledger's figure identical to one continuous accountant, and it is cheaper to compute.
    """
    merged: list[tuple[float, float, int]] = []
    for sigma, rate, steps in (e.as_tuple() for e in events):
        if steps == 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((sigma, rate, steps))
    return tuple(merged)


def check_accountant(accountant: str) -> str:
    """The accountant name, or a ValueError a data steward can act on."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown privacy accountant '{accountant}'; use one of {', '.join(ACCOUNTANTS)} "
            "(GDP is not accepted: it can underestimate epsilon)"
        )
    return accountant


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant  # heavy import, only when epsilon is needed

    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf  # a release without noise has no DP guarantee at all
    with warnings.catch_warnings():
        # Opacus warns about its alpha grid and PRV's numerical integration; neither changes the bound.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        rdp = create_accountant("rdp")
        rdp.history = list(history)
        rdp_epsilon = float(rdp.get_epsilon(delta))
        if accountant == "rdp" or rdp_epsilon > PRV_SKIP_ABOVE_RDP_EPSILON:
            return rdp_epsilon
        prv = create_accountant("prv")
        prv.history = list(history)
        return float(prv.get_epsilon(delta))


def epsilon_of(events: Iterable[PrivacyEvent], delta: float, accountant: str) -> float:
    """Epsilon at `delta` spent by all `events` together, by the named Opacus accountant."""
    check_accountant(accountant)
    if not 0 < delta < 1:
        raise ValueError(f"delta is a probability in (0, 1) (got {delta})")
    return _epsilon(merged_history(events), float(delta), accountant)
