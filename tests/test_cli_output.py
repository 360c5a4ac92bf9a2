"""What the commands print, beyond exit codes: help without Python types, `plan` at 80 columns and its
notes, tables and trees unwrapped in a pipe (COLUMNS honoured), `viz` labels and layout, the `init`
template.

Each test says what must appear and what must not; the exit codes are in test_cli.py, the documented
outputs in test_docs.py.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from lossgraph.cli.app import app
from lossgraph.document import load

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
EVERY_LOSS = ROOT / "examples" / "every_loss.yaml"
MTP = ROOT / "examples" / "mtp_distill.yaml"
COMMANDS = sorted(get_command(app).commands)
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not on PATH")

TOPK_AT_T2 = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
sources:
  labels: {type: labels}
  cached: {type: topk_teacher, k: 64, tail: renormalize}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
  distill: {type: forward_kl, heads: [next], target: cached, temperature: 2.0}
"""

HIDDEN = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1, input: hidden}
sources:
  labels: {type: labels}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
"""


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------

PYTHON_TYPES = re.compile(r"<(bool|int|float|str|path|list\[[^>]*\]|int range|float range)>|\{\w+\}")


@pytest.mark.parametrize("command", [None, *COMMANDS], ids=lambda c: c or "lossgraph")
def test_help_shows_metavars_not_python_types(cli, wide, command):
    result = cli(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert not PYTHON_TYPES.findall(result.stdout), f"Python types in `{command} --help`:\n{result.stdout}"
    assert "<" not in result.stdout.replace("<-", ""), result.stdout


@pytest.mark.parametrize(
    ("command", "usage", "metavars"),
    [
        ("validate", "lossgraph validate [OPTIONS] FILE...", []),
        ("plan", "lossgraph plan [OPTIONS] FILE", ["--tokens N", "--vocab V", "--bandwidth GBPS", "--hidden H"]),
        ("viz", "lossgraph viz [OPTIONS] FILE", ["mermaid|dot|svg|png", "--output -o PATH"]),
        ("init", "lossgraph init [OPTIONS] [PATH]", []),
        ("bench", "lossgraph bench [OPTIONS] [CASE|FILE...]", ["--dtype bf16|fp16|fp32", "--device auto|cpu|cuda"]),
        ("demo", "lossgraph demo [OPTIONS]", ["--graph FILE", "--steps N", "--out DIR", "--device cpu|cuda"]),
    ],
)
def test_help_names_arguments_as_the_docs_do(cli, wide, command, usage, metavars):
    text = re.sub(r"[ │]+", " ", cli(command, "--help").stdout)
    assert usage in text, text
    for metavar in metavars:
        assert metavar in text, f"{metavar!r} not in `{command} --help`:\n{text}"


def test_flags_show_no_type(cli, wide):
    text = cli("validate", "--help").stdout
    line = next(line for line in text.splitlines() if "--strict" in line)
    assert re.search(r"--strict\s+Treat warnings as errors", line), line


def test_command_list_has_one_line_summaries(cli, wide):
    text = cli("--help").stdout
    commands = text[text.index("Commands") :]
    for name in COMMANDS:
        line = next(line for line in commands.splitlines() if re.match(rf"^│ {name}\s", line))
        assert line.rstrip(" │").endswith("."), f"the summary of {name} is cut or wraps: {line!r}"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_paragraphs_are_single_lines(name):
    # Typer's rich help keeps a docstring's line breaks, so a paragraph over several source lines
    # prints ragged, broken mid-sentence wherever the source wrapped
    text = inspect.cleandoc(get_command(app).commands[name].help)
    for paragraph in text.split("\n\n"):
        assert "\n" not in paragraph, f"`lossgraph {name} --help` breaks a paragraph: {paragraph!r}"


def test_bench_help_names_loss_graph_files(cli, wide):
    text = " ".join(cli("bench", "--help").stdout.split())
    assert "paths of loss-graph files" in text, text
    assert "CASE|FILE..." in text


def test_missing_argument_names_the_metavar(cli):
    result = cli("validate")
    assert result.exit_code == 2
    assert "Missing argument 'FILE...'" in result.output


# --------------------------------------------------------------------------------------------------
# Width of the output
# --------------------------------------------------------------------------------------------------

# A graph whose `show` tree has a line of 102 columns (the tutorial's scheduled distillation).
SCHEDULED = """\
version: 1
vocab_size: 256
heads:
  next: {offset: 1}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
