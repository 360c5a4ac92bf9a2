"""Graph build and validation passes.

Each pass is a small function over a `CompileContext`: it reads the spec and the source graph and
appends located diagnostics. `lossgraph.compiler.pipeline.PASSES` runs them in order. A pass never stops at the
first problem, so a user sees every error of a file at once; passes that need a resolved reference
skip what an earlier pass already reported as unresolved.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import Diagnostic, quote, shorten
from ..kinds import TargetFacts, loss_kind, source_kind
from ..spec.models import (
    MAX_MIXTURE_PARTS,
    ConstantSchedule,
    LossGraphSpec,
)
from ..spec.schedules import fixed_at_one
from ..spec.sourcemap import Path, SourceMap, dotted
from ..spec.suggest import did_you_mean
from .graph import SourceGraph


@dataclass
class CompileContext:
    """What the passes share: the spec, where its parts were written, the graph and the findings."""

    spec: LossGraphSpec
    source_map: SourceMap
    graph: SourceGraph | None = None  # which sources read which, stored by build_graph
    diagnostics: list[Diagnostic] = field(default_factory=list)
    plan: object | None = None  # the terms of each head (lossgraph.compiler.plan.Plan), set by plan_terms
    fusion: object | None = None  # the kernel launches (lossgraph.compiler.fusion.FusionPlan), set by plan_fusion

    def error(self, path: Path, message: str, *, key: bool = False) -> None:
        self.diagnostics.append(self.source_map.diagnostic(path, message, key=key))

    def warn(self, path: Path, message: str, *, key: bool = False) -> None:
        self.diagnostics.append(self.source_map.diagnostic(path, message, severity="warning", key=key))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]


# A message lists at most this many declared names (a file may declare thousands).
_MAX_LISTED_NAMES = 12


def _names(names: list[str]) -> str:
    """Declared names as a message lists them: the first few, each cut to a readable length."""
    listed = ", ".join(shorten(name) for name in names[:_MAX_LISTED_NAMES]) or "none"
    more = len(names) - _MAX_LISTED_NAMES
    return f"{listed} and {more} more" if more > 0 else listed


def _line(ctx: CompileContext, path: Path) -> int:
    where = ctx.source_map.locate(path, key=True)
    return where[0] if where else 0


# --------------------------------------------------------------------------------------------------
# Names and references.
# --------------------------------------------------------------------------------------------------


def check_names(ctx: CompileContext) -> None:
    """A name may denote one thing only: heads, sources and losses share one namespace."""
    owners: dict[str, tuple[str, Path]] = {}
    sections = [("head", "heads"), ("source", "sources"), ("loss", "losses")]
    entries = [(kind, (section, name)) for kind, section in sections for name in getattr(ctx.spec, section)]
    entries.sort(key=lambda entry: _line(ctx, entry[1]))
    for kind, path in entries:
        name = path[1]
        if name in owners:
            other_kind, other_path = owners[name]
            ctx.error(
                path,
                f"name {quote(name)} is already used by the {other_kind} at {dotted(other_path)}; "
                "heads, sources and losses need distinct names",
                key=True,
            )
        else:
            owners[name] = (kind, path)


def _reference(ctx: CompileContext, path: Path, name: str, wanted: str, section: str, others: dict[str, str]) -> bool:
    """Report an unresolved reference to a `wanted` ('head' or 'source'); True when it resolves."""
    if name in getattr(ctx.spec, section):
        return True
    if name in others:
        ctx.error(path, f"{quote(name)} is a {others[name]}, not a {wanted}")
        return False
    declared = list(getattr(ctx.spec, section))
    hint = did_you_mean(name, declared)
    ctx.error(path, f"unknown {wanted} {quote(name)}{hint} (declared {section}: {_names(declared)})")
    return False


def build_graph(ctx: CompileContext) -> None:
    """The source graph (stored in the context); every reference to a source or a head must resolve."""
    spec = ctx.spec
    ctx.graph = graph = SourceGraph(spec)
    kinds = {name: "head" for name in spec.heads}
    kinds.update({name: "source" for name in spec.sources})
    kinds.update({name: "loss" for name in spec.losses})
    not_sources = {n: k for n, k in kinds.items() if k != "source"}
    not_heads = {n: k for n, k in kinds.items() if k != "head"}

    for name in spec.sources:
        for member in graph.members(name):
            _reference(ctx, ("sources", name, *member.path), member.name, "source", "sources", not_sources)

    for name, loss in spec.losses.items():
        target = getattr(loss, "target", None)
        if target is not None:
            _reference(ctx, ("losses", name, "target"), target, "source", "sources", not_sources)
        seen: set[str] = set()
        for index, head in enumerate(loss.heads):
            path = ("losses", name, "heads", index)
            if head in seen:
                ctx.error(path, f"head {quote(head)} is listed twice; list each head once")
                continue
            seen.add(head)
            _reference(ctx, path, head, "head", "heads", not_heads)


def _graph(ctx: CompileContext) -> SourceGraph:
    """The source graph that build_graph stored (built here for a pass that runs without it)."""
    if ctx.graph is None:
        ctx.graph = SourceGraph(ctx.spec)
    return ctx.graph


# --------------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------------


def check_source_cycles(ctx: CompileContext) -> None:
    """Derived sources (label_smoothing, mixture) must form a DAG; one cycle is reported per knot."""
    for names in _graph(ctx).cycles(first=lambda name: _line(ctx, ("sources", name))):
        cycle = " -> ".join(shorten(name) for name in [*names, names[0]])
        message = f"sources form a cycle: {cycle}; a derived source cannot depend on itself"
        ctx.error(("sources", names[0]), message, key=True)


def mixture_parts(graph: SourceGraph) -> dict[str, int]:
    """How many leaf distributions each source is a tree of, once nested mixtures are expanded."""
    parts: dict[str, int] = {}
    for current in graph.postorder():
        members = graph.members(current)
        # Unknown members and members on a cycle (not counted yet) are reported elsewhere.
        parts[current] = sum(parts.get(m.name, 0) for m in members) if members else 1
    return parts


def check_source_kinds(ctx: CompileContext) -> None:
    """One labels source at most; each source against the sources it reads (its kind's rules); mixtures
    expand to a bounded number of leaves."""
    spec, graph = ctx.spec, _graph(ctx)
    labels = [name for name, s in spec.sources.items() if source_kind(s.type).provides_labels]
    for extra in sorted(labels, key=lambda n: _line(ctx, ("sources", n)))[1:]:
        ctx.error(
            ("sources", extra),
            f"a graph reads one labels tensor, and {quote(labels[0])} already declares it; "
            "refer to that source instead",
            key=True,
        )
    for name, source in spec.sources.items():
        for path, message in source_kind(source.type).check(name, source, spec):
            ctx.error(("sources", name, *path), message)
    parts = mixture_parts(graph)
    for name in spec.sources:
        # Report the mixtures that cross the bound, not every mixture that contains one of them.
        inner = (parts.get(member.name, 0) for member in graph.members(name))
        if parts[name] > MAX_MIXTURE_PARTS and all(count <= MAX_MIXTURE_PARTS for count in inner):
            ctx.error(
                ("sources", name, "sources"),
                f"mixture {quote(name)} expands to {parts[name]} teacher and label distributions through the "
                f"mixtures it contains; at most {MAX_MIXTURE_PARTS}: mix fewer sources, or mix the teachers directly",
            )


def check_source_fields(ctx: CompileContext) -> None:
    """Each source's own fields against each other (its kind's rules: mixture weights sum to 1)."""
    for name, source in ctx.spec.sources.items():
        for path, message in source_kind(source.type).check_fields(name, source):
            ctx.error(("sources", name, *path), message)


# --------------------------------------------------------------------------------------------------
# Losses against their targets and heads.
# --------------------------------------------------------------------------------------------------


def _bindings(ctx: CompileContext) -> Iterator[tuple[str, object, int, str]]:
    """(loss name, loss spec, index in heads, head name) for every head reference that resolves."""
    for name, loss in ctx.spec.losses.items():
        for index, head in enumerate(loss.heads):
            if head in ctx.spec.heads:
                yield name, loss, index, head


def zero_mass_reason(graph: SourceGraph, name: str) -> str | None:
    """Why the distribution of a source is exactly zero on some tokens, or None when it never is."""
    spec = graph.spec
    reasons: dict[str, str | None] = {}
    for current in graph.postorder(name):
        source = spec.sources[current]
        reasons[current] = source_kind(source.type).zero_mass_reason(current, source, reasons, spec)
    return reasons.get(name)


def check_target_kinds(ctx: CompileContext) -> None:
    """Each loss kind against the kind of its target."""
    spec = ctx.spec
    for name, loss in spec.losses.items():
        target = getattr(loss, "target", None)
        source = spec.sources.get(target) if target else None
        if source is None:
            continue
        for field_name, message in source_kind(source.type).check_loss(target, source, loss):
            ctx.error(("losses", name, field_name), message)
        if getattr(loss, "teacher_temperature", None) is not None:
            reads_teacher = any(
                source_kind(spec.sources[leaf].type).is_teacher for leaf, _ in _graph(ctx).leaf_inputs(target)
            )
            if not reads_teacher:
                ctx.error(
                    ("losses", name, "teacher_temperature"),
                    f"target {quote(target)} reads no teacher (labels and label smoothing have no temperature), "
                    "so teacher_temperature has nothing to scale; remove it, or target a teacher",
                )
        kind = source_kind(source.type)
        facts = TargetFacts(
            target, kind.provides_labels, zero_mass_reason(_graph(ctx), target), kind.label_distribution, source.type
        )
        for field_name, message in loss_kind(loss.type).check_target(facts, loss):
            ctx.error(("losses", name, field_name), message)


def reads_labels(graph: SourceGraph, target: str) -> bool:
    """The source reads the labels (a labels source, label smoothing, a mixture with either)."""
    spec = graph.spec
    return any(source_kind(spec.sources[leaf].type).provides_labels for leaf, _ in graph.leaf_inputs(target))


def check_positions(ctx: CompileContext) -> None:
    """`positions: all` takes positions without a label: a loss whose target reads labels cannot."""
    for name, loss in ctx.spec.losses.items():
        target = getattr(loss, "target", None)
        if loss.positions != "all" or target is None or target not in ctx.spec.sources:
            continue
        if reads_labels(_graph(ctx), target):
            ctx.error(
                ("losses", name, "positions"),
                f"positions: all takes every position, but target {quote(target)} reads the labels, which "
                "only the head's targets have; use positions: targets (the default), or a named mask "
                "(positions: {mask: NAME}), which keeps the positions that have a label",
            )


def check_offsets(ctx: CompileContext) -> None:
    """A teacher predicts one offset; it can only target heads of that offset."""
    spec, graph = ctx.spec, _graph(ctx)
    for name, loss, index, head in _bindings(ctx):
        target = getattr(loss, "target", None)
        if target is None:
            continue
        head_offset = spec.heads[head].offset
        for leaf, parent in graph.leaf_inputs(target):
            source = spec.sources[leaf]
            if source_kind(source.type).is_teacher and source.offset != head_offset:
                where = f" (through {quote(parent)})" if parent else ""
                ctx.error(
                    ("losses", name, "heads", index),
                    f"head {quote(head)} predicts token t+{head_offset}, but teacher {quote(leaf)}{where} predicts "
                    f"t+{source.offset}; bind this loss to heads of offset {source.offset}, or declare a "
                    f"teacher with offset: {head_offset}",
                )


def check_vocab_sizes(ctx: CompileContext) -> None:
    """Every head and teacher has a vocab size; teachers agree with the heads they target."""
    spec, graph = ctx.spec, _graph(ctx)
    for name in spec.heads:
        if spec.head_vocab(name) is None:
            ctx.error(("heads", name), "no vocab size: set vocab_size on this head or at the top level", key=True)
    for name, source in spec.sources.items():
        if source_kind(source.type).is_teacher and spec.source_vocab(name) is None:
            ctx.error(("sources", name), "no vocab size: set vocab_size on this source or at the top level", key=True)
    for name, loss, index, head in _bindings(ctx):
        target = getattr(loss, "target", None)
        head_vocab = spec.head_vocab(head)
        if target is None or head_vocab is None:
            continue
        for leaf, _ in graph.leaf_inputs(target):
            source = spec.sources[leaf]
            teacher_vocab = spec.source_vocab(leaf) if source_kind(source.type).is_teacher else None
            if teacher_vocab is None or teacher_vocab == head_vocab:
                continue
            path = ("losses", name, "heads", index)
            fix = "truncate" if teacher_vocab > head_vocab else "pad"
            if source.vocab_map is None:
                ctx.error(
                    path,
                    f"head {quote(head)} has vocab {head_vocab} but {quote(leaf)} has vocab {teacher_vocab}; "
                    f"set vocab_map: {fix} on source {quote(leaf)} or make the sizes agree",
                )
            elif source.vocab_map != fix:
                ctx.error(
                    path,
                    f"{quote(leaf)} uses vocab_map: {source.vocab_map}, but its vocab ({teacher_vocab}) is "
                    f"{'larger' if fix == 'truncate' else 'smaller'} than head {quote(head)}'s ({head_vocab}); "
                    f"use vocab_map: {fix}",
                )


# --------------------------------------------------------------------------------------------------
# Weights, temperatures and schedules.
# --------------------------------------------------------------------------------------------------


def check_loss_fields(ctx: CompileContext) -> None:
    """Each loss node's own fields against each other (its kind's rules: jsd's beta at 0 or 1)."""
    for name, loss in ctx.spec.losses.items():
        for field_name, message in loss_kind(loss.type).check_fields(loss):
            ctx.error(("losses", name, field_name), message)


