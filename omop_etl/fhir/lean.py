"""Validators for the elements we map, derived from the fhir.resources R4B model definitions.

Validating a whole resource with the R4B pydantic models costs ~120-300 us; a hospital's nightly export
has millions of resources. Most elements of a resource never reach OMOP, so we validate exactly the
elements we map: for each resource type a path specification (specs.py) is walked through the R4B
model classes, and every element's JSON name, cardinality (required, list), nested element type and
primitive type is read from those classes. Primitives keep R4B's own rules (the regular expressions of
`fhir_core.types`, strict JSON types: a decimal must be a JSON number, a string a JSON string). The
result is a `TypeAdapter` over a `TypedDict`, validated in pydantic-core (Rust) straight from the JSON
bytes, which returns a dict holding only the mapped elements.

Two R4 rules are checked later, where the values are converted: that a date is a real calendar date
(2024-02-30 matches the dateTime pattern) and that a reference points to a resource of the right type.
The full R4B models are still used for the detailed message of a quarantined record and for
`--full-validation`.
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Annotated, Any, Literal, NotRequired, Required

import fhir_core.types as fhir_types
from annotated_types import MaxLen, MinLen
from fhir.resources.R4B import get_fhir_model_class
from pydantic import AfterValidator, Strict, StringConstraints, TypeAdapter
from typing_extensions import TypedDict

Spec = dict[str, "Spec | bool"]


def _anchored(pattern: str) -> str:
    pattern = pattern if pattern.startswith("^") else "^" + pattern
    return pattern if pattern.endswith("$") else pattern + "$"


# Each FHIR primitive as a fast pydantic type with R4B's own constraints.
_STRICT_STR = Annotated[str, Strict(), StringConstraints(min_length=1)]
_PRIMITIVES: dict[str, Any] = {
    "Code": Annotated[str, Strict(), fhir_types.Code()],
    "Id": Annotated[str, Strict(), StringConstraints(pattern=_anchored(fhir_types.Id.pattern)), MaxLen(64)],
    "DateTime": Annotated[str, Strict(), StringConstraints(pattern=_anchored(fhir_types.DateTime.pattern.pattern))],
    "Date": Annotated[str, Strict(), StringConstraints(pattern=_anchored(fhir_types.Date.pattern.pattern))],
    "Instant": Annotated[str, Strict(), StringConstraints(pattern=_anchored(fhir_types.Instant.pattern.pattern))],
    "Decimal": Annotated[float, Strict()],
    "Integer": Annotated[int, Strict()],
    "PositiveInt": Annotated[int, Strict()],
    "UnsignedInt": Annotated[int, Strict()],
    "Boolean": Annotated[bool, Strict()],
    "String": _STRICT_STR,
    "Markdown": _STRICT_STR,
    "Uri": Annotated[str, Strict(), StringConstraints(pattern=r"^\S+$")],
    "Url": Annotated[str, Strict(), StringConstraints(pattern=r"^\S+$")],
    "Canonical": Annotated[str, Strict(), StringConstraints(pattern=r"^\S+$")],
    "Oid": Annotated[str, Strict(), StringConstraints(pattern=r"^urn:oid:[0-2](\.(0|[1-9][0-9]*))+$")],
    "Uuid": Annotated[
        str, Strict(), StringConstraints(pattern=r"^urn:uuid:[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$")
    ],
}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip Optional and List from an R4B annotation; return (element type, is_list)."""
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        elif origin in (list, typing.List):  # noqa: UP006 - R4B annotations use typing.List
            is_list = True
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, is_list


def _primitive(annotation: Any) -> Any | None:
    if annotation is bool:  # R4B declares FHIR boolean as a plain bool
        return _PRIMITIVES["Boolean"]
    if typing.get_origin(annotation) is Annotated:
        for meta in typing.get_args(annotation)[1:]:
            name = type(meta).__name__
            if name in _PRIMITIVES:
                return _PRIMITIVES[name]
        raise TypeError(f"unsupported FHIR primitive {annotation!r}")
    return None