losses:
  distill:
    type: forward_kl
    heads: [next]
    target: teacher
    temperature: 2.0
    temperature_scaling: true
    weight: {schedule: cosine, start: 0.0, end: 0.5, steps: 200, warmup: 20}
"""
SCHEDULED_LINE = (
    "│       └── distill: forward_kl <- teacher, weight cosine 0 -> 0.5 over 200 steps after 20, T 2, x T^2"
)


def piped(*args: str | Path, **env: str) -> str:
    """What `lossgraph ARGS` writes into a pipe, run in its own process as from a script or CI, without
    COLUMNS or forced colours unless `env` sets them; styles (bold headers) taken out."""
    inherited = {name: value for name, value in os.environ.items() if name not in ("COLUMNS", "FORCE_COLOR")}
    result = subprocess.run(
        [sys.executable, "-m", "lossgraph", *map(str, args)],
        cwd=ROOT,
        env={**inherited, "NO_COLOR": "1", **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)


@pytest.mark.parametrize("env", [{}, {"FORCE_COLOR": "1"}], ids=["plain", "FORCE_COLOR"])
def test_piped_tables_and_trees_keep_their_whole_width(tmp_path, env):
    """rich wraps at 80 columns without a terminal (FORCE_COLOR makes it think it has one): the plan's
    first row split in two, the tree's line broke."""
    plan = piped("plan", EVERY_LOSS, "--tokens", "4096", **env)
    rows = table_lines(plan)
    assert "│ next │ lm, z, fkl, rkl, tvd, entropy │      2 │" in plan, plan
    assert len(rows) == 6 and {len(row) for row in rows} == {81}, plan  # one line per launch, none ragged
    tree = piped("show", write(tmp_path, "scheduled.yaml", SCHEDULED), **env)
    assert SCHEDULED_LINE in tree.splitlines(), tree


def test_columns_sets_the_width_of_piped_output(tmp_path):
    plan = piped("plan", EVERY_LOSS, "--tokens", "4096", COLUMNS="80")
    rows = table_lines(plan)
    assert {len(row) for row in rows} == {80} and re.search(r"^│ +│ entropy +│", plan, re.MULTILINE), plan
    tree = piped("show", write(tmp_path, "scheduled.yaml", SCHEDULED), COLUMNS="80")
    assert SCHEDULED_LINE not in tree.splitlines() and max(len(line) for line in tree.splitlines()) <= 80, tree


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_plan_table_fits_80_columns_and_never_splits_a_name(cli, narrow, path):
    result = cli("plan", path, "--vocab", "128256")
    assert result.exit_code == 0, result.output
    rows = table_lines(result.stdout)
    assert rows, result.stdout
    assert max(len(line) for line in rows) <= 80, "\n".join(rows)
    spec = load(path)
    cells = " ".join(line.split("│")[2] for line in rows if line.startswith("│"))
    words = re.findall(r"[\w.-]+", cells)
    for name in spec.losses:  # every loss node is named whole in the table (never `distill/ne` + `xt`)
        assert name in words, f"{name!r} split or missing in:\n" + "\n".join(rows)
    assert set(words) <= set(spec.losses), "\n".join(rows)


