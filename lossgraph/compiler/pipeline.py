"""The compiler: named passes over the loss graph, called in order by `analyze`.

Validation passes come first and collect every problem of the document; the planning passes (which
list the terms of each head and fuse them into kernels) run only on a graph without errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import Diagnostic
from ..spec.models import LossGraphSpec
from . import passes
from .fusion import plan_fusion
from .passes import CompileContext
from .plan import build_plan

Pass = Callable[[CompileContext], None]


def plan_terms(ctx: CompileContext) -> None:
    """Resolve targets and group the terms by head (only for a graph without errors)."""
    if not ctx.errors:
        ctx.plan = build_plan(ctx.spec)


def fuse_heads(ctx: CompileContext) -> None:
    """Group each head's terms into fused kernel launches (only when the terms were planned)."""
    if ctx.plan is not None:
        ctx.fusion = plan_fusion(ctx.plan)


PASSES: tuple[tuple[str, Pass], ...] = (
    ("check_names", passes.check_names),
    ("build_graph", passes.build_graph),
    ("check_source_cycles", passes.check_source_cycles),
    ("check_source_kinds", passes.check_source_kinds),
    ("check_source_fields", passes.check_source_fields),
    ("check_target_kinds", passes.check_target_kinds),
    ("check_positions", passes.check_positions),
    ("check_offsets", passes.check_offsets),
    ("check_vocab_sizes", passes.check_vocab_sizes),
    ("check_loss_fields", passes.check_loss_fields),
    ("warn_temperature_scaling", passes.warn_temperature_scaling),
    ("check_schedules", passes.check_schedules),
    ("warn_unused", passes.warn_unused),
    ("plan_terms", plan_terms),
    ("fuse_heads", fuse_heads),
)


def analyze(
    spec: LossGraphSpec, found: Sequence[Diagnostic] = (), pass_list: tuple[tuple[str, Pass], ...] = PASSES
) -> CompileContext:
    """Run the passes on `spec` in order; the context holds the graph, the diagnostics and the plan.

    `found` are problems the loader already found (broken node rules): the passes add theirs, and with
    errors among them nothing is planned."""
    ctx = CompileContext(spec=spec, source_map=spec.source_map, diagnostics=list(found))
    for _, run in pass_list:
        run(ctx)
    return ctx
