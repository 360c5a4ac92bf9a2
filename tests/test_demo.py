"""`lossgraph demo` trains and writes what it promises, and docs/tutorial.md runs.

- One short demo run (module fixture, through the CLI): summary.json, metrics.jsonl, metrics.csv and
  the plots exist and parse, each phase's training loss fell, the held-out losses are finite, and the
  command says where it wrote them. metrics.jsonl names its numbers as GraphOutput does (`terms` after
  the weights, `values` before them), and metrics.csv holds every one of them.
- A run shorter than the display's refresh still shows the latest loss of every node; the verdict's
  sign is the sign of the change.
- Every figure the demo writes shows its whole title, axis labels, tick labels and legend.
- Bad graphs fail cleanly (exit 1, a located message, no traceback); the tutorial's graph without a
  teacher trains one student, no baseline, and nothing the demo prints or writes (tables, metrics,
  summary, plots) calls it distilled or names a teacher; `without_teachers` strips exactly the
  teacher's nodes and sources.
- The demo's packaged graph is examples/mtp_distill.yaml, byte for byte.
- The tutorial's ```python blocks run in order in one namespace, in a directory holding the files its
  ```bash blocks create and the demo's output; the tutorial and docs/cli.md name every summary field and
  show the results table and verdict as the demo prints them for their numbers.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lossgraph.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mtp_distill.yaml"
PACKAGED = ROOT / "lossgraph" / "data" / "mtp_distill.yaml"
TUTORIAL = ROOT / "docs" / "tutorial.md"
CLI_PAGE = ROOT / "docs" / "cli.md"
STEPS = 30
PHASES = ["teacher", "student (distilled)", "student (no teacher)"]
SUMMARY_KEYS = {"teacher_held_out_loss", "student_held_out_loss", "baseline_held_out_loss", "training_loss", "seconds"}


def invoke(*args: str | Path):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def graph_variant(tmp_path: Path, name: str, source: Path, old: str, new: str) -> Path:
    """A copy of `source` with `old` replaced by `new` (which must occur in it)."""
    text = source.read_text(encoding="utf-8")
    assert old in text, f"{source.name} no longer contains {old!r}; update this test"
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tutorial_file(tmp_path: Path, name: str) -> Path:
    """The file `name` as docs/tutorial.md's `cat > NAME <<'EOF'` heredoc writes it, in `tmp_path`."""
    match = re.search(
        rf"^cat > {re.escape(name)} <<'EOF'\n(.*?)^EOF$", TUTORIAL.read_text(encoding="utf-8"), re.M | re.S
    )
    assert match, f"docs/tutorial.md no longer writes {name}; update this test"
    path = tmp_path / name
    path.write_text(match.group(1), encoding="utf-8")
    return path


def outside_the_figure(figure) -> list[str]:
    """What of a figure, once drawn, does not lie wholly inside it: its titles, each panel's title, axis
    labels and legend, and each panel with the tick labels it draws."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [
        *figure.texts,
        *(text for axis in figure.axes for text in (axis.title, axis.xaxis.label, axis.yaxis.label)),
    ]
    boxes = [(f"{text.get_text()!r}", text.get_window_extent(renderer)) for text in texts if text.get_text()]
    for axis in figure.axes:
        if axis.get_legend() is not None:
            boxes.append((f"the legend of {axis.get_title()!r}", axis.get_legend().get_window_extent(renderer)))
        boxes.append((f"panel {axis.get_title()!r} with its tick labels", axis.get_tightbbox(renderer)))
    frame = figure.bbox
    size = f"{frame.width:.0f}x{frame.height:.0f}"
    return [
        f"{name} spans x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f} of the figure's {size}"
        for name, box in boxes
        if box.x0 < frame.x0 or box.y0 < frame.y0 or box.x1 > frame.x1 or box.y1 > frame.y1
    ]


def figure_texts(figure) -> list[str]:
    """Every text drawn in a figure: titles, labels, legend entries, tick labels."""
    from matplotlib.text import Text

    return [text.get_text() for text in figure.findobj(Text) if text.get_visible() and text.get_text()]


@pytest.fixture
def saved_figures(monkeypatch) -> dict[str, dict]:
    """Each figure saved while the test runs, by file name: its texts and what of it lies outside it."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    saved: dict[str, dict] = {}
    savefig = Figure.savefig

    def record(figure, path, *args, **kwargs):
        saved[Path(path).name] = {"texts": figure_texts(figure), "outside": outside_the_figure(figure)}
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def logs_of(rows: list[dict]) -> list:
    """metrics.jsonl's rows as the demo's RunLogs, phase by phase, for redrawing its plots."""
    from lossgraph.apps import demo

    logs = []
    for phase in dict.fromkeys(row["phase"] for row in rows):
        log = demo.RunLog(phase, [row for row in rows if row["phase"] == phase])
        log.held_out = [(row["step"] + 1, row["held_out_loss"]) for row in log.rows if "held_out_loss" in row]
        logs.append(log)
    return logs


