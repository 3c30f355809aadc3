"""Honest DP settings: refuse configurations that are private in name only, calibrate the noise for a whole
study schedule, and carry the accountant's history across rounds, restarts and studies.

The guarantee a data steward signs off is (epsilon, delta) for the patient, over everything a study does
at the site. Three things quietly break it in federated DP-SGD, and each has a rule here:

* noise calibrated for one round (`make_private_with_epsilon` calibrates for one call's epochs) while
  the study runs many: `calibrate_noise` takes the whole schedule's step count;
* an accountant rebuilt every round that only reports that round's epsilon: `restore_accountant` starts
  each round from the stored history, so epsilon composes;
* settings for which the (epsilon, delta) statement is technically true but means nothing: no noise,
  no clipping, or a delta large enough to publish a patient outright. `check_privacy_honest` refuses them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from federation.contract.spec import TrainingSpec

# One entry per run of identical steps: (noise multiplier, sample rate, number of steps), Opacus' own format.
AccountantHistory = list[tuple[float, float, int]]

ACCOUNTANTS = ("rdp", "prv")

# Below this the Gaussian noise is under a tenth of one patient's (clipped) contribution to a step: the
# update then carries that contribution almost verbatim, whatever epsilon the arithmetic prints.
NEGLIGIBLE_NOISE_MULTIPLIER = 0.1

# How close below the target epsilon the calibrated noise must land (Opacus' binary search tolerance).
EPSILON_TOLERANCE = 0.01


class NotPrivateError(ValueError):
    """A configuration that would be differentially private in name only; the message says why."""


class CalibrationError(NotPrivateError):
    """No amount of noise reaches the requested epsilon for this schedule (or the request is malformed):
    training anyway would claim a guarantee it does not have, so it is refused like any other."""


def check_privacy_honest(
    noise_multiplier: float, max_grad_norm: float, delta: float, n: int, min_noise_multiplier: float
) -> None:
    """Refuse a DP-SGD configuration whose (epsilon, delta) claim would not protect patients.

    Raises `NotPrivateError` with a sentence a data steward can act on. `min_noise_multiplier` is the
    site's own floor (its policy); `NEGLIGIBLE_NOISE_MULTIPLIER` applies whatever the policy says.
    """
    if n < 1:
        raise NotPrivateError("there are no training examples, so there is nothing to protect or to train on.")
    if not math.isfinite(noise_multiplier) or noise_multiplier < NEGLIGIBLE_NOISE_MULTIPLIER:
        raise NotPrivateError(
            f"the noise multiplier {noise_multiplier:g} adds almost no noise (the least accepted is "
            f"{NEGLIGIBLE_NOISE_MULTIPLIER:g}): each update would carry individual patients' contributions "
            "nearly unchanged, so the epsilon reported for it would be meaningless."
        )
    if noise_multiplier < min_noise_multiplier:
        raise NotPrivateError(
            f"the noise multiplier {noise_multiplier:.3g} is below this site's floor of {min_noise_multiplier:g}, "
            "set by its data steward: this hospital does not accept less noise than that as private. A smaller "
            "target epsilon gives more noise per step."
        )
    if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise NotPrivateError(
            f"the clipping bound max_grad_norm={max_grad_norm:g} does not limit how much one patient can change "
            "the model; without a finite, positive bound the noise protects no one."
        )
    if not math.isfinite(delta) or delta <= 0:
        raise NotPrivateError(f"delta must be a small positive probability, not {delta:g}.")
    if delta >= 1 / n:
        raise NotPrivateError(
            f"delta {delta:g} is not below 1/n = {1 / n:.3g} for {n} patients: a mechanism that publishes one "
            "randomly chosen patient's record in full would satisfy this guarantee. Use delta well below 1/n "
            "(the study default is 1/(10 n))."
        )


def schedule(n_train: int, training: TrainingSpec) -> tuple[float, int, int]:
    """(sample rate q, steps per round, steps over the whole study) for `n_train` patients.

    q = batch_size / n (at most 1) is the Poisson sampling rate; one epoch is ceil(n / batch_size) steps,
    computed in integers so that a q such as 0.1 never turns 10 steps into 11 through rounding.
    """
    if n_train < 1:
        raise ValueError("a training schedule needs at least one training example")
    sample_rate = min(1.0, training.batch_size / n_train)
    steps_per_epoch = -(-n_train // training.batch_size)
    steps_per_round = training.local_epochs * steps_per_epoch
    return sample_rate, steps_per_round, training.rounds * steps_per_round


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str
) -> float:
    """The noise multiplier that spends at most `target_epsilon` over `total_steps` Poisson-sampled steps.

    Calibrated once for the whole study (rounds x local epochs x steps per epoch) and used unchanged every
    round, so the last round ends at the target instead of the first round spending all of it. The result
    lies within `EPSILON_TOLERANCE` below the target (Opacus' binary search never returns more than it).
    """
    _check_accountant(accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise CalibrationError(f"the target epsilon must be a positive number, not {target_epsilon!r}")
    if not (0 < delta < 1):
        raise CalibrationError(f"delta must lie strictly between 0 and 1, not {delta!r}")
    if not (0 < sample_rate <= 1):
        raise CalibrationError(f"the sample rate must lie in (0, 1], not {sample_rate!r}")
    if total_steps < 1:
        raise CalibrationError(f"the schedule must have at least one step, not {total_steps}")
    try:
        with warnings.catch_warnings():
            # "Optimal order is the largest alpha": the bound could be tighter with more RDP orders. The
            # ledger computes with the same orders, so calibration and accounting agree; the warning is noise.
            warnings.simplefilter("ignore", UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=total_steps,
                    accountant=accountant,
                    epsilon_tolerance=EPSILON_TOLERANCE,
                )
            )
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise CalibrationError(
            f"epsilon {target_epsilon:g} at delta {delta:g} cannot be reached over {total_steps} steps at sample "
            f"rate {sample_rate:.4g} with the {accountant} accountant ({exc}): allow a larger epsilon, or train "
            "fewer rounds, fewer epochs or with smaller batches."
        ) from None


def restore_accountant(accountant: str, history: Iterable[Sequence[float]] = ()) -> IAccountant:
    """A fresh Opacus accountant that already holds `history`, so new steps compose with everything before.

    Entries may come back from JSON as lists; they are checked and turned back into Opacus' tuples.
    """
    _check_accountant(accountant)
    restored = create_accountant(mechanism=accountant)
    entries = [_history_entry(entry) for entry in history]
    if entries:
        restored.load_state_dict({"history": entries, "mechanism": accountant})
    return restored


def epsilon_of(history: Iterable[Sequence[float]], delta: float, accountant: str) -> float:
    """Epsilon spent by a stored history, e.g. to check a planned round against the budget before it runs."""
    restored = restore_accountant(accountant, history)
    return float(restored.get_epsilon(delta)) if restored.history else 0.0


def _history_entry(entry: Sequence[float]) -> tuple[float, float, int]:
    if len(entry) != 3:
        raise ValueError(f"an accountant history entry is (noise multiplier, sample rate, steps), not {entry!r}")
    sigma, rate, steps = float(entry[0]), float(entry[1]), entry[2]
    if int(steps) != steps or steps < 0:
        raise ValueError(f"an accountant history entry needs a whole, non-negative step count, not {steps!r}")
    if not (sigma > 0 and math.isfinite(sigma)) or not (0 < rate <= 1):
        raise ValueError(f"an accountant history entry has an impossible noise multiplier or sample rate: {entry!r}")
    return sigma, rate, int(steps)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant '{accountant}'; use one of {', '.join(ACCOUNTANTS)}")
