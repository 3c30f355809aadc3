"""The cohort's attrition table: how many patients and visits each inclusion criterion kept, in order.

Every cohort build records it (the OHDSI-style attrition diagram a study's protocol asks for): the visits of
the cohort's kinds (a person-level cohort: its index events), then each rule in the order the cohort applies
it (inclusion and exclusion criteria and the observation-period requirement among them), then one example
per patient, then consent, and finally how many patients fell in each split part. Each step says how many
persons and examples (visits or index events) remain after it and how many it removed. At the site the full
counts are what a data steward reads to see why a cohort is small (`twinfed site cohort`).

Some of it may leave the site: a site that refuses a study for a small cohort can say which criterion
removed the most patients. Then only what the cell-count floor allows is shown (`render_attrition`):

* a count below the floor (other than 0, which reveals no one) is shown as "<floor";
* a count from which a hidden one could be worked out is withheld too, shown as ">=floor" (it is never
  below the floor: those are already hidden). The table's counts are tied together: the persons before a
  step are those after it plus those it removed, the parts add up to the cohort, a step removes at least
  as many visits as patients, and after one visit per patient the visits are the patients. A reader who
  knows all that, and that a hidden count lies in [1, floor - 1] (or at or above the floor), must not
  be able to pin down any hidden count: each is checked by linear programming over what is shown (the
  smallest and largest value it could take), and further counts are withheld until none is pinned.

What is decided here is only what a table of counts reveals. Differences between several releases (two
studies whose cohorts differ by one criterion) are the policy's business, not this table's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Step names, in the order the cohort applies them (a study without a condition has no "condition" step).
COHORT_VISITS = "cohort-visits"
VISIT_ENDED = "visit-ended"
AGE = "age"
VISIT_LENGTH = "visit-length"
ALIVE = "alive-at-prediction"
CONDITION = "condition"
ONE_PER_PERSON = "one-per-person"
CONSENT = "consent"
# The steps of a visit-level cohort without criteria (every study before person-level cohorts), in order.
STEP_ORDER = (COHORT_VISITS, VISIT_ENDED, AGE, VISIT_LENGTH, ALIVE, CONDITION, ONE_PER_PERSON, CONSENT)
# A person-level cohort starts from its index events (and has no visit steps); both levels may then have an
# observation-period requirement and numbered inclusion and exclusion criteria, after the condition:
# index-events, age, alive-at-prediction, condition, observation-period, inclusion-1.., exclusion-1..,
# one-per-person, consent.
INDEX_EVENTS = "index-events"
OBSERVATION = "observation-period"


def inclusion(number: int) -> str:
    """The step name of the study's inclusion criterion `number` (from 1, in the study's order)."""
    return f"inclusion-{number}"


def exclusion(number: int) -> str:
    return f"exclusion-{number}"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttritionStep(_Frozen):
    """One inclusion criterion and what remains after it (the first step is the starting population)."""

    name: str = Field(description="Stable key of the criterion (STEP_ORDER, index-events, inclusion-1, ...).")
    criterion: str = Field(description="The criterion with the study's values, for people to read.")
    persons: int = Field(ge=0, description="Patients with at least one example left after this step.")
    examples: int = Field(ge=0, description="Examples (visits or index events) left after this step.")
    removed_persons: int | None = Field(None, ge=0, description="None for the first step (nothing before it).")
    removed_examples: int | None = Field(None, ge=0)


class PartCount(_Frozen):
    """How many patients (one example each) one split part the study cuts holds."""

    part: str
    persons: int = Field(ge=0)


class Attrition(_Frozen):
    """The attrition of one cohort build: the criteria in order, then the split parts the study cuts."""

    steps: tuple[AttritionStep, ...] = ()
    parts: tuple[PartCount, ...] = ()

    def then(self, name: str, criterion: str, person_ids: Sequence[int] | np.ndarray) -> Attrition:
        """This table with one more step, from the person id of every example that remains after it."""
        ids = np.asarray(person_ids, dtype=np.int64)
        persons, examples = int(np.unique(ids).size), int(ids.size)
        previous = self.steps[-1] if self.steps else None
        step = AttritionStep(
            name=name,
            criterion=criterion,
            persons=persons,
            examples=examples,
            removed_persons=None if previous is None else previous.persons - persons,
            removed_examples=None if previous is None else previous.examples - examples,
        )
        return self.model_copy(update={"steps": (*self.steps, step)})

    def with_parts(self, split: np.ndarray, cut: Sequence[str]) -> Attrition:
        """This table with the size of each part the study cuts (`cut`, in order), from the split array."""
        values = np.asarray(split)
        parts = tuple(PartCount(part=part, persons=int((values == part).sum())) for part in cut)
        return self.model_copy(update={"parts": parts})

    def step(self, name: str) -> AttritionStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"no attrition step '{name}'; the steps are {', '.join(s.name for s in self.steps)}")

    @property
    def persons(self) -> int:
        """Patients left after every criterion (the dataset's size); 0 for an empty table."""
        return self.steps[-1].persons if self.steps else 0


def most_removed(attrition: Attrition) -> AttritionStep | None:
    """The criterion that removed the most patients (the first of equals), None if none removed anyone."""
    removing = [s for s in attrition.steps if s.removed_persons]
    if not removing:
        return None
    return max(removing, key=lambda s: s.removed_persons or 0)  # max keeps the first of equal counts


# --- what may leave the site -------------------------------------------------------------------------


class DisplayStep(_Frozen):
    """One step as it may be shown outside the site: every count a string ("412", "<10", ">=10")."""

    name: str
    criterion: str
    persons: str
    examples: str
    removed_persons: str  # "" for the first step
    removed_examples: str


class DisplayPart(_Frozen):
    part: str
    persons: str


class AttritionDisplay(_Frozen):
    """The attrition table under a cell-count floor, and the sentence a refusal may carry."""

    floor: int
    steps: tuple[DisplayStep, ...]
    parts: tuple[DisplayPart, ...]
    withheld: int = Field(description="How many counts are not shown (below the floor, or derivable).")
    most_removed: str | None = Field(None, description="Name of the step that removed the most, if told.")
    sentence: str = ""


@dataclass
class _Cell:
    value: int
    kind: str  # "remaining" | "removed" | "part": removed counts and parts sit in one equation each


def render_attrition(
    attrition: Attrition, floor: int, *, name_most_removed: bool = False, cohort_below: int | None = None
) -> AttritionDisplay:
    """The table with every count the floor allows and no count from which a hidden one follows.

    `name_most_removed` also tells the reader which criterion removed the most patients (that ordering
    is taken into account: it bounds every other removal). `cohort_below` is what a refusal for a small
    cohort already says (the cohort is smaller than this); it is taken into account the same way.
    """
    if floor < 1:
        raise ValueError(f"the cell-count floor is at least 1, not {floor}")
    cells, equalities, inequalities, where = _system(attrition)
    top = most_removed(attrition) if name_most_removed else None
    if top is not None:
        top_cell = where[("removed_persons", attrition.steps.index(top))]
        for i, step in enumerate(attrition.steps):
            if step.removed_persons is not None and step is not top:
                inequalities.append({top_cell: 1, where[("removed_persons", i)]: -1})  # top >= every other
    if cohort_below is not None and attrition.steps:
        inequalities.append({where[("persons", len(attrition.steps) - 1)]: -1, -1: cohort_below - 1})
    primary = {i for i, c in enumerate(cells) if 0 < c.value < floor}
    hidden = _protect(cells, equalities, inequalities, primary, floor)

    def shown(key: tuple[str, int | str]) -> str:
        index = where[key]
        if index not in hidden:
            return str(cells[index].value)
        return f"<{floor}" if index in primary else f">={floor}"

    steps = tuple(
        DisplayStep(
            name=s.name,
            criterion=s.criterion,
            persons=shown(("persons", i)),
            examples=shown(("examples", i)),
            removed_persons="" if s.removed_persons is None else shown(("removed_persons", i)),
            removed_examples="" if s.removed_examples is None else shown(("removed_examples", i)),
        )
        for i, s in enumerate(attrition.steps)
    )
    parts = tuple(DisplayPart(part=p.part, persons=shown(("part", p.part))) for p in attrition.parts)
    sentence = _sentence(steps, attrition, top) if name_most_removed else ""
    return AttritionDisplay(
        floor=floor,
        steps=steps,
        parts=parts,
        withheld=len(hidden),
        most_removed=top.name if top is not None else None,
        sentence=sentence,
    )


def attrition_sentence(attrition: Attrition, floor: int, *, cohort_below: int | None = None) -> str:
    """One sentence that may leave the site: the start, what remains and the criterion that removed the most.

    E.g. "412 patients had visits of kind 9201 (inpatient); <10 remain after every criterion; the criterion
    that removed the most was 'aged 85 or over at the index' (>=10 patients)."
    """
    return render_attrition(attrition, floor, name_most_removed=True, cohort_below=cohort_below).sentence


def _sentence(steps: tuple[DisplayStep, ...], attrition: Attrition, top: AttritionStep | None) -> str:
    if not steps:
        return "the cohort has no attrition table"
    first, last = steps[0], steps[-1]
    start = f"{first.persons} patients had {first.criterion}; {last.persons} remain after every criterion"
    if top is None:
        return f"{start}; no criterion removed anyone."
    shown = steps[attrition.steps.index(top)]
    return f"{start}; the criterion that removed the most was '{top.criterion}' ({shown.removed_persons} patients)."


def _system(
    attrition: Attrition,
) -> tuple[list[_Cell], list[dict[int, int]], list[dict[int, int]], dict[tuple[str, int | str], int]]:
    """The table's counts as cells and what ties them: equalities (sum = 0) and inequalities (sum >= 0).

    A coefficient under key -1 is a constant term.
    """
    cells: list[_Cell] = []
    where: dict[tuple[str, int | str], int] = {}

    def add(key: tuple[str, int | str], value: int, kind: str) -> int:
        where[key] = len(cells)
        cells.append(_Cell(int(value), kind))
        return where[key]

    equalities: list[dict[int, int]] = []
    inequalities: list[dict[int, int]] = []
    one_per_person = False
    for i, step in enumerate(attrition.steps):
        p = add(("persons", i), step.persons, "remaining")
        e = add(("examples", i), step.examples, "remaining")
        one_per_person = one_per_person or step.name == ONE_PER_PERSON
        if one_per_person:
            equalities.append({e: 1, p: -1})  # one example per patient from here on
        else:
            inequalities.append({e: 1, p: -1})  # every patient left has at least one example
        if step.removed_persons is None or step.removed_examples is None:
            continue
        rp = add(("removed_persons", i), step.removed_persons, "removed")
        re = add(("removed_examples", i), step.removed_examples, "removed")
        equalities.append({where[("persons", i - 1)]: 1, p: -1, rp: -1})
        equalities.append({where[("examples", i - 1)]: 1, e: -1, re: -1})
        inequalities.append({re: 1, rp: -1})  # a patient removed takes at least one visit with them
    if attrition.parts and attrition.steps:
        total = {where[("persons", len(attrition.steps) - 1)]: 1}
        for part in attrition.parts:
            total[add(("part", part.part), part.persons, "part")] = -1
        equalities.append(total)
    return cells, equalities, inequalities, where


def _protect(
    cells: list[_Cell],
    equalities: list[dict[int, int]],
    inequalities: list[dict[int, int]],
    primary: set[int],
    floor: int,
) -> set[int]:
    """Hide the primary cells, then more cells until no hidden count can be pinned down from the rest."""
    hidden = set(primary)
    related = [set(c) - {-1} for c in (*equalities, *inequalities)]
    # Withholding more only widens what a hidden count could be, so a count found safe stays safe.
    safe: set[int] = set()
    while True:
        x = None
        for cell in sorted(hidden - safe):
            if _pinned(cell, cells, equalities, inequalities, hidden, primary, floor):
                x = cell
                break
            safe.add(cell)
        if x is None:
            return hidden
        near = set().union(*(r for r in related if x in r)) if related else set()
        # Zeros are never withheld (they reveal no one, and hiding one hides nothing); counts that sit in one
        # equation only (removed, parts) go first so the withholding does not spread down the table.
        candidates = sorted(
            (i for i, c in enumerate(cells) if i not in hidden and c.value > 0),
            key=lambda i: (i not in near, cells[i].kind == "remaining", cells[i].value, -i),
        )
        if not candidates:
            return hidden
        for candidate in candidates:
            if not _pinned(x, cells, equalities, inequalities, hidden | {candidate}, primary, floor):
                hidden.add(candidate)
                break
        else:
            hidden.add(candidates[0])


def _pinned(
    x: int,
    cells: list[_Cell],
    equalities: list[dict[int, int]],
    inequalities: list[dict[int, int]],
    hidden: set[int],
    primary: set[int],
    floor: int,
) -> bool:
    """Whether at most one whole number fits hidden cell `x`, given the shown cells and the ties."""
    from scipy.optimize import linprog  # scipy comes with Opacus; imported here as only a refusal needs it

    variables = sorted(hidden)
    column = {cell: j for j, cell in enumerate(variables)}

    def rows(constraints: list[dict[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        matrix = np.zeros((len(constraints), len(variables)))
        constant = np.zeros(len(constraints))
        for r, constraint in enumerate(constraints):
            for cell, coefficient in constraint.items():
                if cell == -1:
                    constant[r] += coefficient
                elif cell in column:
                    matrix[r, column[cell]] += coefficient
                else:
                    constant[r] += coefficient * cells[cell].value
        return matrix, constant

    a_eq, c_eq = rows(equalities)
    a_ge, c_ge = rows(inequalities)
    bounds = [(1, floor - 1) if v in primary else (floor, None) for v in variables]
    objective = np.zeros(len(variables))
    objective[column[x]] = 1.0
    extremes = []
    for sign in (1.0, -1.0):
        result = linprog(
            sign * objective,
            A_ub=-a_ge if len(inequalities) else None,  # a x + c >= 0  <=>  -a x <= c
            b_ub=c_ge if len(inequalities) else None,
            A_eq=a_eq if len(equalities) else None,
            b_eq=-c_eq if len(equalities) else None,
            bounds=bounds,
            method="highs",
        )
        if result.status == 3:  # unbounded: no largest value, so certainly not pinned
            return False
        if result.status != 0:
            return True  # cannot tell: treat as pinned, so more is withheld rather than less
        extremes.append(sign * result.fun)
    low, high = extremes
    return math.floor(high + 1e-6) - math.ceil(low - 1e-6) < 1
