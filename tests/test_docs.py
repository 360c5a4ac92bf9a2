"""The user documentation cannot drift from the code.

- docs/yaml-reference.md is exactly what `lossgraph.docgen.yaml_reference()` generates, and lists every
  field of every model of `lossgraph.spec.models`.
- Every ```yaml block of docs/*.md that declares `version: 1` is a valid loss graph.
- docs/cli.md has a `## lossgraph <name>` section for every command, naming each of its options.
- The `lossgraph ...` lines of ```bash blocks run (in a scratch directory holding a copy of examples/)
  with the exit code the page states (`# exit code N`, else 0); when a ```text (or json, mermaid, dot)
  block follows, it is the exact output, at the width a user gets in a pipe or a file (COLUMNS unset).
"""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.main import get_command
from typer.testing import CliRunner

import lossgraph
from lossgraph.cli.app import app
from lossgraph.kinds import loss_kind, loss_kinds, source_kind, source_kinds
from lossgraph.spec import docgen
from lossgraph.spec import models as spec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CLI_PAGE = DOCS / "cli.md"
OUTPUT_LANGUAGES = {"text", "json", "mermaid", "dot"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Block:
    page: Path
    line: int  # line of the opening fence
    lang: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    blocks: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^```(\w*)", lines[index])
        if not match:
            index += 1
            continue
        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and lines[index].rstrip() != "```":
            body.append(lines[index])
            index += 1
        assert index < len(lines), f"{page.name}:{start + 1}: unclosed code block"
        blocks.append(Block(page, start + 1, match.group(1), "\n".join(body) + "\n"))
        index += 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in fenced_blocks(page)]


def section(text: str, heading: str) -> str:
    """The text under `heading` (a whole line) up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading)
    end = start + 1
    while end < len(lines):
        match = re.match(r"^(#+) ", lines[end])
        if match and len(match.group(1)) <= level:
            break
        end += 1
    return "\n".join(lines[start:end])


# --------------------------------------------------------------------------------------------------
# The generated YAML reference.
# --------------------------------------------------------------------------------------------------


def test_docs_exist():
    names = {page.name for page in PAGES}
    assert {"concepts.md", "yaml-reference.md", "cli.md"} <= names


def test_yaml_reference_is_current():
    checked_in = (DOCS / "yaml-reference.md").read_text(encoding="utf-8")
    assert checked_in == docgen.yaml_reference(), (
        f"docs/yaml-reference.md is stale; run `{docgen.REGENERATE}` from the repository root"
    )


# Pages with a hand-written table of kinds, each kept complete by the test below: the kernel's value and
# gradient per loss kind (docs/kernels.md) says more than the kinds' `formula` holds. Every other table
# of kinds is the generated reference's.
HAND_WRITTEN_KIND_TABLES = {"kernels.md": "loss"}


def _kinds_in_tables(text: str, names: set[str]) -> set[str]:
    """The kind names that open a row of a Markdown table (`| jsd, M = ... |`, `` | `tvd` | ``)."""
    found = set()
    for line in text.splitlines():
        first = line.split("|")[1].strip() if line.startswith("|") else ""
        found |= {name for name in names if re.match(rf"`?{name}\b`?(?![_\w])", first)}
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "yaml-reference.md"], ids=lambda p: p.name)
def test_tables_of_kinds_are_generated_or_complete(page: Path):
    """A table of kinds outside the generated reference is one of HAND_WRITTEN_KIND_TABLES, and names
    every registered loss kind (a new kind fails here until its row is written)."""
    families = {"loss": {kind.name for kind in loss_kinds()}, "source": {kind.name for kind in source_kinds()}}
    text = page.read_text(encoding="utf-8")
    for family, names in families.items():
        named = _kinds_in_tables(text, names)
        if HAND_WRITTEN_KIND_TABLES.get(page.name) == family:
            assert named == names, f"docs/{page.name}'s table of {family} kinds has no row for {sorted(names - named)}"
        else:
            assert len(named) < 2, (
                f"docs/{page.name} has a hand-written table of {family} kinds ({sorted(named)}): link to the "
                f"generated [YAML reference](yaml-reference.md) instead"
            )


def _models(tp: object, found: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """Every pydantic model reachable from the type `tp` (fields, unions, lists, mappings)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp not in found:
            found.append(tp)
            for field in tp.model_fields.values():
                _models(field.annotation, found)
        return found
    for arg in typing.get_args(tp):
        _models(arg, found)
    return found


