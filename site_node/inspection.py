"""A data steward's look at a study's cohort at this site, before (or between) any round.

`twinfed site cohort STUDY` builds the cohort exactly as a round would (the same cached build, the same
split key and withdrawals) and shows its attrition table with full counts: it is read at the site, and
nothing leaves. It answers the questions a steward has when a study asks for data, or when the site
refused one for a small cohort: which criterion removed whom, how many are withheld for consent, how the
study's split cuts the cohort here, and what a refusal would say outside the site under the cell-count
floor. The look itself is audited (the study, who looked, the sizes), never any patient's data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from federation.contract import StudySpec, study_hash
from federation.contract.spec import RandomSplit
from site_node.cohort.attrition import Attrition, AttritionStep, attrition_sentence, most_removed
from site_node.cohort.split import part_boundaries

if TYPE_CHECKING:
    from site_node.participation import SiteNode

INSPECTED = "cohort-inspected"


class PartSize(BaseModel):
    """One split part the study cuts, its size here and how the study defines it."""

    model_config = ConfigDict(frozen=True)

    part: str
    persons: int
    definition: str


class CohortInspection(BaseModel):
    """What `twinfed site cohort` shows: the study's cohort at this site, with full local counts."""

    model_config = ConfigDict(frozen=True)

    site_id: str
    study_id: str
    study_hash: str
    attrition: Attrition
    parts: list[PartSize]
    examples: int = Field(description="Patients in the dataset (after consent), one example each.")
    snapshot_hash: str
    min_cohort_size: int
    min_cell_count: int
    most_removed: AttritionStep | None
    outside_sentence: str = Field(description="What a refusal for this cohort may say outside the site.")
    notes: list[str] = Field(default_factory=list, description="What would stop a round here, in words.")


def inspect_cohort(node: SiteNode, spec: StudySpec, *, by: str) -> CohortInspection:
    """Build the study's cohort as a round would, audit the look, and report its attrition.

    Raises CohortError when the OMOP database is not one (or lacks a table the study reads) and
    DatabaseUnavailable when it cannot be reached, as a round would.
    """
    digest = study_hash(spec)
    policy = node.policy
    dataset = node.dataset(spec, digest)
    attrition = dataset.attrition
    definitions = _part_definitions(spec)
    parts = [PartSize(part=p.part, persons=p.persons, definition=definitions[p.part]) for p in attrition.parts]
    below = len(dataset) < policy.min_cohort_size
    report = CohortInspection(
        site_id=node.config.site_id,
        study_id=spec.study.id,
        study_hash=digest,
        attrition=attrition,
        parts=parts,
        examples=len(dataset),
        snapshot_hash=dataset.snapshot_hash,
        min_cohort_size=policy.min_cohort_size,
        min_cell_count=policy.min_cell_count,
        most_removed=most_removed(attrition),
        outside_sentence=attrition_sentence(
            attrition, policy.min_cell_count, cohort_below=policy.min_cohort_size if below else None
        ),
        notes=_notes(len(dataset), parts, policy.min_cohort_size),
    )
    node.governance.audit.append(
        INSPECTED,
        {
            "study_id": spec.study.id,
            "study_hash": digest,
            "by": by,
            "examples": report.examples,
            "parts": {p.part: p.persons for p in parts},
            "snapshot_hash": dataset.snapshot_hash,
        },
    )
    return report


def _part_definitions(spec: StudySpec) -> dict[str, str]:
    split = spec.evaluation.split
    if isinstance(split, RandomSplit):
        shares = {"train": split.train, "validation": split.validation, "test": split.test}
        return {part: f"{share:.0%} of patients by the site's keyed hash" for part, share in shares.items()}
    definitions = {}
    for part, first, after in part_boundaries(split):
        if first is None:
            definitions[part] = f"index date before {after}"
        elif after is None:
            definitions[part] = f"index date on or after {first}"
        else:
            definitions[part] = f"index date from {first} up to {after}"
    return definitions


def _notes(examples: int, parts: list[PartSize], min_cohort_size: int) -> list[str]:
    notes = []
    if examples < min_cohort_size:
        notes.append(
            f"the cohort ({examples} patients) is below this site's minimum of {min_cohort_size}: rounds would be "
            "refused with cohort-too-small"
        )
    for part in parts:
        if part.persons == 0:
            notes.append(f"the {part.part} part is empty here ({part.definition}): nothing to use it on")
    return notes
