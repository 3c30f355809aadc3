"""One error style for every file people write (study, policy, site file): what pydantic found wrong, as
sentences naming the field, the rule and what was given; a setting that does not exist names the settings
that do at that place (a misspelt `site_epsilon_ceilng` must be recognisable as a typo, not a mystery).

Three loaders each formatted pydantic's errors their own way; this is the one they share.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from federation.common.yaml_files import short_repr

MAX_PROBLEMS_SHOWN = 20  # a file with two million wrong values is described by its first problems


def _models_in(annotation: Any) -> set[type[BaseModel]]:
    """The pydantic models a field's annotation can hold (through Optional, lists, dicts, Annotated)."""
    found: set[type[BaseModel]] = set()
    stack = [annotation]
    while stack:
        current = stack.pop()
        if isinstance(current, type) and issubclass(current, BaseModel):
            found.add(current)
            continue
        if isinstance(current, types.UnionType) or typing.get_origin(current) is not None:
            stack.extend(typing.get_args(current))
    return found


def _field(model: type[BaseModel], name: str):
    return model.model_fields.get(name) or next((f for f in model.model_fields.values() if f.alias == name), None)


def model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model that holds the field at `loc` (list indexes and union tags skipped), or None if unclear."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = _field(current, str(part))
        if field is None:
            tagged = next((m for m in _models_in(current) if m.__name__.lower() == str(part).lower()), None)
            if tagged is None:
                continue  # a union's tag in the location (the kind of model chosen): stay where we are
            current = tagged
            continue
        candidates = _models_in(field.annotation)
        current = candidates.pop() if len(candidates) == 1 else None
    return current


def _names(model: type[BaseModel]) -> str:
    return ", ".join(field.alias or name for name, field in model.model_fields.items())


def describe(exc: ValidationError, model: type[BaseModel], what: str, show_values: bool = True) -> list[str]:
    """One sentence per problem (at most MAX_PROBLEMS_SHOWN, then how many more). `what` names the file's kind
    ('policy', 'study', 'site file') for a setting that does not exist; `show_values` False keeps what was
    given out of the message (a site file's database URL may carry a password)."""
    problems = []
    for err in exc.errors()[:MAX_PROBLEMS_SHOWN]:
        loc = tuple(err["loc"])
        field = ".".join(str(part) for part in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            holder = model_at(model, loc[:-1])
            where = "" if len(loc) == 1 else f" in '{'.'.join(str(p) for p in loc[:-1])}'"
            known = f"; the settings{where} are: {_names(holder)}" if holder is not None else ""
            problems.append(f"'{field}' is not a {what} setting (a misspelling?){known}")
            continue
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else err["msg"]
        message = message.removeprefix("Value error, ")
        given = err.get("input")
        plain = isinstance(given, int | float | str | bool)
        shown = f" (got {short_repr(given)})" if show_values and plain else ""
        problems.append(f"{field}: {message}{shown}")
    if exc.error_count() > MAX_PROBLEMS_SHOWN:
        problems.append(f"... and {exc.error_count() - MAX_PROBLEMS_SHOWN:,} more problems")
    return problems


def read_one_or_many(
    path,
    limits,
    one: type[BaseModel],
    many: type[BaseModel],
    key: str,
    error: type[ValueError],
    what: str,
    missing_hint: str = "",
) -> list:
    """The items of a YAML file that holds one `one`, or `key: [...]` of them (validated as `many`, whose
    field `key` is the list): e.g. a scenario file with one scenario or several. Problems are one
    `error` naming the file and every field found wrong."""
    from federation.common.yaml_files import read_yaml_file

    data = read_yaml_file(path, limits, error, missing_hint=missing_hint)
    try:
        if isinstance(data, dict) and key in data:
            return list(getattr(many.model_validate(data), key))
        return [one.model_validate(data)]
    except ValidationError as exc:
        listed = "\n  - ".join(describe(exc, one, what))
        raise error(f"{path}: the {what} file is not valid:\n  - {listed}") from None
