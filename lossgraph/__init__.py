"""lossgraph: declarative loss graphs for language-model training, fused into one kernel per head.

The names below are imported lazily, so that `import lossgraph` (and the CLI's `validate`) stays
cheap and never imports torch or triton until a runtime feature is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "lossgraph.document",
    "loads": "lossgraph.document",
    "check_text": "lossgraph.document",
    "check_file": "lossgraph.document",
    "LossGraphSpec": "lossgraph.spec.models",
    "LossGraphError": "lossgraph.errors",
    "ConfigError": "lossgraph.errors",
    "InputError": "lossgraph.errors",
    "BackendError": "lossgraph.errors",
    "SourceFileError": "lossgraph.errors",
    "PluginError": "lossgraph.errors",
    "KindError": "lossgraph.errors",
    "LossGraphWarning": "lossgraph.errors",
    "Diagnostic": "lossgraph.errors",
    "compile": "lossgraph.runtime.compiled",
    "CompiledGraph": "lossgraph.runtime.compiled",
    "GraphOutput": "lossgraph.runtime.compiled",
    "BackendOptions": "lossgraph.runtime.backend",
    "TopK": "lossgraph.runtime.inputs",
    "Linear": "lossgraph.runtime.inputs",
    "Rollout": "lossgraph.kinds.sources.rollout",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .document import check_file, check_text, load, loads
    from .errors import (
        BackendError,
        ConfigError,
        Diagnostic,
        InputError,
        KindError,
        LossGraphError,
        LossGraphWarning,
        PluginError,
        SourceFileError,
    )
    from .kinds.sources.rollout import Rollout
    from .runtime.backend import BackendOptions
    from .runtime.compiled import CompiledGraph, GraphOutput, compile
    from .runtime.inputs import Linear, TopK
    from .spec.models import LossGraphSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lossgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