# --------------------------------------------------------------------------------------------------
# One short run of the default demo.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`lossgraph demo --steps 30 --out WORK/lossgraph-demo`: (work dir, out dir, CLI result)."""
    pytest.importorskip("torch")
    work = tmp_path_factory.mktemp("demo")
    out = work / "lossgraph-demo"
    return work, out, invoke("demo", "--steps", STEPS, "--out", out)


@pytest.mark.slow
def test_demo_exits_0_and_says_where_it_wrote(demo_run):
    _, out, result = demo_run
    assert result.exit_code == 0, result.output
    assert "wrote:" in result.output
    for name in ("metrics.jsonl", "metrics.csv", "summary.json"):
        assert str(out / name) in result.output, f"the demo does not say it wrote {name}:\n{result.output}"
    assert "held-out next-token loss" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_demo_summary(demo_run):
    _, out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert SUMMARY_KEYS <= set(summary), f"summary.json lacks {SUMMARY_KEYS - set(summary)}"
    assert summary["steps"] == STEPS
    for key in ("teacher_held_out_loss", "student_held_out_loss", "baseline_held_out_loss"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, (key, summary)
    assert list(summary["training_loss"]) == PHASES
    for phase, loss in summary["training_loss"].items():
        assert math.isfinite(loss["first"]) and math.isfinite(loss["last10_mean"])
        assert loss["last10_mean"] < loss["first"], f"the training loss of {phase!r} did not fall: {loss}"
    assert summary["seconds"] > 0


@pytest.mark.slow
def test_demo_metrics_jsonl(demo_run):
    _, out, _ = demo_run
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["phase"] for row in rows] == [phase for phase in PHASES for _ in range(STEPS)]
    for phase in PHASES:
        mine = [row for row in rows if row["phase"] == phase]
        assert [row["step"] for row in mine] == list(range(STEPS))
        losses = [row["loss"] for row in mine]
        assert all(math.isfinite(loss) for loss in losses)
        assert sum(losses[-10:]) / 10 < losses[0], f"{phase}: {losses}"
        assert "held_out_loss" in mine[-1], f"{phase}: the last step is not scored on held-out text"
        for row in mine:  # the weighted node losses and the weighted terms add up to the step's loss
            assert sum(row["nodes"].values()) == pytest.approx(row["loss"], rel=1e-4, abs=1e-6)
            assert sum(row["terms"].values()) == pytest.approx(row["loss"], rel=1e-4, abs=1e-6)
            assert set(row["terms"]) == set(row["values"])
    nodes = {phase: set(next(row for row in rows if row["phase"] == phase)["nodes"]) for phase in PHASES}
    assert nodes == {
        "teacher": {"lm"},
        "student (distilled)": {"lm", "distill", "z"},
        "student (no teacher)": {"lm", "z"},
    }
    distilled = next(row for row in rows if row["phase"] == "student (distilled)")
    assert set(distilled["terms"]) == {"lm/next", "lm/mtp2", "lm/mtp3", "distill/next", "z/next"}
    assert set(distilled["accuracy"]) == {"next", "mtp2", "mtp3"}
    # `terms` after weight x head weight (as GraphOutput.terms), `values` before (as GraphOutput.values)
    weights = {"lm/next": 1.0, "lm/mtp2": 0.5, "lm/mtp3": 0.25, "distill/next": 0.5, "z/next": 1e-4}
    for key, weight in weights.items():
        assert distilled["terms"][key] == pytest.approx(weight * distilled["values"][key], rel=1e-5), key


