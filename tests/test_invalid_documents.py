"""Every document in tests/invalid/ is rejected with exactly the errors its header comments expect.

Each file starts with comment lines of the form

    # expect: LINE[:COLUMN] PATH: PHRASE

meaning: there is an error at that line (and column, when given) whose dotted path is exactly PATH
(`<document>` for the whole document) and whose message contains PHRASE. The set of (line, path) pairs
of all errors must equal the expected set, so a file also proves that nothing else is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import lossgraph
from lossgraph.compiler import passes
from lossgraph.compiler.passes import CompileContext
from lossgraph.compiler.pipeline import PASSES
from lossgraph.errors import ConfigError, Diagnostic
from lossgraph.spec.loader import parse_yaml, validate_schema

INVALID = Path(__file__).parent / "invalid"
# The validation passes of lossgraph.compiler.passes, in the compiler's order (planning passes left out).
VALIDATION_PASSES = [(name, run) for name, run in PASSES if getattr(passes, name, None) is run]
FILES = sorted(INVALID.glob("*.yaml"))
EXPECT = re.compile(r"^#\s*expect:\s*(?P<line>\d+)(?::(?P<column>\d+))?\s+(?P<path>\S+):\s+(?P<phrase>.+?)\s*$")
DOCUMENT = "<document>"


@dataclass(frozen=True)
class Expectation:
    line: int
    column: int | None
    path: str
    phrase: str

    def matches(self, diagnostic: Diagnostic) -> bool:
        return (
            diagnostic.severity == "error"
            and diagnostic.line == self.line
            and (self.column is None or diagnostic.column == self.column)
            and diagnostic.path == self.path
            and self.phrase in diagnostic.message
        )

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}" if self.column is not None else str(self.line)
        return f"{where} {self.path or DOCUMENT}: ...{self.phrase}..."


def expectations(text: str) -> list[Expectation]:
    found = []
    for line in text.splitlines():
        match = EXPECT.match(line)
        if match:
            column = match["column"]
            path = "" if match["path"] == DOCUMENT else match["path"]
            found.append(Expectation(int(match["line"]), int(column) if column else None, path, match["phrase"]))
    return found


def dump(diagnostics: list[Diagnostic]) -> str:
    """All diagnostics, one per line, so that a failing assertion shows what was reported."""
    return "\n".join(f"  {d.severity}: {d.format()}" for d in diagnostics) or "  (no diagnostics)"


def test_expectation_syntax():
    text = "# a comment\n# expect: 7 losses.a.target: did you mean 'b'?\n# expect: 1:1 <document>: empty\nversion: 1\n"
    assert expectations(text) == [
        Expectation(7, None, "losses.a.target", "did you mean 'b'?"),
        Expectation(1, 1, "", "empty"),
    ]
    at_line_7 = Diagnostic("error", "losses.a.target", "unknown source 'c'; did you mean 'b'?", None, 7, 40)
    assert expectations(text)[0].matches(at_line_7)
    assert not expectations(text)[0].matches(Diagnostic("warning", "losses.a.target", "did you mean 'b'?", None, 7))
    assert not expectations(text)[1].matches(Diagnostic("error", "", "empty", None, 1, 2))


def test_folder_has_enough_documents():
    assert len(FILES) >= 30, f"only {len(FILES)} invalid documents in {INVALID}"


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_invalid_document(path: Path):
    text = path.read_text(encoding="utf-8")
    expected = expectations(text)
    assert expected, f"{path.name} states no `# expect:` lines"

    report = lossgraph.check_text(text, path.name)
    shown = f"\n{path.name} reported:\n{dump(report.diagnostics)}"

    assert not report.ok and report.spec is None, shown
    for expectation in expected:
        assert any(expectation.matches(d) for d in report.errors), f"missing error {expectation}{shown}"
    got = {(d.line, d.path) for d in report.errors}
    want = {(e.line, e.path) for e in expected}
    assert got == want, f"unexpected errors {sorted(got - want, key=str)}{shown}"
    assert all(d.file == path.name for d in report.diagnostics), shown
    positions = [(d.line, d.column) for d in report.diagnostics]
    assert positions == sorted(positions), f"diagnostics not sorted by line{shown}"


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_loads_raises_the_same_errors(path: Path):
    text = path.read_text(encoding="utf-8")
    report = lossgraph.check_text(text, path.name)
    with pytest.raises(ConfigError) as info:
        lossgraph.loads(text, path.name)
    assert info.value.diagnostics == report.errors
    assert all(line in str(info.value) for line in (d.format() for d in report.errors))


def _passes_reporting_errors(text: str) -> set[str]:
    """Names of the validation passes that add an error for this document (none when the schema fails)."""
    try:
        spec = validate_schema(parse_yaml(text))
    except ConfigError:
        return set()
    ctx = CompileContext(spec=spec, source_map=spec.source_map)
    found = set()
    for name, run in VALIDATION_PASSES:
        before = len(ctx.errors)
        run(ctx)
        if len(ctx.errors) > before:
            found.add(name)
    return found


WARNING_ONLY_PASSES = {"check_schedules", "warn_temperature_scaling", "warn_unused"}


def test_folder_covers_every_error_pass():
    covered = set().union(*(_passes_reporting_errors(f.read_text(encoding="utf-8")) for f in FILES))
    wanted = {name for name, _ in VALIDATION_PASSES} - WARNING_ONLY_PASSES
    assert wanted <= covered, f"no invalid document exercises {sorted(wanted - covered)}"


def test_several_errors_are_reported_in_line_order_not_pass_order():
    report = lossgraph.check_text((INVALID / "several_errors_sorted.yaml").read_text(encoding="utf-8"))
    assert len(report.errors) >= 8, dump(report.diagnostics)
    lines = [d.line for d in report.errors]
    assert lines == sorted(lines), dump(report.diagnostics)
    # The passes run names first, then references, ...: line order differs from the order they report in.
    assert report.errors[0].path == "losses.distill.target", dump(report.diagnostics)
    assert report.errors[-1].path == "sources.lm", dump(report.diagnostics)


def test_broken_node_rules_do_not_hold_back_the_checks_across_the_graph():
    # A negative weight is a rule of its loss node, checked with the keys and types; the document's shape
    # is right, so the passes run too: the unknown source and the unused one are reported in the same run.
    text = """\
