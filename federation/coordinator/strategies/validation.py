"""Screening of site updates before any rule sees them, and the example weights of a weighted mean.

One bad update (a NaN from a diverged site, a model of another shape from a misconfigured one) must not
poison the global model nor crash the round for everyone else: it is set aside with a reason the
coordinator writes into that site's receipt. The global weights are the coordinator's own, so a problem
there is a programming error and raises instead.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

ScreenedUpdate = tuple[str, dict[str, np.ndarray], float]  # site id, float64 arrays, weight in a weighted mean

_LISTED = 5  # names shown in a reason before "... and N more"


def check_global_weights(global_weights: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless the global weights are a non-empty map of finite floating-point arrays."""
    if not global_weights:
        raise ValueError("the global model has no parameters to aggregate")
    for key, value in global_weights.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"global parameter '{key}' is {array.dtype}; only floating-point parameters aggregate")
        if not np.isfinite(array).all():
            raise ValueError(f"global parameter '{key}' has non-finite values; the global model is already broken")


def screen_updates(
    global_weights: Mapping[str, np.ndarray],
    updates: list[tuple[str, object, object]],
) -> tuple[list[ScreenedUpdate], dict[str, str]]:
    """Split (site id, weights, num_examples) triples into accepted updates and {site id: reason}.

    Accepted updates carry float64 copies of their arrays and their weight for a weighted mean, computed
    over the accepted updates only (see `example_weights`).
    """
    accepted: list[tuple[str, dict[str, np.ndarray], int | None]] = []
    rejected: dict[str, str] = {}
    for site_id, weights, num_examples in updates:
        count, reason = _count(num_examples)
        arrays: dict[str, np.ndarray] = {}
        if reason is None:
            arrays, reason = _arrays(global_weights, weights)
        if reason is None:
            accepted.append((site_id, arrays, count))
        else:
            rejected[site_id] = reason
    weights_used = example_weights([count for _, _, count in accepted])
    return [(site, arrays, w) for (site, arrays, _), w in zip(accepted, weights_used, strict=True)], rejected


def example_weights(counts: list[int | None]) -> list[float]:
    """Each update's weight: its example count; a withheld count (None) gets the mean of the disclosed ones,
    or every update weighs the same when none disclosed.

    The mean is the neutral choice: a site below the disclosure floor is by definition small, but
    guessing its size from the floor would leak exactly what it withheld.
    """
    known = [count for count in counts if count is not None]
    if not known:
        return [1.0] * len(counts)
    stand_in = float(np.mean(known))
    return [stand_in if count is None else float(count) for count in counts]


def _count(num_examples: object) -> tuple[int | None, str | None]:
    """The example count as an int (None when withheld), or the reason it is unusable."""
    if num_examples is None:
        return None, None
    if isinstance(num_examples, numbers.Integral) and not isinstance(num_examples, bool) and num_examples > 0:
        return int(num_examples), None
    if isinstance(num_examples, float) and num_examples.is_integer() and num_examples > 0:
        return int(num_examples), None
    return None, f"num_examples must be a positive whole number or withheld, got {num_examples!r}"


def _names(names: list[str]) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _arrays(global_weights: Mapping[str, np.ndarray], weights: object) -> tuple[dict[str, np.ndarray], str | None]:
    """The update as float64 arrays in the global model's key order, or the reason it cannot be used."""
    if not isinstance(weights, Mapping):
        return {}, f"the update is a {type(weights).__name__}, not a parameter-name -> array mapping"
    missing = sorted(set(global_weights) - set(weights))
    if missing:
        return {}, f"missing parameter(s) {_names(missing)}"
    unexpected = sorted(set(weights) - set(global_weights), key=str)
    if unexpected:
        return {}, f"parameter(s) {_names([str(name) for name in unexpected])} are not in the global model"
    arrays = {}
    for key, reference in global_weights.items():
        try:
            array = np.asarray(weights[key])
        except (TypeError, ValueError) as exc:
            return {}, f"parameter '{key}' is not an array ({exc})"
        if array.dtype.kind not in "fiu":
            return {}, f"parameter '{key}' has dtype {array.dtype}, not a real number type"
        expected = np.shape(reference)
        if array.shape != expected:
            return {}, f"parameter '{key}' has shape {array.shape}, the global model's is {expected}"
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            return {}, f"parameter '{key}' has {bad} non-finite value(s) (NaN or infinity)"
        arrays[key] = array.astype(np.float64)
    return arrays, None