@pytest.mark.slow
def test_demo_metrics_csv(demo_run):
    _, out, _ = demo_run
    with (out / "metrics.csv").open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["phase", "step", "series", "value"]
    body = rows[1:]
    assert {row[0] for row in body} == set(PHASES)
    assert all(math.isfinite(float(row[3])) for row in body)
    jsonl = read_jsonl(out / "metrics.jsonl")
    loss_rows = [(row[0], int(row[1]), float(row[3])) for row in body if row[2] == "loss"]
    assert loss_rows == [(row["phase"], row["step"], row["loss"]) for row in jsonl]
    assert {row[2] for row in body} >= {"loss", "node/lm", "node/distill", "node/z", "held_out_loss"}
    # the same numbers as metrics.jsonl, every one of them
    expected = []
    for row in jsonl:
        expected.append((row["phase"], row["step"], "loss", row["loss"]))
        for field, prefix in (("nodes", "node"), ("terms", "term"), ("values", "value"), ("accuracy", "accuracy")):
            expected += [(row["phase"], row["step"], f"{prefix}/{name}", value) for name, value in row[field].items()]
        if "held_out_loss" in row:
            expected.append((row["phase"], row["step"], "held_out_loss", row["held_out_loss"]))
    assert [(row[0], int(row[1]), row[2], float(row[3])) for row in body] == expected
    assert ("student (distilled)", 0, "term/distill/next") in {(p, s, series) for p, s, series, _ in expected}


