"""Plugins everywhere: kinds from `lossgraph --plugin MODULE`, LOSSGRAPH_PLUGINS and installed packages'
`lossgraph.kinds` entry points reach validate, show, plan, viz, schema, bench FILE, the docs generator and
`lossgraph kinds`; a plugin that fails is a clean error with exit code 2; an unknown `type:` says how
plugins load.

The plugin is tests/brier_kind.py (a module with a `KIND`). The registries are process-global: the
in-process tests run under `registry_restored`, which unregisters whatever a test registered; the
routes that load once per process (entry points, LOSSGRAPH_PLUGINS) run in real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import brier_kind
import pytest

import lossgraph
from lossgraph.errors import PluginError
from lossgraph.kinds import loss_kinds, register_loss_kind, source_kinds
from lossgraph.kinds.plugins import load_plugin, registered_kinds
from lossgraph.spec import docgen
from lossgraph.spec.loader import PLUGIN_HINT

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BRIER_GRAPH = """\
version: 1
vocab_size: 100
heads:
  next: {offset: 1}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
  b: {type: brier, heads: [next], target: teacher, weight: 0.5}
"""
# what each command prints that only a graph with the plugin's kind has
SEES_BRIER = {
    "validate": ["valid (0 error(s), 0 warning(s))"],
    "show": ["b: brier <- teacher"],
    "plan": ["b/next (brier) needs a row sum"],
    "viz": ["brier"],
    "schema": ['"BrierLoss"'],
    "kernel": ["#   term 1: brier"],
}


@pytest.fixture
def graph(tmp_path: Path) -> Path:
    path = tmp_path / "brier.yaml"
    path.write_text(BRIER_GRAPH, encoding="utf-8")
    return path


def command_args(command: str, graph: Path) -> list[str]:
    return [command] if command == "schema" else [command, str(graph)]


def run_lossgraph(*args: str, env: dict[str, str] | None = None, pythonpath: tuple[Path, ...] = (TESTS,)):
    """A real `python -m lossgraph ARGS`, with `pythonpath` (tests/ by default: brier_kind) importable."""
    environment = {key: value for key, value in os.environ.items() if key not in ("LOSSGRAPH_PLUGINS", "PYTHONPATH")}
    environment["PYTHONPATH"] = os.pathsep.join(str(path) for path in pythonpath)
    environment.update(env or {})
    command = [sys.executable, "-m", "lossgraph", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=environment)


# --------------------------------------------------------------------------------------------------
# --plugin and LOSSGRAPH_PLUGINS in every command that reads a graph or the kinds.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(SEES_BRIER))
def test_plugin_option_reaches_the_command(cli, graph: Path, command: str, registry_restored):
    without = cli(*command_args(command, graph))
    with_plugin = cli("--plugin", "brier_kind", *command_args(command, graph))
    assert with_plugin.exit_code == 0, with_plugin.output
    for text in SEES_BRIER[command]:
        assert text in with_plugin.stdout
    if command == "schema":
        assert '"BrierLoss"' not in without.stdout
    else:
        assert without.exit_code == 1 and "unknown type 'brier'" in without.stderr + without.stdout


@pytest.mark.parametrize("command", sorted(SEES_BRIER))
def test_environment_variable_reaches_the_command(graph: Path, command: str):
    result = run_lossgraph(*command_args(command, graph), env={"LOSSGRAPH_PLUGINS": " brier_kind, ,"})
    assert result.returncode == 0, result.stderr
    for text in SEES_BRIER[command]:
        assert text in result.stdout


def test_plugin_option_reaches_bench_file(cli, graph: Path, registry_restored):
    """`bench FILE` runs the plugin's kind (on the CPU: the reference backend, one small step)."""
    result = cli(
        "--plugin",
        "brier_kind",
        "bench",
        str(graph),
        "--device",
        "cpu",
        "--tokens",
        "16",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert f"case (brier.yaml) graph {graph}: N=16, V=100" in result.stdout
    assert "lossgraph reference" in result.stdout


def test_plugin_option_in_a_real_process(graph: Path):
    result = run_lossgraph("--plugin", "brier_kind", "validate", str(graph))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{graph}: valid (0 error(s), 0 warning(s))\n"


def test_the_environment_reaches_the_python_api(graph: Path, tmp_path: Path):
    """LOSSGRAPH_PLUGINS loads wherever the kinds are first read, not only on the command line; a plugin
    may import the document model, which is what first reads the kinds."""
    (tmp_path / "model_kinds.py").write_text(
        "from lossgraph.spec.models import LossGraphSpec\nfrom brier_kind import KIND\n", encoding="utf-8"
    )
    code = f"import lossgraph; print(type(lossgraph.load({str(graph)!r}).losses['b']).__name__)"
    pythonpath = os.pathsep.join([str(tmp_path), str(TESTS)])
    environment = {**os.environ, "PYTHONPATH": pythonpath, "LOSSGRAPH_PLUGINS": "model_kinds"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "BrierLoss\n"


def test_docgen_takes_a_plugin(capsys, registry_restored):
    assert docgen.main(["--plugin", "brier_kind"]) == 0
    page = capsys.readouterr().out
    assert "### `brier`" in page and brier_kind.KIND.example in page


def test_docgen_reports_a_broken_plugin(capsys):
    assert docgen.main(["--plugin", "no_such_plugin_module"]) == 2
    assert "plugin 'no_such_plugin_module' (from --plugin) cannot be imported" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# `lossgraph kinds`.
# --------------------------------------------------------------------------------------------------


def test_kinds_lists_the_built_in_kinds(cli):
    result = cli("kinds")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for kind in ("cross_entropy", "jsd", "entropy"):
        assert any(kind in line and "loss" in line and "built in" in line for line in lines), kind
    for kind in ("labels", "teacher", "topk_teacher", "mixture"):
        assert any(kind in line and "source" in line and "built in" in line for line in lines), kind
    assert "brier" not in result.stdout
    assert "--plugin" not in result.stdout and "Python" not in result.stdout


def test_kinds_names_the_plugin_that_added_a_kind(cli, registry_restored):
    result = cli("--plugin", "brier_kind", "kinds")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if "brier" in line]
    assert "loss" in line and "--plugin brier_kind" in line


def test_kinds_names_python_for_a_kind_registered_by_a_program(cli, registry_restored):
    register_loss_kind(brier_kind.KIND)
    (line,) = [line for line in cli("kinds").stdout.splitlines() if "brier" in line]
    assert "Python" in line
    again = cli("--plugin", "brier_kind", "kinds")  # the same kind named again: no clash, origin kept
    assert again.exit_code == 0, again.output
    assert [entry.origin for entry in registered_kinds() if entry.name == "brier"] == ["Python"]


def test_kinds_json(cli, registry_restored):
    result = cli("--plugin", "brier_kind", "kinds", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert sorted(document) == ["losses", "sources"]
    assert {"type": "cross_entropy", "from": "built in"} in document["losses"]
    assert {"type": "brier", "from": "--plugin brier_kind"} in document["losses"]
    assert [entry["type"] for entry in document["sources"]] == [kind.name for kind in source_kinds()]
    assert "brier" not in {entry["type"] for entry in document["sources"]}


# --------------------------------------------------------------------------------------------------
# Broken plugins: a clear error naming the plugin and its route, exit code 2, no traceback.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on sys.path for plugin modules written by a test; they leave sys.modules afterwards."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(folder) in sys.modules[name].__file__:
            del sys.modules[name]


CLASHING = """\
from brier_kind import Brier


class Clash(Brier):
    name = "jsd"


KIND = Clash()
"""


def test_missing_plugin_module_exits_2(cli):
    result = cli("--plugin", "no_such_plugin_module", "validate", str(ROOT / "examples" / "lm.yaml"))
    assert result.exit_code == 2
    assert result.stderr == (
        "error: plugin 'no_such_plugin_module' (from --plugin) cannot be imported: "
        "ModuleNotFoundError: No module named 'no_such_plugin_module'\n"
    )
    assert result.stdout == ""


def test_clashing_plugin_exits_2_naming_the_kind_and_its_owner(cli, plugin_dir: Path, registry_restored):
    (plugin_dir / "clashing_kinds.py").write_text(CLASHING, encoding="utf-8")
    result = cli("--plugin", "clashing_kinds", "kinds")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: plugin 'clashing_kinds' (from --plugin) registers the loss kind 'jsd', but a loss kind of that "
        "name is already registered (built in); rename one of them\n"
    )


def test_plugin_that_raises_while_imported(cli, plugin_dir: Path):
    (plugin_dir / "raising_kinds.py").write_text("raise RuntimeError('needs a GPU')\n", encoding="utf-8")
    result = cli("--plugin", "raising_kinds", "schema")
    assert result.exit_code == 2
    assert "plugin 'raising_kinds' (from --plugin) cannot be imported: RuntimeError: needs a GPU" in result.stderr


def test_environment_plugin_errors_name_the_variable(graph: Path):
    result = run_lossgraph("validate", str(graph), env={"LOSSGRAPH_PLUGINS": "brier_kind,no_such_plugin_module"})
    assert result.returncode == 2
    assert "error: plugin 'no_such_plugin_module' (from LOSSGRAPH_PLUGINS) cannot be imported" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_broken_plugin_does_not_break_import_help_or_init(tmp_path: Path):
    """Plugins load when the kinds are first read: `import lossgraph`, `--help` and `init` never read them."""
    env = {"LOSSGRAPH_PLUGINS": "no_such_plugin_module"}
    assert run_lossgraph("--help", env=env).returncode == 0
    assert run_lossgraph("validate", "--help", env=env).returncode == 0
    assert run_lossgraph("init", str(tmp_path / "starter.yaml"), env=env).returncode == 0
    environment = {**os.environ, **env}
    imported = subprocess.run([sys.executable, "-c", "import lossgraph"], env=environment, check=False)
    assert imported.returncode == 0


# --------------------------------------------------------------------------------------------------
# The loading rules, called directly.
# --------------------------------------------------------------------------------------------------


def test_module_attribute_forms(plugin_dir: Path, registry_restored):
    (plugin_dir / "forms_kinds.py").write_text(
        textwrap.dedent(
            """\
            from brier_kind import Brier

            class Other(Brier):
                name = "other_brier"

            def register():
                from lossgraph.kinds import register_loss_kind
                register_loss_kind(Other())

            def offer():
                from brier_kind import KIND
                return [KIND]

            NOT_A_KIND = 3
            """
        ),
        encoding="utf-8",
    )
    load_plugin("forms_kinds:register", "--plugin")
    load_plugin("forms_kinds:offer", "--plugin")
    origins = {entry.name: entry.origin for entry in registered_kinds()}
    assert origins["other_brier"] == "--plugin forms_kinds:register"
    assert origins["brier"] == "--plugin forms_kinds:offer"
    with pytest.raises(PluginError, match=r"plugin 'forms_kinds:NOT_A_KIND' \(from --plugin\) offers 3, which is not"):
        load_plugin("forms_kinds:NOT_A_KIND", "--plugin")
    with pytest.raises(PluginError, match="module 'forms_kinds' has no attribute 'missing'"):
        load_plugin("forms_kinds:missing", "--plugin")


def test_a_module_without_kinds_is_an_error(plugin_dir: Path):
    (plugin_dir / "empty_kinds.py").write_text("X = 1\n", encoding="utf-8")
    with pytest.raises(PluginError, match=r"plugin 'empty_kinds' \(from LOSSGRAPH_PLUGINS\) registers no kinds"):
        load_plugin("empty_kinds", "LOSSGRAPH_PLUGINS")


# --------------------------------------------------------------------------------------------------
# An unknown type says how plugins load.
# --------------------------------------------------------------------------------------------------


def test_unknown_type_says_how_plugins_load(cli, graph: Path):
    result = cli("validate", str(graph))
    assert result.exit_code == 1
    line = f"{graph}:10:13: losses.b.type: unknown type 'brier' (one of: {', '.join(k.name for k in loss_kinds())}); "
    assert f"{line}{PLUGIN_HINT}" in result.stdout.splitlines()
    assert "--plugin MODULE" in PLUGIN_HINT and "LOSSGRAPH_PLUGINS" in PLUGIN_HINT and "lossgraph.kinds" in PLUGIN_HINT


def test_a_misspelled_type_gets_the_guess_not_the_plugin_hint():
    report = lossgraph.check_text(BRIER_GRAPH.replace("type: brier", "type: forwardkl"))
    (message,) = [d.message for d in report.errors]
    assert "did you mean 'forward_kl'?" in message and "plugin" not in message


# --------------------------------------------------------------------------------------------------
# An installed package, through its entry point.
# --------------------------------------------------------------------------------------------------


def install_plugin(site: Path, entry_point: str, module_text: str) -> None:
    """A package installed by hand into `site`: its module and the .dist-info that pip would write."""
    site.mkdir(exist_ok=True)
    (site / "brier_plugin.py").write_text(module_text, encoding="utf-8")
    info = site / "brier_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brier-plugin\nVersion: 0.1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[lossgraph.kinds]\nbrier = {entry_point}\n", encoding="utf-8")
    (info / "RECORD").write_text("", encoding="utf-8")


