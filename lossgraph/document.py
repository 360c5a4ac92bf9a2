"""From YAML text to a validated spec: `load`, `loads`, and the non-raising `check_*` used by the CLI.

The compiler's passes run once per spec object: the analysed context (graph, diagnostics, plan and
fused launches) stays with the spec, and `compile()` and `lossgraph plan` take it from `analysis(spec)`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .compiler import pipeline
from .compiler.passes import CompileContext
from .errors import ConfigError, Diagnostic, LossGraphWarning, sort_diagnostics
from .spec.loader import check_schema, parse_yaml, read_text
from .spec.models import LossGraphSpec

# where a spec keeps its analysed context: an attribute outside the model's fields, which dumps and the
# schema never see; a copy made by model_copy() carries its original's, which `analysis` tells apart by
# the context's own spec
_ANALYSIS = "_lossgraph_analysis"


class _Analysis:
    """A spec's analysed context, kept out of the spec's ==: pydantic compares the instance dicts first,
    and two contexts compared by value would compare their specs again, without end."""

    __slots__ = ("context",)

    def __init__(self, context: CompileContext):
        self.context = context

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Analysis)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Report:
    """Outcome of checking one document: the spec (None when invalid), diagnostics sorted by line."""

    file: str | None
    spec: LossGraphSpec | None = None
    context: CompileContext | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def check_text(text: str, file: str | None = None) -> Report:
    """Parse, schema-check and run every validation pass; never raises for a bad document.

    A document whose keys, types or ranges are wrong stops at those problems: the passes need its shape.
    A document that breaks only node rules (a negative weight) has that shape, so the passes run too.
    """
    report = Report(file=file)
    try:
        spec, broken_rules = check_schema(parse_yaml(text, file))
    except ConfigError as exc:
        report.diagnostics = exc.diagnostics
        return report
    if broken_rules:  # the spec is not valid: its analysis is not kept with it, and it is not returned
        report.diagnostics = sort_diagnostics(pipeline.analyze(spec, broken_rules).diagnostics)
        return report
    return check_spec(spec, report)


def analysis(spec: LossGraphSpec) -> CompileContext:
    """The compiler's analysis of `spec`: its graph, diagnostics, plan and fused launches.

    The passes run the first time a spec object is asked for; later calls return the same context.
    """
    kept = spec.__dict__.get(_ANALYSIS)
    if kept is not None and kept.context.spec is spec:
        return kept.context
    context = pipeline.analyze(spec)
    object.__setattr__(spec, _ANALYSIS, _Analysis(context))  # the spec is frozen; this is no field of it
    return context


def check_spec(spec: LossGraphSpec, report: Report | None = None) -> Report:
    """Run the validation passes on an already parsed spec (once per spec object; see `analysis`)."""
    report = report or Report(file=spec.source_map.file)
    context = analysis(spec)
    report.context = context
    report.diagnostics = sort_diagnostics(context.diagnostics)
    if report.ok:
        report.spec = spec
    return report


def check_file(path: str | Path) -> Report:
    """`check_text` on a file; raises `SourceFileError` when the file cannot be read."""
    return check_text(read_text(path), str(path))


def _accept(report: Report) -> LossGraphSpec:
    if report.spec is None:
        raise ConfigError(report.diagnostics)
    for diagnostic in report.warnings:
        warnings.warn(diagnostic.format(), LossGraphWarning, stacklevel=3)
    return report.spec


def loads(text: str, file: str | None = None) -> LossGraphSpec:
    """Validate a loss graph given as YAML text; raise `ConfigError` listing every problem."""
    return _accept(check_text(text, file))


def load(path: str | Path) -> LossGraphSpec:
    """Validate a loss-graph YAML file; raise `ConfigError` listing every problem."""
    return _accept(check_file(path))
