"""The compiler: named passes over the loss graph, run in order by `analyze`.

Validation passes come first and collect every problem of the document; the planning pass (which
fuses the terms of each head into kernels) runs only on a graph without errors.
"""

from __future__ import annotations

from collections.abc import Callable

from . import passes
from .passes import CompileContext
from .spec import LossGraphSpec

Pass = Callable[[CompileContext], None]

VALIDATION_PASSES: tuple[tuple[str, Pass], ...] = (
    ("check_names", passes.check_names),
    ("build_graph", passes.build_graph),
    ("check_source_cycles", passes.check_source_cycles),
    ("check_source_kinds", passes.check_source_kinds),
    ("check_mixture_weights", passes.check_mixture_weights),
    ("check_target_kinds", passes.check_target_kinds),
    ("check_offsets", passes.check_offsets),
    ("check_vocab_sizes", passes.check_vocab_sizes),
    ("check_weights", passes.check_weights),
    ("check_schedules", passes.check_schedules),
    ("warn_unused", passes.warn_unused),
)


def analyze(spec: LossGraphSpec, validation: tuple[tuple[str, Pass], ...] = VALIDATION_PASSES) -> CompileContext:
    """Run every validation pass on `spec`; the returned context holds the graph and all diagnostics."""
    ctx = CompileContext(spec=spec, source_map=spec.source_map)
    for _, run in validation:
        run(ctx)
    return ctx
