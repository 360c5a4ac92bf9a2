"""The `lossgraph` command line: exit codes, messages, output formats, and that it stays light.

Most tests run the Typer app in-process (the `cli` fixture); a few start a real `python -m lossgraph`
to check what only a fresh process shows: no traceback on stderr, and that torch is never imported.
Per-example `show` and `viz` output is checked in test_examples_validate.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lossgraph
from lossgraph.document import check_file
from lossgraph.spec.models import json_schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DISTILL = EXAMPLES / "distill.yaml"
MTP = EXAMPLES / "mtp_distill.yaml"
SCHEMA_FILE = ROOT / "schemas" / "lossgraph.schema.json"
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz `dot` is not on PATH")

INVALID_TEXT = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
sources:
  teacher: {type: teacher}
losses:
  distill: {type: forward_kl, heads: [next], target: teachr}
"""
# The one line `validate` must print for INVALID_TEXT (after the file name).
INVALID_LINE = (
    ":8:54: losses.distill.target: unknown source 'teachr'; did you mean 'teacher'? (declared sources: teacher)"
)

WARNING_TEXT = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
sources:
  labels: {type: labels}
  spare: {type: teacher}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
"""
WARNING_LINE = ":7:3: warning: sources.spare: source 'spare' is not used by any loss"


@pytest.fixture
def invalid(tmp_path: Path) -> Path:
    path = tmp_path / "invalid.yaml"
    path.write_text(INVALID_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def warns(tmp_path: Path) -> Path:
    path = tmp_path / "warns.yaml"
    path.write_text(WARNING_TEXT, encoding="utf-8")
    return path


def run_module(*args: str | Path, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """A real `python [FLAGS] -m lossgraph ARGS` in the repository root."""
    command = [sys.executable, *python_flags, "-m", "lossgraph", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


def no_traceback(*texts: str) -> bool:
    return not any("Traceback" in text for text in texts)


# --------------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------------


def test_validate_valid_file(cli):
    result = cli("validate", DISTILL)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{DISTILL}: valid (0 error(s), 0 warning(s))"


def test_validate_invalid_file_prints_file_line_column_path_message(cli, invalid: Path):
    result = cli("validate", invalid)
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [
        f"{invalid}:6:3: warning: sources.teacher: source 'teacher' is not used by any loss",
        f"{invalid}{INVALID_LINE}",
        f"{invalid}: invalid (1 error(s), 1 warning(s))",
    ]
    assert no_traceback(result.output)


def test_validate_prints_file_names_literally(cli, tmp_path: Path):
    path = tmp_path / "graph[red].yaml"
    path.write_text(DISTILL.read_text(encoding="utf-8"), encoding="utf-8")
    result = cli("validate", path)
    assert result.stdout.strip() == f"{path}: valid (0 error(s), 0 warning(s))"


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["missing.yaml"], "missing.yaml: no such file"),
        (["."], "is a directory, not a loss-graph file"),
    ],
    ids=["missing-file", "directory"],
)
def test_validate_unreadable_exits_2(cli, args: list[str], phrase: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("validate", *args)
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr
    assert no_traceback(result.output)


@pytest.mark.parametrize(
    "args",
    [[], ["validate"], ["validate", "--no-such-option", "x.yaml"], ["no-such-command"]],
    ids=["no-args", "validate-no-files", "unknown-option", "unknown-command"],
)
def test_usage_errors_exit_2(cli, args: list[str]):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "Usage" in result.output


def test_validate_several_files_reports_each(cli, invalid: Path, warns: Path):
    result = cli("validate", DISTILL, invalid, warns)
    assert result.exit_code == 1, result.output
    assert f"{DISTILL}: valid (0 error(s), 0 warning(s))" in result.stdout
    assert f"{invalid}: invalid (1 error(s), 1 warning(s))" in result.stdout
    assert f"{warns}: valid (0 error(s), 1 warning(s))" in result.stdout
    assert f"{warns}{WARNING_LINE}" in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("names", "code"),
    [
        (["valid", "valid"], 0),
        (["valid", "invalid"], 1),
        (["invalid", "valid"], 1),
        (["invalid", "missing", "valid"], 2),
        (["missing", "invalid"], 2),
    ],
    ids=lambda value: "+".join(value) if isinstance(value, list) else str(value),
)
def test_validate_several_files_exits_with_the_worst_code(cli, invalid: Path, names: list[str], code: int):
    paths = {"valid": DISTILL, "invalid": invalid, "missing": invalid.with_name("missing.yaml")}
    result = cli("validate", *(paths[name] for name in names))
    assert result.exit_code == code, result.output
    assert result.stdout.count(": valid (") == names.count("valid")
    assert result.stdout.count(": invalid (") == names.count("invalid")


def test_validate_json(cli, invalid: Path, warns: Path):
    missing = invalid.with_name("missing.yaml")
    result = cli("validate", "--json", DISTILL, invalid, warns, missing)
    assert result.exit_code == 2, result.output
    document = json.loads(result.stdout)
    assert document["valid"] is False
    by_file = {entry["file"]: entry for entry in document["files"]}
    assert list(by_file) == [str(DISTILL), str(invalid), str(warns), str(missing)]

    assert by_file[str(DISTILL)] == {
        "file": str(DISTILL),
        "readable": True,
        "valid": True,
        "errors": 0,
        "warnings": 0,
        "diagnostics": [],
    }
    bad = by_file[str(invalid)]
    assert (bad["readable"], bad["valid"], bad["errors"], bad["warnings"]) == (True, False, 1, 1)
    error = next(d for d in bad["diagnostics"] if d["severity"] == "error")
    assert error == {
        "severity": "error",
        "file": str(invalid),
        "line": 8,
        "column": 54,
        "path": "losses.distill.target",
        "message": "unknown source 'teachr'; did you mean 'teacher'? (declared sources: teacher)",
    }
    assert by_file[str(warns)]["valid"] is True
    assert by_file[str(warns)]["diagnostics"][0]["severity"] == "warning"
    unreadable = by_file[str(missing)]
    assert (unreadable["readable"], unreadable["valid"], unreadable["errors"]) == (False, False, 1)
    assert "no such file" in unreadable["diagnostics"][0]["message"]


def test_validate_json_all_valid(cli):
    result = cli("validate", "--json", DISTILL, MTP)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["valid"] is True


def test_warnings_pass_unless_strict(cli, warns: Path):
    relaxed = cli("validate", warns)
    assert relaxed.exit_code == 0, relaxed.output
    assert f"{warns}{WARNING_LINE}" in relaxed.stdout.splitlines()

    strict = cli("validate", "--strict", warns)
    assert strict.exit_code == 1, strict.output
    assert f"{warns}: invalid (0 error(s), 1 warning(s))" in strict.stdout

    strict_json = json.loads(cli("validate", "--strict", "--json", warns).stdout)
    assert strict_json["valid"] is False
    assert strict_json["files"][0]["valid"] is False


def test_strict_passes_a_clean_file(cli):
    assert cli("validate", "--strict", DISTILL).exit_code == 0


def test_validate_in_a_real_process(invalid: Path):
    result = run_module("validate", DISTILL, invalid)
    assert result.returncode == 1, result.stderr
    assert f"{invalid}{INVALID_LINE}" in result.stdout.splitlines()
    assert f"{DISTILL}: valid (0 error(s), 0 warning(s))" in result.stdout.splitlines()
    assert result.stderr == ""


# --------------------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------------------


def test_show_prints_heads_losses_weights_temperatures_and_sources(cli):
    result = cli("show", MTP)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in (
        "normalization tokens, vocab 256",
        "next  predicts t+1, vocab 256",
        "mtp2  predicts t+2, vocab 256",
        "mtp3  predicts t+3, vocab 256",
        "lm: cross_entropy <- labels, weight 1, head weight 0.5",
        "lm: cross_entropy <- labels, weight 1, head weight 0.25",
        "distill: forward_kl <- teacher, weight 0.5, T 2, x T^2",
        "z: z_loss, weight 0.0001",
        "labels: labels (ignore_index -100)",
        "teacher: teacher (offset 1, vocab 256)",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"


def test_show_schedules_and_unbound_heads(cli, tmp_path: Path):
    path = tmp_path / "g.yaml"
    path.write_text(
        "version: 1\nvocab_size: 8\nheads: {next: {}, spare: {offset: 2}}\nlosses:\n"
        "  z: {type: z_loss, heads: [next], weight: {schedule: linear, start: 0, end: 1, steps: 10, warmup: 5}}\n",
        encoding="utf-8",
    )
    result = cli("show", path)
    assert result.exit_code == 0, result.output
    assert "z: z_loss, weight linear 0 -> 1 over 10 steps after 5" in result.stdout
    assert "no loss bound" in result.stdout
    assert "head 'spare' has no loss bound to it" in result.stderr  # the warning, on stderr


def test_show_prints_every_description_literally(cli, tmp_path: Path):
    path = tmp_path / "g.yaml"
    path.write_text(
        """\
