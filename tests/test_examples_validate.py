"""Every example graph is valid without a warning, and `show` and `viz` work on it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lossgraph
from lossgraph.document import check_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
IDS = [path.stem for path in EXAMPLES]


def test_there_are_examples():
    assert len(EXAMPLES) >= 5, EXAMPLES


def names(path: Path) -> dict[str, list[str]]:
    spec = lossgraph.load(path)
    return {"head": list(spec.heads), "source": list(spec.sources), "loss": list(spec.losses)}


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_is_valid_without_warnings(path: Path):
    report = check_file(path)
    shown = "\n".join(d.format() for d in report.diagnostics)
    assert report.ok, f"{path.name} is invalid:\n{shown}"
    assert not report.warnings, f"{path.name} has warnings:\n{shown}"


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_points_editors_at_the_schema(path: Path):
    match = re.search(r"^# yaml-language-server: \$schema=(\S+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"{path.name} lacks the `# yaml-language-server: $schema=...` line"
    assert (path.parent / match[1]).resolve() == (ROOT / "schemas" / "lossgraph.schema.json").resolve()


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_show(cli, path: Path):
    result = cli("show", path)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    for kind, listed in names(path).items():
        for name in listed:
            assert re.search(rf"\b{name}\b", result.stdout), f"{kind} {name!r} missing from:\n{result.stdout}"


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_viz(cli, path: Path, fmt: str):
    result = cli("viz", "--format", fmt, path)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("flowchart LR\n" if fmt == "mermaid" else f'digraph "{path.stem}" {{'), text
    for kind, listed in names(path).items():
        for name in listed:
            node = f"{kind}_{name}"
            assert re.search(rf"^\s*{node}\b", text, re.MULTILINE), f"node {node} not declared in:\n{text}"
    if fmt == "dot":
        assert text.rstrip().endswith("}")
