"""What every aggregation rule shares: the types the coordinator passes in, the screening of updates, the
errors, and the round bookkeeping that makes a checkpointed aggregator resume exactly.

A rule only says how accepted updates become new global weights (`_combine`); screening, weighting and
the refusal of a round happen here once, so no rule can forget to name a site it dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

import numpy as np

from federation.coordinator.strategies.validation import check_global_weights, screen_updates

Weights = dict[str, np.ndarray]  # parameter name -> float32 array (a torch state_dict as numpy)


@dataclass(frozen=True)
class SiteUpdate:
    """One site's trained weights for a round.

    `num_examples` is None when the site withheld its count (its cohort is below the cell-count floor
    it may disclose); the update then weighs as much as the mean of the others.
    """

    site_id: str
    weights: Weights
    num_examples: int | None


class UpdateRejected(ValueError):
    """A site's update cannot enter the aggregate (missing key, wrong shape, NaN...).

    Raised by `aggregate`, which has no other way to say it; `rejected` holds every rejected site of the
    round with its reason, `site_id`/`reason` the first of them.
    """

    def __init__(self, site_id: str, reason: str, rejected: Mapping[str, str] | None = None) -> None:
        self.site_id = site_id
        self.reason = reason
        self.rejected = dict(rejected) if rejected is not None else {site_id: reason}
        others = [s for s in self.rejected if s != site_id]
        tail = f" (also rejected: {', '.join(others)})" if others else ""
        super().__init__(f"update from site '{site_id}' rejected: {reason}{tail}")


class AggregationError(ValueError):
    """No new global model this round: too few acceptable updates for the rule. The aggregator's state is
    unchanged, so the round can be retried; `rejected` names the sites whose updates were refused."""

    def __init__(self, message: str, rejected: Mapping[str, str] | None = None) -> None:
        self.rejected = dict(rejected or {})
        if self.rejected:
            message += " Rejected: " + "; ".join(f"{site}: {why}" for site, why in self.rejected.items())
        super().__init__(message)


class AggregateReport(NamedTuple):
    """The new global weights and the sites whose updates were left out, each with the reason."""

    weights: Weights
    rejected: dict[str, str]


@runtime_checkable
class Aggregator(Protocol):
    """The coordinator's view of a strategy; `make_aggregator(spec)` returns one."""

    name: str

    def aggregate(self, global_weights: Weights, updates: list[SiteUpdate]) -> Weights: ...

    def aggregate_with_report(self, global_weights: Weights, updates: list[SiteUpdate]) -> AggregateReport: ...

    def state_dict(self) -> dict[str, object]: ...

    def load_state_dict(self, state: dict[str, object]) -> None: ...


@dataclass(frozen=True)
class Accepted:
    """An update that passed screening, as float64 arrays, with the weight it carries in a weighted mean."""

    site_id: str
    arrays: dict[str, np.ndarray]
    weight: float


def scalar(value: object) -> object:
    """A state value as a plain Python scalar: a checkpoint written with numpy turns scalars into 0-d arrays."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


class BaseAggregator(ABC):
    """Screening, refusal and bookkeeping around a rule's `_combine`.

    `_combine` must leave the aggregator unchanged until it has computed everything it needs, and only then
    commit its new state, so a refused or failed round never half-advances a server optimiser.
    """

    name: ClassVar[str]
    min_updates: ClassVar[int] = 1

    def __init__(self) -> None:
        self.rounds = 0  # rounds aggregated so far; checked on resume

    # --- the round ----------------------------------------------------------------------------------

    def aggregate(self, global_weights: Weights, updates: list[SiteUpdate]) -> Weights:
        """New global weights, or `UpdateRejected` if any update is unacceptable (nothing is aggregated then).

        Strict on purpose: a caller that does not look at rejections must not get a model that silently
        left a site out. Use `aggregate_with_report` to aggregate the acceptable updates and name the rest.
        """
        return self._aggregate(global_weights, updates, strict=True).weights

    def aggregate_with_report(self, global_weights: Weights, updates: list[SiteUpdate]) -> AggregateReport:
        """Aggregate the acceptable updates; name each dropped site with its reason.

        Raises `AggregationError` (state unchanged) when fewer updates survive than the rule needs.
        """
        return self._aggregate(global_weights, updates, strict=False)

    def _aggregate(self, global_weights: Weights, updates: list[SiteUpdate], strict: bool) -> AggregateReport:
        check_global_weights(global_weights)
        accepted, rejected = self._screen(global_weights, updates)
        if strict and rejected:
            site_id, reason = next(iter(rejected.items()))
            raise UpdateRejected(site_id, reason, rejected)
        if len(accepted) < self.min_updates:
            raise AggregationError(
                f"{self.name} needs at least {self.min_updates} acceptable update(s); "
                f"{len(accepted)} of {len(updates)} were acceptable.",
                rejected,
            )
        global64 = {key: np.asarray(value, dtype=np.float64) for key, value in global_weights.items()}
        combined = self._combine(global64, accepted)
        self.rounds += 1
        new_weights = {key: combined[key].astype(np.asarray(value).dtype) for key, value in global_weights.items()}
        return AggregateReport(new_weights, rejected)

    def _screen(self, global_weights: Weights, updates: list[SiteUpdate]) -> tuple[list[Accepted], dict[str, str]]:
        site_ids = [update.site_id for update in updates]
        duplicates = sorted({site for site in site_ids if site_ids.count(site) > 1})
        if duplicates:
            raise ValueError(f"more than one update in this round from site(s) {', '.join(duplicates)}")
        screened, rejected = screen_updates(global_weights, [(u.site_id, u.weights, u.num_examples) for u in updates])
        return [Accepted(site, arrays, weight) for site, arrays, weight in screened], rejected

    @abstractmethod
    def _combine(self, global_weights: dict[str, np.ndarray], accepted: list[Accepted]) -> dict[str, np.ndarray]:
        """The rule: float64 global weights and accepted updates in, float64 new weights out."""

    # --- checkpointing ------------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, float]:
        """Settings that must be the same on resume: resuming under other settings is another study."""
        return {}

    def state_dict(self) -> dict[str, object]:
        """Everything needed to resume: a flat dict of plain scalars and numpy arrays (np.savez-able)."""
        return {"strategy": self.name, "rounds": self.rounds, **self.hyperparameters(), **self._arrays_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Resume from `state_dict()`; refuses a state from another strategy or other settings."""
        values = {key: scalar(value) for key, value in state.items()}
        if values.get("strategy") != self.name:
            raise ValueError(f"this state belongs to strategy '{values.get('strategy')}', not '{self.name}'")
        for key, expected in self.hyperparameters().items():
            if key not in values or float(values[key]) != expected:  # type: ignore[arg-type]
                raise ValueError(
                    f"{self.name} state was saved with {key}={values.get(key)}, this aggregator has {expected}: "
                    "resuming under other settings would not reproduce the uninterrupted run"
                )
        rounds = values.get("rounds")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise ValueError(f"state has no valid 'rounds' count: {rounds!r}")
        known = {"strategy", "rounds", *self.hyperparameters()}
        self._load_arrays_state(rounds, {key: value for key, value in state.items() if key not in known})
        self.rounds = rounds

    def _arrays_state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_arrays_state(self, rounds: int, arrays: dict[str, object]) -> None:
        """Validate and take the rule's own state; must not change anything before it has validated all."""
        if arrays:
            raise ValueError(f"{self.name} keeps no array state, but the state has {', '.join(sorted(arrays))}")