def _element_class(annotation: Any) -> type:
    name = getattr(annotation, "__name__", "")
    if not name.endswith("Type"):
        raise TypeError(f"unexpected R4B element annotation {annotation!r}")
    return get_fhir_model_class(name[: -len("Type")])


def _fields_by_json_name(model: type) -> dict[str, Any]:
    return {(info.alias or name): info for name, info in model.model_fields.items()}


def _one_of(groups: list[tuple[str, ...]]) -> Any:
    """An after-validator: each required choice group ([x] element) has a value."""

    def check(value: dict) -> dict:
        for group in groups:
            if not any(member in value for member in group):
                raise ValueError(f"one of {', '.join(group)} is required")
        return value

    return AfterValidator(check)


def _typed_dict(model: type, spec: Spec, name: str) -> Any:
    fields = _fields_by_json_name(model)
    members: dict[str, Any] = {}
    choice_groups: dict[str, list[str]] = {}
    for json_name, info in fields.items():
        extra = info.json_schema_extra or {}
        if extra.get("one_of_many_required"):
            choice_groups.setdefault(extra["one_of_many"], []).append(json_name)
    for element, sub_spec in spec.items():
        info = fields.get(element)
        if info is None:
            raise KeyError(f"{model.__name__} has no element '{element}' in FHIR R4 (R4B models)")
        inner, is_list = _unwrap(info.annotation)
        kind = _primitive(inner)
        if kind is None:
            if sub_spec is True:
                raise ValueError(f"{model.__name__}.{element} is complex; say which of its elements are mapped")
            kind = _typed_dict(_element_class(inner), sub_spec, f"{name}_{element}")
        elif sub_spec is not True:
            raise ValueError(f"{model.__name__}.{element} is a primitive; map it with True")
        extra = info.json_schema_extra or {}
        required = info.is_required() or bool(extra.get("element_required"))
        if is_list:
            kind = Annotated[list[kind], MinLen(1)]  # FHIR forbids empty arrays
        members[element] = Required[kind] if required else NotRequired[kind]
    body = TypedDict(name, members)  # type: ignore[operator]
    # A required choice ([x]) is enforced when every alternative is mapped; otherwise an unmapped
    # alternative may be the one present, and the mapper decides what is missing.
    enforced = [tuple(group) for group in choice_groups.values() if all(member in spec for member in group)]
    return Annotated[body, _one_of(enforced)] if enforced else body


@cache
def _cached(resource_type: str, frozen_spec: tuple) -> TypeAdapter:
    spec = _thaw(frozen_spec)
    model = get_fhir_model_class(resource_type)
    full_spec = {**spec}
    body = _typed_dict(model, full_spec, f"Lean{resource_type}")
    validators = []
    if typing.get_origin(body) is Annotated:
        body, *validators = typing.get_args(body)
    members = dict(body.__annotations__)
    members["resourceType"] = Required[Literal[resource_type]]  # type: ignore[valid-type]
    members.setdefault("id", Required[_PRIMITIVES["Id"]])
    resource = TypedDict(f"Lean{resource_type}Resource", members)  # type: ignore[operator]
    return TypeAdapter(Annotated[resource, *validators] if validators else resource)


def _freeze(spec: Spec) -> tuple:
    return tuple(sorted((k, _freeze(v) if isinstance(v, dict) else v) for k, v in spec.items()))


def _thaw(frozen: tuple) -> Spec:
    return {k: _thaw(v) if isinstance(v, tuple) else v for k, v in frozen}


def lean_validator(resource_type: str, spec: Spec) -> TypeAdapter:
    """A validator for `resource_type` that checks the elements in `spec` by the R4B definitions.

    `spec` maps element JSON names to True (a primitive) or to the spec of a complex element. Every
    resource also needs `resourceType` and an `id` (our keys are built from it).
    """
    return _cached(resource_type, _freeze(spec))