version: 1
vocab_size: 32000
heads: {next: {offset: 1}}
sources: {labels: {type: labels}, teacher: {type: teacher}}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels, head_weights: [1, 2]}
  distill: {type: forward_kl, heads: [next], target: teachr, weight: -0.5}
"""
    report = lossgraph.check_text(text, "rules.yaml")
    assert report.spec is None and report.context is None
    assert [(d.severity, d.path) for d in report.diagnostics] == [
        ("warning", "sources.teacher"),
        ("error", "losses.lm.head_weights"),
        ("error", "losses.distill.target"),
        ("error", "losses.distill.weight"),
    ], dump(report.diagnostics)
    with pytest.raises(ConfigError) as info:
        validate_schema(parse_yaml(text))
    assert [d.path for d in info.value.diagnostics] == ["losses.lm.head_weights", "losses.distill.weight"]


# --------------------------------------------------------------------------------------------------
# Warnings: the document is valid, and the problem is reported with severity "warning".
# --------------------------------------------------------------------------------------------------

_HEAD = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
"""

WARNINGS = {
    "unused_source": (
        _HEAD
        + """\
sources:
  labels: {type: labels}
  teacher: {type: teacher}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
""",
        [(7, "sources.teacher", "source 'teacher' is not used by any loss")],
    ),
    "source_used_only_through_a_mixture_is_used": (
        _HEAD
        + """\
sources:
  big: {type: teacher}
  small: {type: teacher}
  unused_blend: {type: mixture, sources: [big, small]}
  blend: {type: mixture, sources: [big, small], weights: [0.5, 0.5]}
losses:
  distill: {type: forward_kl, heads: [next], target: blend}
""",
        [(8, "sources.unused_blend", "source 'unused_blend' is not used by any loss")],
    ),
    "head_without_loss": (
        _HEAD
        + """\
  mtp2: {offset: 2}
sources:
  labels: {type: labels}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
""",
        [(5, "heads.mtp2", "head 'mtp2' has no loss bound to it")],
    ),
    "weight_schedule_never_changes": (
        _HEAD
        + """\
losses:
  z:
    type: z_loss
    heads: [next]
    weight: {schedule: linear, start: 1.0e-4, end: 1.0e-4, steps: 100}
""",
        [(9, "losses.z.weight", "linear schedule goes from 0.0001 to the same value; write the number instead")],
    ),
    "temperature_schedule_never_changes": (
        _HEAD
        + """\
losses:
  spread: {type: entropy, heads: [next], weight: -0.01, temperature: {schedule: step, start: 2, end: 2, steps: 9}}
""",
        [(6, "losses.spread.temperature", "step schedule goes from 2 to the same value")],
    ),
    "temperature_scaling_at_temperature_1": (
        _HEAD
        + """\
sources:
  teacher: {type: teacher}
losses:
  distill: {type: forward_kl, heads: [next], target: teacher, temperature_scaling: true}
""",
        [(8, "losses.distill.temperature_scaling", "temperature_scaling has no effect at temperature 1")],
    ),
}


@pytest.mark.parametrize(("text", "expected"), list(WARNINGS.values()), ids=list(WARNINGS))
def test_warning(text: str, expected: list[tuple[int, str, str]]):
    report = lossgraph.check_text(text, "warn.yaml")
    shown = f"\nreported:\n{dump(report.diagnostics)}"
    assert report.ok and report.spec is not None, shown
    assert not report.errors, shown
    assert all(d.severity == "warning" for d in report.diagnostics), shown
    got = [(d.line, d.path) for d in report.warnings]
    assert got == [(line, path) for line, path, _ in expected], shown
    for diagnostic, (_, _, phrase) in zip(report.warnings, expected, strict=True):
        assert phrase in diagnostic.message, shown
        assert diagnostic.format().startswith(f"warn.yaml:{diagnostic.line}:{diagnostic.column}: warning: ")


def test_warnings_cover_every_warning_pass():
    covered: set[str] = set()
    for text, _ in WARNINGS.values():
        spec = validate_schema(parse_yaml(text))
        ctx = CompileContext(spec=spec, source_map=spec.source_map)
        for name, run in VALIDATION_PASSES:
            before = len(ctx.warnings)
            run(ctx)
            if len(ctx.warnings) > before:
                covered.add(name)
    assert covered >= WARNING_ONLY_PASSES, covered