@pytest.mark.slow
def test_demo_plots(demo_run):
    pytest.importorskip("matplotlib")
    _, out, _ = demo_run
    for name in ("loss_lm", "loss_distill", "loss_z", "held_out"):
        path = out / f"{name}.png"
        assert path.is_file(), f"{path.name} was not written"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_plots_compare_terms_before_their_weights(demo_run, monkeypatch):
    """Each plot of a loss node has one panel per head, with the term before its weights: the teacher's
    lm/next is drawn next to the students' lm/next, never next to their sum over three heads."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from lossgraph.apps import demo

    _, out, _ = demo_run
    logs = logs_of(read_jsonl(out / "metrics.jsonl"))
    assert [log.phase for log in logs] == PHASES
    drawn: dict[str, dict[str, list]] = {}
    savefig = plt.Figure.savefig

    def record(figure, path, *args, **kwargs):
        drawn[Path(path).name] = {
            axis.get_title(): [(line.get_label(), list(line.get_ydata())) for line in axis.get_lines()]
            for axis in figure.axes
        }
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", record)
    demo._plots(out, logs)
    assert set(drawn["loss_lm.png"]) == {"lm/next", "lm/mtp2", "lm/mtp3"}
    assert [label for label, _ in drawn["loss_lm.png"]["lm/next"]] == PHASES
    assert [label for label, _ in drawn["loss_lm.png"]["lm/mtp2"]] == PHASES[1:]
    teacher = dict(drawn["loss_lm.png"]["lm/next"])["teacher"]
    assert teacher == pytest.approx(demo._smooth(tuple(row["values"]["lm/next"] for row in logs[0].rows)))
    distill = dict(drawn["loss_distill.png"]["distill/next"])["student (distilled)"]
    unweighted = demo._smooth(tuple(row["values"]["distill/next"] for row in logs[1].rows))
    assert distill == pytest.approx(unweighted)  # not the weighted term (weight 0.5)
    held_out = dict(drawn["held_out.png"]["held-out next-token loss"])
    assert list(held_out) == PHASES
    assert held_out["teacher"] == pytest.approx([value for _, value in logs[0].held_out])


@pytest.mark.slow
def test_demo_figures_show_their_whole_titles_and_legends(demo_run, saved_figures):
    """The default graph's figures: loss_distill.png's title, wider than its one panel, was cut at both
    edges."""
    from lossgraph.apps import demo

    _, out, _ = demo_run
    written = {path.name for path in demo._plots(out, logs_of(read_jsonl(out / "metrics.jsonl")))}
    assert written == set(saved_figures) == {"loss_lm.png", "loss_distill.png", "loss_z.png", "held_out.png"}
    for name, figure in saved_figures.items():
        assert not figure["outside"], f"{name}: " + "; ".join(figure["outside"])


def test_plots_fit_long_names_in_their_figures(tmp_path, saved_figures):
    """A node with a long name, on one head and on three: the title wraps inside the figure."""
    pytest.importorskip("torch")
    from lossgraph.apps import demo

    node = "distillation_from_the_ensemble"
    heads = {1: ["next"], 3: ["next", "mtp2", "mtp3"]}
    for count, names in heads.items():
        rows = [{"step": step, "values": {f"{node}/{head}": 1 / (step + 1) for head in names}} for step in range(20)]
        log = demo.RunLog("student (distilled)", rows, [(20, 1.0)])
        demo._plots(tmp_path, [log])
        figure = saved_figures[f"loss_{node}.png"]
        assert not figure["outside"], f"{count} head(s): " + "; ".join(figure["outside"])
    assert not saved_figures["held_out.png"]["outside"]


@pytest.mark.slow
def test_demo_with_few_steps_shows_the_latest_loss_of_every_node(tmp_path):
    """The live table is drawn from the last step, even in a run shorter than its refresh interval."""
    pytest.importorskip("torch")
    result = invoke("demo", "--steps", 2, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    text = result.output
    table = text[text.index("latest loss per node (weighted)") : text.index("held-out next-token loss")]
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if line.startswith("│")}
    assert set(rows) == set(PHASES), table
    for phase, line in rows.items():
        numbers = re.findall(r"\d+\.\d{4}", line)
        assert len(numbers) == {"teacher": 2, "student (distilled)": 4, "student (no teacher)": 3}[phase], line


def test_verdict_says_lower_with_a_minus_sign():
    from rich.console import Console

    from lossgraph.apps.demo import _report

    def verdict(student: float, baseline: float) -> str:
        console = Console(record=True, width=200)
        summary = {"student_held_out_loss": student, "baseline_held_out_loss": baseline, "seconds": 1.0}
        _report(console, [], summary, [])
        return next(line for line in console.export_text().splitlines() if line.startswith("the teacher"))

    assert verdict(1.8216, 1.8959) == (
        "the teacher made the student's held-out loss 0.0743 nats per byte lower (-3.9%)"
    )
    assert verdict(2.0, 1.6) == "the teacher made the student's held-out loss 0.4000 nats per byte higher (+25.0%)"


# --------------------------------------------------------------------------------------------------
# Other graphs.
# --------------------------------------------------------------------------------------------------


def test_demo_invalid_graph_is_a_located_error(tmp_path):
    pytest.importorskip("torch")
    bad = graph_variant(
        tmp_path, "bad.yaml", EXAMPLE, "heads: [next]\n    target: teacher", "heads: [next, mtp2]\n    target: teacher"
    )
    lines = bad.read_text(encoding="utf-8").splitlines()
    line = next(index for index, text in enumerate(lines, 1) if "heads: [next, mtp2]" in text)
    column = lines[line - 1].index("mtp2") + 1
    result = invoke("demo", "--graph", bad, "--steps", 1, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert f"{bad}:{line}:{column}: losses.distill.heads[1]: head 'mtp2' predicts token t+2" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_demo_missing_graph_file_exits_2(tmp_path):
    pytest.importorskip("torch")
    result = invoke("demo", "--graph", tmp_path / "missing.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "missing.yaml" in result.output and "Traceback" not in result.output


def test_demo_needs_byte_vocab(tmp_path):
    pytest.importorskip("torch")
    big = graph_variant(tmp_path, "big.yaml", EXAMPLE, "vocab_size: 256", "vocab_size: 32000")
    result = invoke("demo", "--graph", big, "--steps", 1, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "256" in result.output and "vocab_size" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_graph_without_teachers_trains_one_student_and_calls_it_so(tmp_path, saved_figures):
    """The tutorial's lm.yaml: one phase, `student`, everywhere; no "distilled", no teacher, no baseline
    in what the demo prints or writes; its figures fit too."""
    pytest.importorskip("torch")
    lm = tutorial_file(tmp_path, "lm.yaml")
    out = tmp_path / "out"
    result = invoke("demo", "--graph", lm, "--steps", 3, "--out", out)
    assert result.exit_code == 0, result.output
    printed = result.output
    results = printed[printed.index("held-out next-token loss") :]
    assert re.search(r"^│ student +│ \d+\.\d{4} │", results, re.MULTILINE), results
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert math.isfinite(summary["student_held_out_loss"])
    assert "baseline_held_out_loss" not in summary and "teacher_held_out_loss" not in summary
    assert list(summary["training_loss"]) == ["student"]
    assert {row["phase"] for row in read_jsonl(out / "metrics.jsonl")} == {"student"}
    with (out / "metrics.csv").open(newline="", encoding="utf-8") as file:
        assert {row["phase"] for row in csv.DictReader(file)} == {"student"}
    assert set(saved_figures) == {"loss_lm.png", "loss_z.png", "held_out.png"}
    plots = {name: " | ".join(figure["texts"]) for name, figure in saved_figures.items()}
    assert "student" in plots["held_out.png"]
    written = {
        "printed": printed,
        **{name: (out / name).read_text(encoding="utf-8") for name in ("metrics.jsonl", "metrics.csv", "summary.json")},
        **plots,
    }
    for name, text in written.items():
        text = text.replace(str(tmp_path), "TMP")  # the folder is named after this test, not by the demo
        for word in ("distill", "teacher", "labels only", "baseline"):
            assert word not in text.lower(), f"{name} says {word!r} of a graph without a teacher:\n{text}"
    for name, figure in saved_figures.items():
        assert not figure["outside"], f"{name}: " + "; ".join(figure["outside"])


def test_without_teachers_removes_the_distillation_node_and_the_teacher():
    pytest.importorskip("torch")
    from lossgraph.apps.demo import default_graph_text, without_teachers
    from lossgraph.document import check_spec, loads

    spec = loads(default_graph_text(), "mtp_distill.yaml")
    baseline = without_teachers(spec)
    assert baseline is not None and check_spec(baseline).ok
    assert set(spec.losses) - set(baseline.losses) == {"distill"}
    assert set(baseline.losses) == {"lm", "z"}
    assert set(spec.sources) - set(baseline.sources) == {"teacher"}
    assert set(baseline.sources) == {"labels"}
    assert baseline.heads == spec.heads
    for name in baseline.losses:
        assert baseline.losses[name] == spec.losses[name]


def test_without_teachers_keeps_sources_derived_from_labels():
    pytest.importorskip("torch")
    from lossgraph.apps.demo import without_teachers
    from lossgraph.document import loads

    spec = loads(
        """