def test_plan_lists_softmax_states_per_launch_not_beside_terms(cli, wide):
    result = cli("plan", MTP, "--vocab", "128256")
    assert result.exit_code == 0, result.output
    text = result.stdout
    header = next(line for line in table_lines(text) if line.startswith("┃"))
    assert "softmax states" not in header and "loss nodes" in header
    assert "│ next │ lm, distill, z │      2 │ 1,282,560 │" in text
    states = text[text.index("softmax states each launch keeps (its terms share them):") :].splitlines()
    assert states[1:4] == [
        "  next: student T=1, student T=2, teacher T=2",
        "  mtp2: student T=1",
        "  mtp3: student T=1",
    ]
    assert "total 21.53 GiB in 7.705 ms at 3000 GB/s, 1.57x the floor" in text.splitlines()


def test_plan_names_the_launches_of_a_split_head(cli, wide, tmp_path):
    teachers = "\n".join(f"  t{i}: {{type: teacher}}" for i in range(5))
    losses = "\n".join(f"  kd{i}: {{type: forward_kl, heads: [next], target: t{i}}}" for i in range(5))
    path = write(
        tmp_path,
        "five.yaml",
        f"version: 1\nvocab_size: 64\nheads: {{next: {{}}}}\nsources:\n{teachers}\nlosses:\n{losses}\n",
    )
    result = cli("plan", path)
    assert result.exit_code == 0, result.output
    assert "│ next #1 │ kd0, kd1, kd2, kd3 │" in result.stdout, result.stdout
    assert "│ next #2 │ kd4 " in result.stdout
    assert "  next #2: student T=1, t4 T=1" in result.stdout.splitlines()
    assert re.search(r"^note \(next #2\): split: head 'next' reads 5 dense teachers", result.stdout, re.MULTILINE)


def test_plan_says_why_a_renormalized_topk_term_has_no_student_state(cli, wide, tmp_path):
    result = cli("plan", write(tmp_path, "offline.yaml", TOPK_AT_T2))
    assert result.exit_code == 0, result.output
    assert "  next: student T=1" in result.stdout.splitlines()  # no student T=2 state ...
    notes = [line for line in result.stdout.splitlines() if line.startswith("note (next): ")]
    assert notes == [  # ... and the plan says why
        "note (next): no student softmax state at T=2: distill/next (top-k teacher 'cached', k 64) uses tail: "
        "renormalize, which renormalizes the student over the k stored tokens of each row, so no softmax over "
        "the whole row is kept at that temperature"
    ]
    payload = json.loads(cli("plan", tmp_path / "offline.yaml", "--json").stdout)
    assert any("no student softmax state at T=2" in note for note in payload["launches"][0]["notes"])


def test_plan_has_no_topk_note_when_the_student_state_exists(cli, wide, tmp_path):
    same = TOPK_AT_T2.replace("target: labels}", "target: labels, temperature: 2.0}").replace(
        "lm: {type: cross_entropy", "lm: {type: forward_kl"
    )
    same = same.replace("labels: {type: labels}", "labels: {type: teacher}")
    result = cli("plan", write(tmp_path, "same.yaml", same))
    assert result.exit_code == 0, result.output
    assert "student T=2" in result.stdout and "no student softmax state" not in result.stdout


@pytest.mark.parametrize("options", [["--hidden", "4096"], ["--hidden", "4096", "--tflops", "400"], ["--tflops", "1"]])
def test_plan_says_hidden_is_ignored_without_hidden_heads(cli, wide, options):
    result = cli("plan", MTP, *options)
    assert result.exit_code == 0, result.output
    given = " and ".join(option for option in options if option.startswith("--"))
    assert result.stderr.startswith(f"warning: {given} ignored: no head of {MTP} takes hidden states"), result.stderr
    assert "peak extra memory" not in result.stdout
    json_result = cli("plan", MTP, *options, "--json")  # stdout stays one JSON document
    assert json_result.stdout.lstrip().startswith("{") and "warning" in json_result.stderr


def test_plan_with_hidden_heads_uses_hidden_quietly(cli, wide, tmp_path):
    result = cli("plan", write(tmp_path, "hidden.yaml", HIDDEN), "--hidden", "4096")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "peak extra memory" in result.stdout
    assert cli("plan", MTP).stderr == ""  # no option, no warning


# --------------------------------------------------------------------------------------------------
# viz
# --------------------------------------------------------------------------------------------------


