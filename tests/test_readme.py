"""README.md keeps its promises.

- Its first section starts with the two commands a new user runs, `make demo` and `make test`, and the
  Makefile builds .venv from nothing for both (a stamp rule runs `python -m venv` and pip install with
  constraints.txt); CI (.ci/run) runs both.
- Its YAML example is a valid graph (and is examples/mtp_distill.yaml); its Python example only uses
  names the API has; its `lossgraph ...` commands run.
- Every relative link of README.md and docs/*.md points to a file that exists (and to a heading that
  exists, when it names one).
"""

from __future__ import annotations

import ast
import glob
import inspect
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import lossgraph
from lossgraph.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"
CI = ROOT / ".ci" / "run"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def readme() -> str:
    return README.read_text(encoding="utf-8")


def blocks(text: str, lang: str) -> list[str]:
    return [body for found, body in FENCE.findall(text) if found == lang]


def command_lines(script: str) -> list[list[str]]:
    """The commands of a shell snippet, as argument lists (comments and blank lines dropped)."""
    commands = []
    for line in script.splitlines():
        args = shlex.split(line, comments=True)
        if args:
            commands.append(args)
    return commands


def first_section(text: str) -> str:
    """Everything before the first `## ` heading."""
    match = re.search(r"^## ", text, re.MULTILINE)
    return text[: match.start()] if match else text


# --------------------------------------------------------------------------------------------------
# The two commands, the Makefile and CI.
# --------------------------------------------------------------------------------------------------


def test_readme_starts_with_make_demo_and_make_test():
    section = first_section(readme())
    bash = blocks(section, "bash")
    assert bash, "README.md's first section has no ```bash block"
    commands = command_lines(bash[0])
    assert commands[:2] == [["make", "demo"], ["make", "test"]], (
        f"the first ```bash block of README.md must start with `make demo` and `make test`, got {commands[:2]}"
    )


class Makefile:
    """Just enough of make's syntax for this Makefile: variables, rules and their recipes."""

    def __init__(self, text: str):
        self.variables: dict[str, str] = {}
        self.rules: dict[str, tuple[list[str], list[str]]] = {}
        current: list[str] | None = None
        for line in text.splitlines():
            if line.startswith("\t") and current is not None:
                current.append(line.strip())
                continue
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            variable = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*)$", line)
            if variable:
                self.variables[variable.group(1)] = variable.group(3).strip()
                current = None
                continue
            rule = re.match(r"^([^:=#]+):(?!=)\s*(.*)$", line)
            if rule:
                current = []
                targets = self.expand(rule.group(1)).split()
                for target in targets:
                    self.rules[target] = (self.expand(rule.group(2)).split(), current)

    def expand(self, text: str) -> str:
        for _ in range(10):
            expanded = re.sub(r"\$\((\w+)\)", lambda m: self.variables.get(m.group(1), ""), text)
            if expanded == text:
                break
            text = expanded
        return text

    def recipe(self, target: str) -> list[str]:
        return [self.expand(line) for line in self.rules[target][1]]

    def prerequisites(self, target: str) -> list[str]:
        return self.rules[target][0]


@pytest.fixture(scope="module")
def makefile() -> Makefile:
    return Makefile(MAKEFILE.read_text(encoding="utf-8"))


def test_makefile_builds_venv_from_nothing(makefile: Makefile):
    venv = makefile.expand("$(VENV)")
    assert venv == ".venv"
    stamps = [target for target in makefile.rules if target.startswith(venv + "/")]
    assert len(stamps) == 1, f"expected one stamp rule that installs into {venv}, got {stamps}"
    stamp = stamps[0]
    recipe = makefile.recipe(stamp)
    python = makefile.expand("$(PYTHON)")
    assert not python.startswith(venv), "the venv must be made with a Python from outside it"
    assert any(re.match(rf"^{re.escape(python)} -m venv {re.escape(venv)}$", line) for line in recipe), recipe
    install = [line for line in recipe if " -m pip install " in line or "/pip install " in line]
    assert install, f"the stamp rule does not pip install: {recipe}"
    assert all(line.startswith(f"{venv}/bin/") for line in install), "pip must run inside the new venv"
    assert any("-c constraints.txt" in line and "demo" in line and "dev" in line for line in install), install
    assert recipe.index(next(line for line in recipe if " -m venv " in line)) < recipe.index(install[0])
    assert any(line == f"touch {stamp}" for line in recipe), "the stamp must be touched last"
    assert {"pyproject.toml", "constraints.txt"} <= set(makefile.prerequisites(stamp))
    assert (ROOT / "constraints.txt").is_file()
    for target in ("demo", "test"):
        assert stamp in makefile.prerequisites(target), f"`make {target}` must depend on {stamp}"
    assert any(f"{venv}/bin/lossgraph demo" in line for line in makefile.recipe("demo"))
    assert any(f"{venv}/bin/python -m pytest" in line for line in makefile.recipe("test"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["demo", "test"])
def test_make_dry_run_from_nothing(target: str, tmp_path: Path):
    # `make -n` prints what make would run; with a VENV that does not exist yet, that starts from nothing.
    venv = tmp_path / "fresh-venv"
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), f"VENV={venv}", target],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip() and not line.startswith("make")]
    assert re.match(rf"^\S*python\S* -m venv {re.escape(str(venv))}$", lines[0]), lines
    assert lines[1].startswith(f"{venv}/bin/pip install") and "-c constraints.txt" in lines[1], lines
    assert lines[2] == f"touch {venv}/.installed", lines
    expected = f"{venv}/bin/lossgraph demo" if target == "demo" else f"{venv}/bin/python -m pytest"
    assert any(expected in line for line in lines[3:]), lines


