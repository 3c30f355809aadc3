"""The one registry of twin kinds, by the `model.kind` a study names.

Each kind module registers its kind when imported; the package's front door imports them all, so
`kind_of` knows every kind as soon as `federation.twins` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federation.twins.kind import TwinKind

KINDS: dict[str, TwinKind] = {}


def register(kind: TwinKind) -> TwinKind:
    """Add a kind; a second kind of the same name is a programming error, refused."""
    if kind.name in KINDS:
        raise ValueError(f"twin kind '{kind.name}' is registered twice")
    if kind.spec_type.model_fields["kind"].default != kind.name:
        raise ValueError(f"twin kind '{kind.name}' declares a spec of another kind")
    KINDS[kind.name] = kind
    return kind


def kind_of(spec_or_name: object) -> TwinKind:
    """The kind of a study's model section (or of a kind name)."""
    name = spec_or_name if isinstance(spec_or_name, str) else getattr(spec_or_name, "kind", None)
    kind = KINDS.get(name)  # type: ignore[arg-type]
    if kind is None:
        raise ValueError(f"unknown twin model kind '{name}'; known: {', '.join(sorted(KINDS))}")
    return kind
