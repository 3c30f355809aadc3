"""Who allows research use of their data, as the hospital records it in FHIR Consent.

Most patients have no Consent resource (research use under the hospital's general policy), some have
an explicit permit, and a few percent deny research use: either from their first contact (opt-out),
or by withdrawing a permit they had given earlier (a permit that ends on the withdrawal date and an
active deny from that date on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthetic.config import ConsentSettings

DAY = 86400.0


@dataclass
class ConsentPlan:
    """Per patient: 'none', 'permit', 'opt_out' or 'withdrawn', with the dates that matter."""

    status: list[str]
    recorded: np.ndarray  # when the first Consent was recorded (seconds)
    withdrawn_at: np.ndarray  # seconds; NaN unless withdrawn


def plan_consents(
    settings: ConsentSettings,
    first_contact: np.ndarray,
    history_start: float,
    export_time: float,
    rng: np.random.Generator,
) -> ConsentPlan:
    """Draw each patient's consent history (deterministic for the generator's state)."""
    n = first_contact.size
    contact = np.where(np.isfinite(first_contact), first_contact, history_start + rng.random(n) * 30 * DAY)
    u = rng.random(n)
    deny = u < settings.opt_out_share
    withdrawn = deny & (rng.random(n) < settings.withdrawn_later_share)
    # Someone who withdraws later must have had time to do so after permitting.
    withdrawn &= contact < export_time - 60 * DAY
    permit = ~deny & (rng.random(n) < settings.explicit_permit_share)
    status = np.where(withdrawn, "withdrawn", np.where(deny, "opt_out", np.where(permit, "permit", "none")))
    withdrawn_at = np.full(n, np.nan)
    span = np.maximum(export_time - 30 * DAY - contact, DAY)
    withdrawn_at[withdrawn] = contact[withdrawn] + 30 * DAY + rng.random(int(withdrawn.sum())) * span[withdrawn]
    withdrawn_at = np.floor(withdrawn_at / 60.0) * 60.0
    return ConsentPlan(status=status.tolist(), recorded=np.floor(contact / 60.0) * 60.0, withdrawn_at=withdrawn_at)