def test_installed_plugin_works_through_its_entry_point(tmp_path: Path, graph: Path):
    site = tmp_path / "site"
    install_plugin(site, "brier_plugin:KIND", (TESTS / "brier_kind.py").read_text(encoding="utf-8"))
    validated = run_lossgraph("validate", str(graph), pythonpath=(site, TESTS))
    assert validated.returncode == 0, validated.stderr
    assert validated.stdout == f"{graph}: valid (0 error(s), 0 warning(s))\n"
    listed = run_lossgraph("kinds", pythonpath=(site, TESTS))
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if "brier" in line]
    assert "loss" in line and "entry point brier-plugin (brier_plugin:KIND)" in line
    # the same kind named again on the command line is no clash
    both = run_lossgraph("--plugin", "brier_plugin", "kinds", "--json", pythonpath=(site, TESTS))
    assert both.returncode == 0, both.stderr
    brier = [entry for entry in json.loads(both.stdout)["losses"] if entry["type"] == "brier"]
    assert brier == [{"type": "brier", "from": "entry point brier-plugin (brier_plugin:KIND)"}]
    # without the package the same graph is unknown
    assert run_lossgraph("validate", str(graph), pythonpath=(TESTS,)).returncode == 1


def test_broken_entry_point_names_the_package(tmp_path: Path, graph: Path):
    site = tmp_path / "site"
    install_plugin(site, "brier_plugin:KIND", "import no_such_dependency\n")
    result = run_lossgraph("validate", str(graph), pythonpath=(site, TESTS))
    assert result.returncode == 2
    assert result.stderr == (
        "error: plugin 'brier_plugin:KIND' (from entry point 'brier' of brier-plugin) cannot be imported: "
        "ModuleNotFoundError: No module named 'no_such_dependency'\n"
    )
