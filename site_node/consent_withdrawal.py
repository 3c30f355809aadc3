"""Recording a patient's withdrawal of research consent, checked against the site's OMOP database first.

The withdrawals register (site_node.governance.withdrawals) holds OMOP person ids. A typo there is worse
than useless: the command used to answer "Recorded" for any number, so the patient who withdrew stayed
in every cohort while the steward believed them out, and a number past BIGINT crashed with
OverflowError. So before anything is written the id must be an OMOP person_id (a BIGINT) and a person
in the site's OMOP database; otherwise the steward gets a sentence saying nothing was recorded and
where the right id is found.

There is deliberately no way to record a withdrawal for someone not loaded yet. The ETL gives person
ids in load order (omop_etl.load), so an id that is free today will be given to some other patient
later, who would then be excluded silently while the one who withdrew got in under another id. A
patient who is not in OMOP yet withdraws through the hospital's own records: the next `twinfed etl`
loads the research-consent denial, which keeps them out of the first cohort they could join
(docs/data-steward.md, section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from omop_etl.database import DatabaseUnavailable
from site_node.cohort.errors import CohortError
from site_node.cohort.omop_source import OmopSource
from site_node.config import SiteConfig
from site_node.governance import Governance, Withdrawal

# OMOP CDM person_id: an integer key; databases hold it as INTEGER or BIGINT, so BIGINT bounds any of them.
PERSON_ID_MIN = -(2**63)
PERSON_ID_MAX = 2**63 - 1

_FIND_THE_ID = (
    "The number to give is the patient's OMOP person_id (the person_id column of the OMOP person table), not the "
    "hospital's patient number; hospital IT can look it up there. A patient who is not loaded yet has no person_id: "
    "their withdrawal goes into the hospital's records, and the next `twinfed etl` brings it in as a research-consent "
    "denial (docs/data-steward.md, section 4)."
)


class WithdrawalRefused(ValueError):
    """Nothing was recorded; the message says why and how to find the right person id."""


@dataclass(frozen=True)
class WithdrawalOutcome:
    """What `withdraw_consent` did: the register's record, whether it was there already, and the earlier
    rounds whose training set held the patient (their contribution to those models is on record)."""

    withdrawal: Withdrawal
    already_recorded: bool
    earlier_rounds: list[tuple[str, str, datetime]]


def check_person_id(person_id: int) -> int:
    """The id as an int, or `WithdrawalRefused` when no OMOP database could hold it."""
    if isinstance(person_id, bool) or not isinstance(person_id, int):
        raise WithdrawalRefused(f"Nothing was recorded: {person_id!r} is not a person id (a whole number).")
    if not PERSON_ID_MIN <= person_id <= PERSON_ID_MAX:
        raise WithdrawalRefused(
            f"Nothing was recorded: {person_id} is not an OMOP person_id, which is a BIGINT (at most "
            f"{PERSON_ID_MAX:,}); is a digit doubled, or is it another number (an MRN, a phone number)? " + _FIND_THE_ID
        )
    return person_id


def person_in_omop(config: SiteConfig, person_id: int) -> bool:
    """Whether the site's OMOP database has this person; `WithdrawalRefused` when it cannot be asked."""
    try:
        with OmopSource.open(config.omop.url, config.omop.schema_name) as source:
            if not source.has("person"):
                raise WithdrawalRefused(
                    f"Nothing was recorded: {source.where} has no person table, so person {person_id} cannot be "
                    "checked; the site file's omop.url (and omop.schema) must name the site's OMOP CDM database."
                )
            person = source.table("person")
            query = select(person.c.person_id).where(person.c.person_id == person_id).limit(1)
            return source.connection.execute(query).first() is not None
    except (CohortError, DatabaseUnavailable, SQLAlchemyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise WithdrawalRefused(
            f"Nothing was recorded: cannot check that person {person_id} is in the OMOP database of site "
            f"{config.site_id} ({reason}). Check the site file's omop.url and that the database is reachable, "
            "then record the withdrawal again."
        ) from None


def withdraw_consent(
    config: SiteConfig, governance: Governance, person_id: int, recorded_by: str, reason: str = ""
) -> WithdrawalOutcome:
    """Record that `person_id` withdrew research consent, once it is known to be a person at this site.

    A withdrawal recorded before stands as it was (its date matters) and is not checked against OMOP
    again: the person may have been erased since. Every call is audited.
    """
    person_id = check_person_id(person_id)
    earlier_record = next((w for w in governance.withdrawals.list() if w.person_id == person_id), None)
    if earlier_record is None and not person_in_omop(config, person_id):
        raise WithdrawalRefused(
            f"Nothing was recorded: there is no person {person_id} in the OMOP database of site {config.site_id}. "
            + _FIND_THE_ID
        )
    withdrawal = governance.withdrawals.withdraw(person_id, recorded_by, reason)
    earlier = governance.membership.rounds_including(person_id)
    governance.audit.append(
        "consent-withdrawn",
        {
            "person_id": person_id,
            "by": recorded_by,
            "earlier_rounds": [round_key for _, round_key, _ in earlier],
            "already_recorded": earlier_record is not None,
        },
    )
    return WithdrawalOutcome(withdrawal, earlier_record is not None, earlier)
