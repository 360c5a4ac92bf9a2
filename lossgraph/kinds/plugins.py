"""Plugins: Python modules that add loss and source kinds to every part of lossgraph.

A plugin is named like an entry point's value: `package.module` or `package.module:attribute`.
Loading it imports the module, then registers what it offers:

- a module registers the kinds in its `KINDS` (a sequence) or its `KIND`, and any it registers itself
  with `register_loss_kind` / `register_source_kind` while it is imported;
- `module:attribute` names a kind, a sequence of kinds, or a callable; a callable is called with no
  arguments and registers its kinds itself, or returns them.

A kind that is already registered as the same object is left as it is (a module named twice, or by
two routes); a different kind of the same name is a clash.

Three routes load plugins, in this order:

1. installed packages, through the entry-point group `lossgraph.kinds` (`[project.entry-points."lossgraph.kinds"]`
   in their pyproject.toml);
2. the environment variable `LOSSGRAPH_PLUGINS=mod1,mod2`;
3. the command line's `--plugin MODULE` (`lossgraph --plugin MODULE COMMAND ...`).

The first two load once per process, before the registries are first read (`registry.before_first_read`):
the first document loaded, the schema or the docs. `import lossgraph` does not load them. A plugin that
cannot be imported, or registers a name that is taken, raises `PluginError`, which names the plugin and
the route that loaded it; the command line prints it and exits with code 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import PluginError
from . import registry
from .loss import LossKind
from .source import SourceKind

ENTRY_POINT_GROUP = "lossgraph.kinds"
ENVIRONMENT = "LOSSGRAPH_PLUGINS"
COMMAND_LINE = "--plugin"
BUILT_IN = "built in"


@dataclass(frozen=True)
class RegisteredKind:
    """A row of `lossgraph kinds`: a registered kind and where it came from."""

    name: str
    family: str  # "loss" or "source"
    origin: str


def registered_kinds() -> list[RegisteredKind]:
    """Every registered kind, losses first, each in registration order, with its origin."""
    rows = [
        RegisteredKind(kind.name, "loss", registry.kind_origin("loss", kind.name)) for kind in registry.loss_kinds()
    ]
    rows += [
        RegisteredKind(kind.name, "source", registry.kind_origin("source", kind.name))
        for kind in registry.source_kinds()
    ]
    return rows


def load_plugin(target: str, route: str, origin: str | None = None) -> None:
    """Load one plugin (`module` or `module:attribute`). `route` says how it was named, for errors
    ("--plugin", "LOSSGRAPH_PLUGINS", "entry point NAME of DIST"); `origin` is what its kinds show as
    their origin (default: the route and the plugin)."""
    origin = origin or f"{route} {target}"
    where = f"plugin {target!r} (from {route})"
    module_name, _, attribute = target.strip().partition(":")
    if not module_name:
        raise PluginError(f"{where}: empty module name; write MODULE or MODULE:ATTRIBUTE")
    fresh = module_name not in sys.modules
    before = len(_names())
    with registry.registering_as(origin):
        try:
            module = importlib.import_module(module_name)
        except PluginError:
            raise
        except Exception as exc:  # an ImportError, or anything the module raises while it runs
            raise PluginError(f"{where} cannot be imported: {type(exc).__name__}: {exc}") from exc
        if attribute:
            try:
                offered: Any = module
                for part in attribute.split("."):
                    offered = getattr(offered, part)
            except AttributeError:
                raise PluginError(f"{where}: module {module_name!r} has no attribute {attribute!r}") from None
            if callable(offered) and not isinstance(offered, (LossKind, SourceKind)):
                try:
                    offered = offered()
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"{where}: calling {attribute} raised {type(exc).__name__}: {exc}") from exc
        else:
            offered = getattr(module, "KINDS", getattr(module, "KIND", None))
        kinds = _kinds(offered, where)
        for kind in kinds:
            _register(kind, where)
    if fresh and not kinds and len(_names()) == before:
        raise PluginError(
            f"{where} registers no kinds: define KIND or KINDS in it, register them when it is imported, "
            "or name a callable that does (MODULE:FUNCTION)"
        )


def _names() -> list[tuple[str, str]]:
    """(family, name) of every registered kind."""
    return [("loss", kind.name) for kind in registry.loss_kinds()] + [
        ("source", kind.name) for kind in registry.source_kinds()
    ]


def _kinds(offered: Any, where: str) -> list[LossKind | SourceKind]:
    if offered is None:
        return []
    if isinstance(offered, (LossKind, SourceKind)):
        return [offered]
    if isinstance(offered, Iterable) and not isinstance(offered, (str, bytes)):
        kinds = list(offered)
        wrong = [item for item in kinds if not isinstance(item, (LossKind, SourceKind))]
        if not wrong:
            return kinds
        offered = wrong[0]
    raise PluginError(f"{where} offers {offered!r}, which is not a LossKind or a SourceKind")


def _register(kind: LossKind | SourceKind, where: str) -> None:
    if isinstance(kind, LossKind):
        family, registered, register = "loss", registry._LOSS_KINDS, registry.register_loss_kind
    else:
        family, registered, register = "source", registry._SOURCE_KINDS, registry.register_source_kind
    if registered.get(kind.name) is kind:
        return  # the same kind, named again (by another route, or a second time)
    if kind.name in registered:
        origin = registry.kind_origin(family, kind.name)
        raise PluginError(
            f"{where} registers the {family} kind {kind.name!r}, but a {family} kind of that name is already "
            f"registered ({origin}); rename one of them"
        )
    register(kind)


def load_plugins(targets: Iterable[str], route: str) -> None:
    """Load several plugins named by one route, in order."""
    for target in targets:
        if target.strip():
            load_plugin(target, route)


def environment_plugins() -> list[str]:
    """The modules of LOSSGRAPH_PLUGINS (comma-separated; blanks are ignored)."""
    return [name.strip() for name in os.environ.get(ENVIRONMENT, "").split(",") if name.strip()]


def load_entry_points() -> None:
    """Load the plugins of installed packages (the `lossgraph.kinds` entry-point group)."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = entry.dist.name if entry.dist is not None else "an unknown distribution"
        load_plugin(entry.value, f"entry point {entry.name!r} of {dist}", f"entry point {dist} ({entry.value})")


def load(command_line: Iterable[str] = ()) -> None:
    """Load every plugin now: the installed ones and LOSSGRAPH_PLUGINS (if not loaded yet), then the
    command line's `--plugin` modules. The command line calls this before a command runs."""
    registry.loss_kinds()  # the first read loads the installed plugins
    load_plugins(command_line, COMMAND_LINE)


def load_installed() -> None:
    """The plugins that load by themselves: installed packages' entry points, then LOSSGRAPH_PLUGINS."""
    load_entry_points()
    load_plugins(environment_plugins(), ENVIRONMENT)