version: 1
vocab_size: 8
description: "graph [bold]notes[/]"
heads:
  next: {description: "head [red]notes"}
sources:
  labels: {type: labels, description: "source notes"}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels, description: "loss notes"}
""",
        encoding="utf-8",
    )
    result = cli("show", path)
    assert result.exit_code == 0, result.output
    for text in ("graph [bold]notes[/]", "head [red]notes", "source notes", "loss notes"):
        assert text in result.stdout, f"{text!r} not in:\n{result.stdout}"


def test_show_invalid_file_prints_errors_not_a_traceback(cli, invalid: Path):
    result = cli("show", invalid)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"{invalid}{INVALID_LINE}" in result.stderr.splitlines()
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_show_missing_file_exits_2(cli, tmp_path: Path):
    result = cli("show", tmp_path / "missing.yaml")
    assert result.exit_code == 2
    assert "no such file" in result.stderr


@pytest.mark.parametrize("command", ["show", "viz"])
def test_invalid_file_in_a_real_process_has_no_traceback(command: str, invalid: Path):
    result = run_module(command, invalid)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{invalid}{INVALID_LINE}" in result.stderr.splitlines()
    assert no_traceback(result.stderr)


# --------------------------------------------------------------------------------------------------
# viz
# --------------------------------------------------------------------------------------------------


def test_viz_defaults_to_mermaid(cli):
    result = cli("viz", DISTILL)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("flowchart LR\n")


def test_viz_writes_to_a_file(cli, tmp_path: Path):
    out = tmp_path / "graph.dot"
    result = cli("viz", "--format", "dot", "-o", out, DISTILL)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"wrote {out}" in result.stderr
    assert out.read_text().startswith('digraph "distill" {')


def test_viz_unknown_format_is_a_usage_error(cli):
    result = cli("viz", "--format", "jpeg", DISTILL)
    assert result.exit_code == 2
    assert "jpeg" in result.output


def test_viz_invalid_file(cli, invalid: Path):
    result = cli("viz", "-f", "dot", invalid)
    assert result.exit_code == 1
    assert f"{invalid}{INVALID_LINE}" in result.stderr.splitlines()


@needs_dot
def test_viz_svg(cli):
    result = cli("viz", "--format", "svg", MTP)
    assert result.exit_code == 0, result.output
    assert "<svg" in result.stdout
    for node in ("head_mtp3", "loss_distill", "source_teacher"):
        assert node in result.stdout


@needs_dot
def test_viz_png_to_a_file(cli, tmp_path: Path):
    out = tmp_path / "graph.png"
    result = cli("viz", "-f", "png", "-o", out, MTP)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@needs_dot
def test_viz_png_to_a_pipe(cli):
    result = cli("viz", "-f", "png", DISTILL)
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_viz_without_graphviz_says_what_to_do(cli, fmt: str, tmp_path: Path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = cli("viz", "--format", fmt, "-o", tmp_path / f"g.{fmt}", DISTILL)
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert message.startswith(f"error: --format {fmt} needs Graphviz's `dot` program, which is not on PATH")
    assert "install Graphviz" in message
    assert "--format mermaid or dot" in message
    assert not (tmp_path / f"g.{fmt}").exists()
    # Text formats do not need Graphviz.
    assert cli("viz", "--format", "dot", DISTILL).exit_code == 0


# --------------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------------


def test_schema_prints_json(cli):
    result = cli("schema")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json_schema()


def test_schema_writes_a_file(cli, tmp_path: Path):
    out = tmp_path / "lossgraph.schema.json"
    result = cli("schema", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == json.dumps(json_schema(), indent=2) + "\n"
    assert f"wrote {out}" in result.stderr


def test_checked_in_schema_is_current():
    expected = json.dumps(json_schema(), indent=2) + "\n"
    assert SCHEMA_FILE.exists(), f"{SCHEMA_FILE.relative_to(ROOT)} is missing; run `make schema`"
    current = SCHEMA_FILE.read_text(encoding="utf-8")
    assert current == expected, (
        f"{SCHEMA_FILE.relative_to(ROOT)} is stale (the pydantic models changed); run `make schema` and commit it"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["init", "{missing}/graph.yaml"],
        ["init", "--force", "{directory}"],
        ["schema", "-o", "{missing}/schema.json"],
        ["viz", "-f", "dot", "-o", "{missing}/graph.dot", str(DISTILL)],
    ],
    ids=["init-missing-dir", "init-onto-directory", "schema", "viz"],
)
def test_unwritable_output_is_a_clean_error(cli, tmp_path: Path, args: list[str]):
    paths = {"missing": tmp_path / "no-such-dir", "directory": tmp_path}
    result = cli(*(arg.format(**paths) for arg in args))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: cannot write "), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# --------------------------------------------------------------------------------------------------
# init, --version, --help
# --------------------------------------------------------------------------------------------------


def test_init_writes_a_starter_that_validates(cli, tmp_path: Path):
    path = tmp_path / "graph.yaml"
    result = cli("init", path)
    assert result.exit_code == 0, result.output
    assert f"lossgraph validate {path}" in result.stdout
    report = check_file(path)
    assert report.ok and not report.warnings, report.diagnostics
    assert cli("validate", "--strict", path).exit_code == 0


def test_init_default_path(cli, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("init")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lossgraph.yaml").is_file()


def test_init_refuses_to_overwrite_without_force(cli, tmp_path: Path):
    path = tmp_path / "graph.yaml"
    path.write_text("mine\n", encoding="utf-8")
    result = cli("init", path)
    assert result.exit_code == 2
    assert "exists; pass --force to overwrite it" in result.stderr
    assert path.read_text(encoding="utf-8") == "mine\n"

    forced = cli("init", "--force", path)
    assert forced.exit_code == 0, forced.output
    assert check_file(path).ok


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"lossgraph {lossgraph.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", lossgraph.__version__)


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("validate", "show", "viz", "schema", "init"):
        assert command in result.stdout


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output (`import time: self | cumulative | name`)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["validate", str(EXAMPLES / "every_loss.yaml")],
        ["show", str(EXAMPLES / "every_loss.yaml")],
        ["viz", "-f", "dot", str(EXAMPLES / "every_loss.yaml")],
        ["schema"],
        ["kinds"],
        ["kernel", str(EXAMPLES / "every_loss.yaml")],
    ],
    ids=["help", "validate", "show", "viz", "schema", "kinds", "kernel"],
)
def test_light_commands_do_not_import_torch(args: list[str]):
    result = run_module(*args, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr[-2000:]
    modules = _imported_modules(result.stderr)
    assert "lossgraph.cli.app" in modules, "importtime output was not captured"
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "triton"))
    assert not heavy, f"`lossgraph {' '.join(args)}` imported {heavy[:10]}"