def test_ci_runs_make_test_and_make_demo():
    text = CI.read_text(encoding="utf-8")
    commands = [args for args in command_lines(text) if args[0] == "make"]
    targets = [args[1] for args in commands if len(args) > 1]
    assert "test" in targets and "demo" in targets, f".ci/run must call `make test` and `make demo`: {commands}"
    assert targets.index("test") < targets.index("demo")
    assert text.startswith("#!") and "set -e" in text, ".ci/run must stop at the first failure"
    assert CI.stat().st_mode & 0o111, ".ci/run is not executable"


# --------------------------------------------------------------------------------------------------
# The examples.
# --------------------------------------------------------------------------------------------------


def test_readme_yaml_validates_and_is_the_example():
    [graph] = [block for block in blocks(readme(), "yaml") if re.search(r"^version: 1\b", block, re.MULTILINE)]
    report = lossgraph.check_text(graph, "README.md")
    assert not report.errors and not report.warnings, "\n".join(d.format() for d in report.diagnostics)
    example = yaml.safe_load((ROOT / "examples" / "mtp_distill.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(graph) == example, "README.md's graph should be examples/mtp_distill.yaml, as it says"


def test_readme_python_uses_real_api_names():
    pytest.importorskip("torch")
    [code] = blocks(readme(), "python")
    tree = ast.parse(code)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    compiles = [
        call
        for call in calls
        if isinstance(call.func, ast.Attribute)
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "lossgraph"
    ]
    assert [call.func.attr for call in compiles] == ["compile"]
    for call in compiles:
        function = getattr(lossgraph, call.func.attr)
        signature = inspect.signature(function)
        signature.bind(*(None for _ in call.args), **{kw.arg: None for kw in call.keywords})
        path = ast.literal_eval(call.args[0])
        assert (ROOT / path).is_file(), f"README.md compiles {path}, which does not exist"
    # graph(...) is CompiledGraph.forward: every keyword the README passes must be one of its parameters.
    parameters = inspect.signature(lossgraph.CompiledGraph.forward).parameters
    graph_calls = [call for call in calls if isinstance(call.func, ast.Name) and call.func.id == "graph"]
    assert graph_calls, "README.md's python block no longer calls the compiled graph"
    for call in graph_calls:
        for keyword in call.keywords:
            assert keyword.arg in parameters, (
                f"README.md passes {keyword.arg}=, not a parameter of CompiledGraph.forward"
            )
    # out.loss, out.terms, ...: attributes of the GraphOutput it returns.
    fields = {name for name, _ in inspect.getmembers(lossgraph.GraphOutput)} | set(
        lossgraph.GraphOutput.__dataclass_fields__
    )
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and _is_name(node.value, "out")}
    assert used and used <= fields, f"README.md uses GraphOutput attributes that do not exist: {used - fields}"


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def test_readme_commands_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("NO_COLOR", "1")
    ran = 0
    for block in blocks(readme(), "bash"):
        for args in command_lines(block):
            if args[0] != "lossgraph":
                continue
            expanded = [match for arg in args[1:] for match in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
            result = CliRunner().invoke(app, expanded)
            assert result.exit_code == 0, f"`{shlex.join(args)}` exited with {result.exit_code}:\n{result.output}"
            ran += 1
    assert ran >= 4


# --------------------------------------------------------------------------------------------------
# Links.
# --------------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text(encoding="utf-8")), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        candidate, count = slug, 0
        while candidate in found:
            count += 1
            candidate = f"{slug}-{count}"
        found.add(candidate)
    return found


def relative_links() -> list[tuple[Path, str]]:
    return [
        (page, target)
        for page in PAGES
        for target in LINK.findall(prose(page.read_text(encoding="utf-8")))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_pages_have_relative_links():
    assert {page.name for page, _ in relative_links()} >= {"README.md", "concepts.md", "tutorial.md"}


@pytest.mark.parametrize(
    ("page", "target"), relative_links(), ids=lambda value: value.name if isinstance(value, Path) else value
)
def test_relative_link_exists(page: Path, target: str):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.relative_to(ROOT)} links to {target}, but {path} does not exist"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), (
            f"{page.relative_to(ROOT)} links to {target}, but {file.name} has no such heading"
        )
