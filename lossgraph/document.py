"""From YAML text to a validated spec: `load`, `loads`, and the non-raising `check_*` used by the CLI."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .compiler.pipeline import analyze
from .errors import ConfigError, Diagnostic, LossGraphWarning, sort_diagnostics
from .spec.loader import parse_yaml, read_text, validate_schema
from .compiler.passes import CompileContext
from .spec.models import LossGraphSpec


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
    """Parse, schema-check and run every validation pass; never raises for a bad document."""
    report = Report(file=file)
    try:
        spec = validate_schema(parse_yaml(text, file))
    except ConfigError as exc:
        report.diagnostics = exc.diagnostics
        return report
    return check_spec(spec, report)


def check_spec(spec: LossGraphSpec, report: Report | None = None) -> Report:
    """Run the validation passes on an already parsed spec."""
    report = report or Report(file=spec.source_map.file)
    context = analyze(spec)
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