SPEC_MODELS = _models(spec.LossGraphSpec, [])


def test_spec_models_are_all_found():
    # Sanity check of the walk above: the top level, heads, 5 sources, 7 losses, a named mask, 4 schedules.
    assert len(SPEC_MODELS) == 1 + 1 + len(source_kinds()) + len(loss_kinds()) + 1 + 4
    assert set(SPEC_MODELS) == set(docgen.documented_models())


@pytest.mark.parametrize("model", SPEC_MODELS, ids=lambda model: model.__name__)
def test_yaml_reference_lists_every_field(model: type[BaseModel]):
    text = docgen.yaml_reference()
    docstring = inspect.cleandoc(model.__doc__ or "")
    assert docstring, f"{model.__name__} has no docstring to document it with"
    headings = [line for line in text.splitlines() if line.startswith("#")]
    # The section of a model is the one whose text starts with the model's docstring.
    owners = [h for h in headings if section(text, h).split("\n\n")[1:2] == [docstring.split("\n\n")[0]]]
    assert len(owners) == 1, f"no single section documents {model.__name__} (found {owners})"
    body = section(text, owners[0])
    for name, field in model.model_fields.items():
        assert f"| `{name}` |" in body, f"field {name!r} of {model.__name__} is missing from its table"
        assert field.description, f"{model.__name__}.{name} has no description"
        assert " ".join(field.description.split()).replace("|", "\\|") in body


@pytest.mark.parametrize("model", list(docgen.examples()), ids=lambda model: model.__name__)
def test_reference_examples_are_valid(model: type[BaseModel]):
    data = yaml.safe_load(docgen.examples()[model])
    assert isinstance(data, dict) and len(data) == 1
    model.model_validate(next(iter(data.values())))


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (spec.Head.model_fields["offset"], "integer in [1, 4096]"),
        (
            loss_kind("cross_entropy").model.model_fields["weight"],
            "number in [-1000000, 1000000] or [schedule](#schedules)",
        ),
        (source_kind("mixture").model.model_fields["sources"], "list of names (at least 2)"),
        (spec.LossGraphSpec.model_fields["normalization"], "one of: tokens, sum, batch"),
        (loss_kind("jsd").model.model_fields["beta"], "number in [0, 1]"),
        (source_kind("label_smoothing").model.model_fields["epsilon"], "number in (0, 1)"),
        (spec.LinearSchedule.model_fields["warmup"], "integer in [0, 1000000000]"),
        (source_kind("labels").model.model_fields["type"], "`labels`"),
    ],
)
def test_yaml_types(annotation, expected):
    assert docgen.yaml_type(annotation.annotation, list(annotation.metadata)) == expected


