"""The registries of loss kinds, source kinds and leaf target forms: name -> kind (or form). The built-in
kinds are registered by `lossgraph.kinds`; a plugin (or a test) registers its own with
`register_loss_kind` or `register_source_kind`, and a leaf form with `register_leaf_form`. The spec
rebuilds its unions of models after each change.

Each kind keeps where it came from (`kind_origin`): built in, a plugin (`lossgraph.kinds.plugins`
says which route), or Python. The first read of a registry runs the hooks of `before_first_read` once:
`lossgraph.kinds` hooks the loading of installed plugins there, so they load when a document, the
schema or the docs first need the kinds, not when `lossgraph` is imported."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import LossGraphError

if TYPE_CHECKING:
    from .form import LeafForm
    from .loss import LossKind
    from .source import SourceKind

_LOSS_KINDS: dict[str, LossKind] = {}
_SOURCE_KINDS: dict[str, SourceKind] = {}
_LEAF_FORMS: dict[str, LeafForm] = {}
_LISTENERS: list[Callable[[], None]] = []
_ORIGINS: dict[tuple[str, str], str] = {}  # ("loss" | "source", name) -> where the kind came from
_BEFORE_READ: list[Callable[[], None]] = []
_registering_as = "Python"  # the origin given to kinds registered now
_reading = False  # a hook is running: its own reads do not run the hooks again
_deferred = 0  # inside `hooks_deferred`: reads do not run the hooks yet

PYTHON = "Python"  # the origin of a kind registered by a program's own call


@contextmanager
def registering_as(origin: str) -> Iterator[None]:
    """Kinds registered inside this block come from `origin` (a plugin, the built-ins)."""
    global _registering_as
    previous, _registering_as = _registering_as, origin
    try:
        yield
    finally:
        _registering_as = previous


def before_first_read(hook: Callable[[], None]) -> None:
    """Run `hook` before the registries are first read. A hook that raises stays pending and runs (and
    raises) again at the next read, so a broken plugin fails every use, not only the first."""
    _BEFORE_READ.append(hook)


@contextmanager
def hooks_deferred() -> Iterator[None]:
    """Reads inside this block do not run the hooks: for a module that reads the registries while it is
    imported and runs them itself once it is whole (spec.models: a plugin may import it)."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


def _read() -> None:
    global _reading
    if _reading or _deferred or not _BEFORE_READ:
        return
    _reading = True
    try:
        while _BEFORE_READ:
            _BEFORE_READ[0]()
            _BEFORE_READ.pop(0)
    finally:
        _reading = False


def kind_origin(family: str, name: str) -> str:
    """Where the `family` ("loss" or "source") kind `name` came from: "built in", a plugin, "Python"."""
    return _ORIGINS[(family, name)]


def _changed() -> None:
    for listener in _LISTENERS:
        listener()


def register_loss_kind(kind: LossKind) -> None:
    """Add a loss kind: the loader, the compiler, both backends and the docs pick it up by name."""
    if kind.name in _LOSS_KINDS:
        origin = _ORIGINS[("loss", kind.name)]
        raise LossGraphError(f"loss kind {kind.name!r} is already registered ({origin}); pick another name")
    _LOSS_KINDS[kind.name] = kind
    _ORIGINS[("loss", kind.name)] = _registering_as
    _changed()


def unregister_loss_kind(name: str) -> None:
    """Remove a registered loss kind (for tests and plugins that are unloaded)."""
    del _LOSS_KINDS[name]
    del _ORIGINS[("loss", name)]
    _changed()


def register_source_kind(kind: SourceKind) -> None:
    """Add a source kind (its model, rules and plan target)."""
    if kind.name in _SOURCE_KINDS:
        origin = _ORIGINS[("source", kind.name)]
        raise LossGraphError(f"source kind {kind.name!r} is already registered ({origin}); pick another name")
    _SOURCE_KINDS[kind.name] = kind
    _ORIGINS[("source", kind.name)] = _registering_as
    _changed()


def unregister_source_kind(name: str) -> None:
    """Remove a registered source kind."""
    del _SOURCE_KINDS[name]
    del _ORIGINS[("source", name)]
    _changed()


def register_leaf_form(form: LeafForm) -> None:
    """Add a leaf target form (`form.LeafForm`): the targets whose `form` is its name reach the run-time
    checks, both backends and the vocab-parallel split through it."""
    if form.name in _LEAF_FORMS:
        raise LossGraphError(f"leaf form {form.name!r} is already registered; pick another name")
    _LEAF_FORMS[form.name] = form


def unregister_leaf_form(name: str) -> None:
    """Remove a registered leaf form."""
    del _LEAF_FORMS[name]


def leaf_form(name: str) -> LeafForm:
    """The registered leaf form called `name` (a leaf target's `form`)."""
    _read()
    try:
        return _LEAF_FORMS[name]
    except KeyError:
        known = ", ".join(_LEAF_FORMS)
        raise LossGraphError(
            f"no leaf form {name!r} is registered (known: {known}); register it with register_leaf_form"
        ) from None


def loss_kind(name: str) -> LossKind:
    """The registered loss kind called `name` (the `type:` of a loss node)."""
    _read()
    return _LOSS_KINDS[name]


def loss_kinds() -> tuple[LossKind, ...]:
    """Every registered loss kind, built-in ones first, in registration order."""
    _read()
    return tuple(_LOSS_KINDS.values())


def source_kind(name: str) -> SourceKind:
    """The registered source kind called `name` (the `type:` of a source)."""
    _read()
    return _SOURCE_KINDS[name]


def source_kinds() -> tuple[SourceKind, ...]:
    """Every registered source kind, in registration order."""
    _read()
    return tuple(_SOURCE_KINDS.values())


def on_kinds_changed(listener: Callable[[], None]) -> None:
    """Call `listener` after each registration change (the spec rebuilds its unions of models)."""
    _LISTENERS.append(listener)