def labels(dot: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'^\s*(\w+) \[label="([^"]*)"', dot, re.MULTILINE)}


def test_viz_labels_show_the_kind_once_and_what_scales_a_term(cli):
    dot = cli("viz", "-f", "dot", EVERY_LOSS).stdout
    found = labels(dot)
    assert found["loss_jsd"] == "jsd\\nw 0.2, β 0.3"  # not "jsd\njsd"
    assert found["loss_fkl"] == "fkl\\nforward_kl\\nw 1, T 2, ×T²"
    assert found["loss_entropy"] == "entropy\\nw linear -0.01 → 0 over\\n1000 steps"
    assert found["source_teacher"] == "teacher\\nt+1"
    assert found["source_teacher2"] == "teacher2\\nteacher\\nt+2, V 32064 (truncate)"
    assert found["source_cached"] == "cached\\ntopk_teacher\\nk 32, renormalize, t+1"
    assert found["source_smooth"] == "smooth\\nlabel_smoothing\\nε 0.1"
    assert found["source_labels"] == "labels"
    for name, text in found.items():
        lines = text.split("\\n")
        assert len(lines) == len(set(lines)), f"{name} repeats a line: {text!r}"
        assert all(len(line) <= 26 for line in lines), f"{name} has a line too long for its box: {text!r}"
    mermaid = cli("viz", EVERY_LOSS).stdout
    assert 'loss_jsd{{"jsd<br/>w 0.2, β 0.3"}}' in mermaid
    assert 'source_teacher2[/"teacher2<br/>teacher<br/>t+2, V 32064 (truncate)"/]' in mermaid


def test_viz_head_weights_read_as_factors(cli):
    mermaid = cli("viz", MTP).stdout
    assert '  loss_lm -->|"×0.5"| head_mtp2' in mermaid.splitlines()


def crossing_edges(dot: str) -> int:
    """How many pairs of drawn edges cross, with edges as straight lines between Graphviz's node centres."""
    plain = subprocess.run(["dot", "-Tplain"], input=dot.encode(), capture_output=True, check=True).stdout.decode()
    centre = {p[1]: (float(p[2]), float(p[3])) for p in (line.split() for line in plain.splitlines()) if p[0] == "node"}
    edges = [(m.group(1), m.group(2)) for m in re.finditer(r"^\s*(\w+) -> (\w+)", dot, re.MULTILINE)]

    def turn(p, q, r):
        return (r[1] - p[1]) * (q[0] - p[0]) > (q[1] - p[1]) * (r[0] - p[0])

    count = 0
    for (a, b), (c, d) in itertools.combinations(edges, 2):
        if len({a, b, c, d}) == 4:
            p, q, r, s = centre[a], centre[b], centre[c], centre[d]
            count += turn(p, r, s) != turn(q, r, s) and turn(p, q, r) != turn(p, q, s)
    return count


@needs_dot
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_viz_draws_the_examples_without_crossing_edges(cli, path):
    # every_loss.yaml drew four crossings when the three columns were Graphviz clusters
    assert crossing_edges(cli("viz", "-f", "dot", path).stdout) == 0


def test_viz_dot_puts_losses_and_heads_in_one_column_each(cli):
    dot = cli("viz", "-f", "dot", EVERY_LOSS).stdout
    assert "{ rank=same; loss_lm; loss_z; loss_fkl; loss_rkl; loss_jsd; loss_tvd; loss_entropy; }" in dot
    assert "{ rank=same; head_next; head_mtp2; }" in dot
    assert "cluster" not in dot


# --------------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------------


def test_init_template_does_not_ask_to_uncomment_a_comment(cli, tmp_path):
    path = tmp_path / "graph.yaml"
    assert cli("init", path).exit_code == 0
    text = path.read_text(encoding="utf-8")
    assert "uncomment" not in text.lower()
    assert "# yaml-language-server: $schema=lossgraph.schema.json" in text.splitlines()
    assert "lossgraph schema -o lossgraph.schema.json" in text
