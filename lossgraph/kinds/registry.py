"""The registries of loss kinds and source kinds: name -> kind. The built-in kinds are registered by
`lossgraph.kinds`; a plugin (or a test) registers its own with `register_loss_kind` or
`register_source_kind`. The spec rebuilds its unions of models after each change."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import LossGraphError

if TYPE_CHECKING:
    from .loss import LossKind
    from .source import SourceKind

_LOSS_KINDS: dict[str, LossKind] = {}
_SOURCE_KINDS: dict[str, SourceKind] = {}
_LISTENERS: list[Callable[[], None]] = []


def _changed() -> None:
    for listener in _LISTENERS:
        listener()


def register_loss_kind(kind: LossKind) -> None:
    """Add a loss kind: the loader, the compiler, both backends and the docs pick it up by name."""
    if kind.name in _LOSS_KINDS:
        raise LossGraphError(f"loss kind {kind.name!r} is already registered; pick another name")
    _LOSS_KINDS[kind.name] = kind
    _changed()


def unregister_loss_kind(name: str) -> None:
    """Remove a registered loss kind (for tests and plugins that are unloaded)."""
    del _LOSS_KINDS[name]
    _changed()


def register_source_kind(kind: SourceKind) -> None:
    """Add a source kind (its model, rules and plan target)."""
    if kind.name in _SOURCE_KINDS:
        raise LossGraphError(f"source kind {kind.name!r} is already registered; pick another name")
    _SOURCE_KINDS[kind.name] = kind
    _changed()


def unregister_source_kind(name: str) -> None:
    """Remove a registered source kind."""
    del _SOURCE_KINDS[name]
    _changed()


def loss_kind(name: str) -> LossKind:
    """The registered loss kind called `name` (the `type:` of a loss node)."""
    return _LOSS_KINDS[name]


def loss_kinds() -> tuple[LossKind, ...]:
    """Every registered loss kind, built-in ones first, in registration order."""
    return tuple(_LOSS_KINDS.values())


def source_kind(name: str) -> SourceKind:
    """The registered source kind called `name` (the `type:` of a source)."""
    return _SOURCE_KINDS[name]


def source_kinds() -> tuple[SourceKind, ...]:
    """Every registered source kind, in registration order."""
    return tuple(_SOURCE_KINDS.values())


def on_kinds_changed(listener: Callable[[], None]) -> None:
    """Call `listener` after each registration change (the spec rebuilds its unions of models)."""
    _LISTENERS.append(listener)