def test_docgen_main_prints_the_reference_without_torch():
    code = (
        "import sys, lossgraph.spec.docgen as d; d.main(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == docgen.yaml_reference()


# --------------------------------------------------------------------------------------------------
# YAML examples in the pages.
# --------------------------------------------------------------------------------------------------

GRAPH_BLOCKS = [
    block for block in all_blocks() if block.lang == "yaml" and re.search(r"^version: 1\b", block.body, re.MULTILINE)
]


def test_pages_have_graph_examples():
    pages = {block.page.name for block in GRAPH_BLOCKS}
    assert {"concepts.md", "yaml-reference.md"} <= pages


@pytest.mark.parametrize("block", GRAPH_BLOCKS, ids=lambda block: block.where)
def test_yaml_examples_validate(block: Block):
    report = lossgraph.check_text(block.body, block.where)
    assert not report.errors, "\n".join(d.format() for d in report.diagnostics)


# --------------------------------------------------------------------------------------------------
# The CLI page.
# --------------------------------------------------------------------------------------------------

COMMANDS = get_command(app).commands


def _option_flags(command) -> list[str]:
    return [
        flag
        for param in command.params
        if param.param_type_name == "option"
        for flag in (*param.opts, *param.secondary_opts)
    ]


def test_cli_page_has_a_section_per_command():
    text = CLI_PAGE.read_text(encoding="utf-8")
    documented = re.findall(r"^## lossgraph (\S+)$", text, re.MULTILINE)
    assert sorted(documented) == sorted(COMMANDS), "docs/cli.md needs one `## lossgraph <name>` per command"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_page_documents_every_option(name: str):
    body = section(CLI_PAGE.read_text(encoding="utf-8"), f"## lossgraph {name}")
    for flag in _option_flags(COMMANDS[name]):
        assert re.search(rf"`{re.escape(flag)}\b", body), f"option {flag} of `lossgraph {name}` is not documented"


def test_cli_page_documents_global_options():
    text = CLI_PAGE.read_text(encoding="utf-8")
    for flag in _option_flags(get_command(app)):
        assert f"`{flag}`" in text


# --------------------------------------------------------------------------------------------------
# Commands shown in the pages run, with the exit code and the output shown.
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    command: str
    exit_code: int
    output: str


def _expected_code(line: str) -> int:
    match = re.search(r"#\s*exit code (\d+)\s*$", line)
    return int(match.group(1)) if match else 0


def _needs_graphviz(args: list[str]) -> bool:
    return any(value in ("svg", "png") for flag, value in pairwise(args) if flag in ("-f", "--format"))


def run_block(block: Block, workdir: Path) -> tuple[list[Result], bool]:
    """Run the heredocs and `lossgraph` lines of a bash block in `workdir`; (results, whether all ran)."""
    runner = CliRunner()
    results: list[Result] = []
    complete = True
    lines = iter(block.body.splitlines())
    for line in lines:
        stripped = line.strip()
        heredoc = re.match(r"^cat > (\S+) <<'?(\w+)'?$", stripped)
        if heredoc:
            content = []
            for inner in lines:
                if inner == heredoc.group(2):
                    break
                content.append(inner + "\n")
            (workdir / heredoc.group(1)).write_text("".join(content), encoding="utf-8")
        elif stripped.startswith("lossgraph "):
            args = shlex.split(stripped, comments=True)[1:]
            if _needs_graphviz(args) and shutil.which("dot") is None:
                complete = False
                continue
            result = runner.invoke(app, args)
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            results.append(Result(stripped, result.exit_code, ANSI.sub("", result.output)))
        elif stripped and not stripped.startswith("#"):
            complete = False  # something the test cannot run; its output is not compared
    return results, complete


def _pages_with_commands() -> list[Path]:
    return [
        page
        for page in PAGES
        if any(
            block.lang == "bash" and re.search(r"^lossgraph ", block.body, re.MULTILINE)
            for block in fenced_blocks(page)
        )
    ]


def test_cli_page_runs_the_examples():
    assert CLI_PAGE in _pages_with_commands()


@pytest.mark.parametrize("page", _pages_with_commands(), ids=lambda page: page.name)
def test_page_commands_run_as_shown(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("COLUMNS", raising=False)  # the pages show the output as `lossgraph ... > FILE` writes it
    blocks = fenced_blocks(page)
    ran = 0
    for block, after in zip(blocks, [*blocks[1:], None], strict=True):
        if block.lang != "bash":
            continue
        results, complete = run_block(block, tmp_path)
        ran += len(results)
        for result in results:
            expected = _expected_code(result.command)
            assert result.exit_code == expected, (
                f"{block.where}: `{result.command}` exited with {result.exit_code}, the page says {expected}\n"
                f"{result.output}"
            )
        if complete and results and after is not None and after.lang in OUTPUT_LANGUAGES:
            output = "".join(result.output for result in results)
            assert output == after.body, f"{after.where}: the output shown differs from the real output"
    assert ran, f"{page.name}: no command ran"