version: 1
vocab_size: 256
heads: {next: {offset: 1}}
sources:
  labels: {type: labels}
  smooth: {type: label_smoothing, source: labels, epsilon: 0.1}
  teacher: {type: teacher}
  blend: {type: mixture, sources: [teacher, smooth], weights: [0.5, 0.5]}
losses:
  lm: {type: cross_entropy, heads: [next], target: smooth}
  distill: {type: forward_kl, heads: [next], target: blend}
"""
    )
    baseline = without_teachers(spec)
    assert set(baseline.losses) == {"lm"}
    assert set(baseline.sources) == {"labels", "smooth"}
    only_teacher = loads(
        "version: 1\nvocab_size: 256\nheads: {next: {offset: 1}}\nsources: {teacher: {type: teacher}}\n"
        "losses: {distill: {type: forward_kl, heads: [next], target: teacher}}\n"
    )
    assert without_teachers(only_teacher) is None


def test_packaged_graph_is_the_example():
    assert PACKAGED.read_bytes() == EXAMPLE.read_bytes(), (
        "lossgraph/data/mtp_distill.yaml (the demo's default graph) differs from examples/mtp_distill.yaml; "
        "copy the example over the packaged file: cp examples/mtp_distill.yaml lossgraph/data/mtp_distill.yaml"
    )


# --------------------------------------------------------------------------------------------------
# The pages that describe the demo.
# --------------------------------------------------------------------------------------------------


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_docs_never_run_a_long_demo():
    # tests/test_docs.py runs every `lossgraph ...` line of a ```bash block; a full demo takes minutes.
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in fenced(page.read_text(encoding="utf-8"), "bash"):
            for line in block.splitlines():
                if line.strip().startswith("lossgraph demo"):
                    args = shlex.split(line, comments=True)
                    assert "--steps" in args and int(args[args.index("--steps") + 1]) <= 5, (
                        f"{page.name}: `{line.strip()}` would train for minutes inside tests/test_docs.py; "
                        "pass --steps 5 or fewer, or show it in a ```console block"
                    )


def test_pages_state_one_demo_duration():
    """README.md, the tutorial and docs/cli.md give the default demo's time as one range, and the
    sample output they show ("finished in N s") lies in it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"^make demo .*\((\d+)-(\d+) s\)$", readme, re.MULTILINE)
    assert stated, "README.md's `make demo` line no longer states the demo's time as (LOW-HIGH s)"
    low, high = int(stated.group(1)), int(stated.group(2))
    for page in (TUTORIAL, CLI_PAGE):
        text = page.read_text(encoding="utf-8")
        assert f"{low}-{high} s on two CPU cores" in text, f"{page.name} states another time than README.md"
        for seconds in re.findall(r"^finished in (\d+) s; wrote:$", text, re.MULTILINE):
            assert low <= int(seconds) <= high, f"{page.name} shows a run of {seconds} s, outside {low}-{high} s"
    for page in (ROOT / "README.md", TUTORIAL, CLI_PAGE):
        text = page.read_text(encoding="utf-8")
        assert "about a minute" not in text and "166 s" not in text, f"{page.name} keeps the old time"


