"""The one registry of twin kinds, by the `model.kind` a study names.

Each kind module registers its kind when imported; `kind_of` (and `KINDS` through the package's front
door) imports every module of KIND_MODULES first, so every kind is known as soon as one is asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federation.twins.kind import TwinKind

KIND_MODULES = ("federation.twins.risk", "federation.twins.survival", "federation.twins.trajectory")
KINDS: dict[str, TwinKind] = {}


def register(kind: TwinKind) -> TwinKind:
    """Add a kind; a second kind of the same name is a programming error, refused."""
    if kind.name in KINDS:
        raise ValueError(f"twin kind '{kind.name}' is registered twice")
    if kind.spec_type.model_fields["kind"].default != kind.name:
        raise ValueError(f"twin kind '{kind.name}' declares a spec of another kind")
    KINDS[kind.name] = kind
    return kind


def load_kinds() -> dict[str, TwinKind]:
    """Import every kind module (each registers its kinds; a second import is free)."""
    for module in KIND_MODULES:
        import_module(module)
    return KINDS


def kind_of(spec_or_name: object) -> TwinKind:
    """The kind of a study's model section (or of a kind name)."""
    name = spec_or_name if isinstance(spec_or_name, str) else getattr(spec_or_name, "kind", None)
    kind = load_kinds().get(name)  # type: ignore[arg-type]
    if kind is None:
        raise ValueError(f"unknown twin model kind '{name}'; known: {', '.join(sorted(KINDS))}")
    return kind
