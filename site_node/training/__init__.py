"""Local differentially private training of the twin risk models, with honest accounting.

The front door of local training at a site:

* `check_privacy_honest`, `calibrate_noise`, `schedule`: refuse DP-in-name-only settings, calibrate the
  noise once for the whole study (rounds x local epochs x steps), lay out the steps (privacy.py);
* `train_dp`: one round of DP-SGD (Poisson sampling, per-patient clipping, Gaussian noise) whose epsilon
  composes with the stored accountant history; `train_plain`: the same round without privacy (local.py);
* `evaluate`: loss, AUROC, Brier score with small-cell suppression (evaluation.py).

Clipping runs in one of two engines (engines.py): single-pass ghost clipping for the registry's
Linear/ReLU/Dropout models (ghost.py), Opacus' ghost clipping for anything else. The accountant is
always Opacus'.
"""

from site_node.training.evaluation import auroc, evaluate
from site_node.training.local import TrainResult, train_dp, train_plain
from site_node.training.privacy import (
    NEGLIGIBLE_NOISE_MULTIPLIER,
    AccountantHistory,
    CalibrationError,
    NotPrivateError,
    calibrate_noise,
    check_privacy_honest,
    epsilon_of,
    restore_accountant,
    schedule,
)

__all__ = [
    "NEGLIGIBLE_NOISE_MULTIPLIER",
    "AccountantHistory",
    "CalibrationError",
    "NotPrivateError",
    "TrainResult",
    "auroc",
    "calibrate_noise",
    "check_privacy_honest",
    "epsilon_of",
    "evaluate",
    "restore_accountant",
    "schedule",
    "train_dp",
    "train_plain",
]