@pytest.mark.parametrize("page", [TUTORIAL, CLI_PAGE], ids=lambda page: page.name)
def test_pages_show_the_results_as_the_demo_prints_them(page: Path):
    """The results table and verdict of a page's sample run are what the demo prints for its numbers: the
    rows' names, the bits per byte, the change, the layout."""
    pytest.importorskip("torch")
    from lossgraph.apps.demo import RunLog, _report
    from lossgraph.cli.app import out

    sample = next(block for block in fenced(page.read_text(encoding="utf-8"), "console") if "held-out" in block)
    shown = sample[sample.index("held-out next-token loss") : sample.index("finished in")]
    rows = re.findall(r"^│ (\S.*?) +│ +(\d+\.\d+) │", shown, re.MULTILINE)
    assert [phase for phase, _ in rows] == PHASES, shown
    logs = [RunLog(phase, held_out=[(300, float(loss))]) for phase, loss in rows]
    losses = dict(zip(("teacher", "student", "baseline"), (float(loss) for _, loss in rows)))
    summary = {f"{key}_held_out_loss": loss for key, loss in losses.items()} | {"seconds": 0.0}
    with out.capture() as captured:  # the command's own console, writing to a pipe
        _report(out, logs, summary, [])
    printed = re.sub(r"\x1b\[[0-9;]*m", "", captured.get())
    assert printed[: printed.index("finished in")] == shown


@pytest.mark.parametrize("page", [TUTORIAL, CLI_PAGE], ids=lambda page: page.name)
def test_pages_name_every_summary_field(page: Path):
    text = page.read_text(encoding="utf-8")
    for key in sorted(SUMMARY_KEYS):
        assert f"`{key}`" in text, f"{page.name} does not explain summary.json's {key}"


@pytest.mark.slow
def test_tutorial_python_blocks_run(demo_run, monkeypatch, capsys):
    work, out, result = demo_run
    assert result.exit_code == 0, result.output
    text = TUTORIAL.read_text(encoding="utf-8")
    # The files the reader created with the ```bash blocks' heredocs, in the same directory.
    for block in fenced(text, "bash"):
        for name, body in re.findall(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", block, flags=re.DOTALL | re.MULTILINE):
            (work / name).write_text(body, encoding="utf-8")
    monkeypatch.chdir(work)
    blocks = fenced(text, "python")
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "tutorial"}
    for index, block in enumerate(blocks):
        code = compile(block, f"{TUTORIAL.name} (python block {index + 1})", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own examples
    printed = capsys.readouterr().out
    assert "CompiledGraph(backend='auto', heads=(next: 2 terms))" in printed
    assert "{'lm/next': 1.0, 'distill/next': 0.5, 'z/next': 0.0001}" in printed
    assert "{'next': 16, 'mtp2': 14, 'mtp3': 12}" in printed
    assert "120 0.25\n" in printed and "70 0.0732\n" in printed
    assert "student (distilled): " in printed
    assert namespace["summary"] == json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_demo_refuses_a_graph_without_a_next_token_head(tmp_path):
    pytest.importorskip("torch")
    text = (ROOT / "examples" / "lm.yaml").read_text(encoding="utf-8")
    path = tmp_path / "far.yaml"
    path.write_text(text.replace("vocab_size: 32000", "vocab_size: 256").replace("{offset: 1}", "{offset: 2}"))
    result = invoke("demo", "--graph", path, "--steps", 2, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "offset 1" in result.output and "Traceback" not in result.output


def test_demo_refuses_an_unwritable_out_before_training(tmp_path):
    pytest.importorskip("torch")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("demo", "--steps", 2, "--out", blocker / "out")
    assert result.exit_code == 1, result.output
    assert "cannot create the folder" in result.output and "Traceback" not in result.output
    assert "teacher" not in result.output  # nothing was trained