def warn_temperature_scaling(ctx: CompileContext) -> None:
    """temperature_scaling at temperature 1 multiplies by 1: probably not what was meant. (The rules of
    a node's weight, head_weights and temperature are its fields' validators, in lossgraph.spec.nodes.)"""
    for name, loss in ctx.spec.losses.items():
        if getattr(loss, "temperature_scaling", False) and fixed_at_one(loss.temperature):
            ctx.warn(("losses", name, "temperature_scaling"), "temperature_scaling has no effect at temperature 1")


def check_schedules(ctx: CompileContext) -> None:
    """A schedule that never changes is probably a typo."""
    for name, loss in ctx.spec.losses.items():
        for field_name in ("weight", "temperature", "teacher_temperature"):
            value = getattr(loss, field_name, None)
            if value is None or isinstance(value, (int, float, ConstantSchedule)):
                continue
            if value.start == value.end:
                ctx.warn(
                    ("losses", name, field_name),
                    f"{value.schedule} schedule goes from {value.start:g} to the same value; write the number instead",
                )


# --------------------------------------------------------------------------------------------------
# Things declared but not used.
# --------------------------------------------------------------------------------------------------


def warn_unused(ctx: CompileContext) -> None:
    """Sources no loss reads and heads no loss binds are probably mistakes (warnings). A `labels` source
    is always used: the positions whose label is its ignore_index take no loss, on every head (JSD against
    a teacher, masked where there is no label, reads the labels only so)."""
    spec, graph = ctx.spec, _graph(ctx)
    used = {source for name in spec.losses for source in graph.loss_sources(name)}
    for name, source in spec.sources.items():
        if name not in used and not source_kind(source.type).provides_labels:
            ctx.warn(("sources", name), f"source {quote(name)} is not used by any loss", key=True)
    bound = {head for loss in spec.losses.values() for head in loss.heads}
    for name in spec.heads:
        if name not in bound:
            ctx.warn(("heads", name), f"head {quote(name)} has no loss bound to it; its logits are not used", key=True)
