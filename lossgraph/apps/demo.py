"""`lossgraph demo`: the whole idea, end to end, in under a minute on a laptop CPU.

A small teacher is trained on a built-in byte-level corpus; then a student with one linear head per
prediction offset learns from the labels on every head and from the teacher where the loss graph
says so (by default `examples/mtp_distill.yaml`: cross-entropy on three heads, forward KL from the
teacher on the next-token head, z-loss). The same student is trained once more without the
distillation nodes, and both are scored on held-out text, so the user sees what the teacher bought.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..compiler.plan import DenseTarget, TopKTarget, target_leaves
from ..document import check_spec, loads
from ..errors import LossGraphError
from ..kinds import source_kind
from ..runtime.compiled import CompiledGraph, compile
from ..runtime.inputs import TopK
from ..spec.loader import read_text
from ..spec.models import LossGraphSpec

VOCAB = 256  # bytes

# The phases, as every output names them (progress bars, tables, metrics, summary.json, plots).
TEACHER_PHASE = "teacher"
DISTILLED_PHASE = "student (distilled)"
STUDENT_PHASE = "student"  # a graph without a teacher source: nothing is distilled
BASELINE_PHASE = "student (no teacher)"


@dataclass
class DemoConfig:
    """Settings of one demo run. The defaults take 30-60 s on two CPU cores (about 40 s of CPU time):
    batches of 8 windows keep the teacher's gain that batches of 16 gave (0.07 nats per byte) in half
    the time."""

    graph: Path | None = None
    steps: int = 300
    device: str = "cpu"
    out: Path = Path("lossgraph-demo")
    seed: int = 0
    context: int = 64
    batch_size: int = 8
    learning_rate: float = 3e-3
    eval_every: int = 25


class TinyLM(torch.nn.Module):
    """A small causal transformer: embeddings, a few pre-norm blocks, one linear head per offset."""

    def __init__(self, heads: dict[str, int], dim: int, layers: int, context: int, num_heads: int = 4):
        super().__init__()
        self.head_offsets = dict(heads)
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.position = torch.nn.Embedding(context, dim)
        self.blocks = torch.nn.ModuleList(_Block(dim, num_heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(dim, VOCAB) for name in heads})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            hidden = block(hidden)
        hidden = self.norm(hidden)
        return {name: head(hidden) for name, head in self.heads.items()}


class _Block(torch.nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.attention_norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp_norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(dim, dim=-1)
        shape = (batch, length, self.num_heads, dim // self.num_heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.mlp_norm(x))


def corpus() -> torch.Tensor:
    """The built-in corpus as byte ids."""
    text = files("lossgraph").joinpath("data/corpus.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long)


def default_graph_text() -> str:
    """The demo's default graph (a copy of examples/mtp_distill.yaml shipped in the package)."""
    return files("lossgraph").joinpath("data/mtp_distill.yaml").read_text(encoding="utf-8")


class Windows:
    """Random training windows and a fixed set of held-out windows (the last tenth of the corpus)."""

    def __init__(self, data: torch.Tensor, context: int, generator: torch.Generator):
        split = int(len(data) * 0.9)
        self.train, self.held_out = data[:split], data[split:]
        self.context = context
        self.generator = generator

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.train) - self.context - 1, (size,), generator=self.generator)
        window = torch.stack([self.train[s : s + self.context + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    def evaluation(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = range(0, len(self.held_out) - self.context - 1, self.context // 2)
        window = torch.stack([self.held_out[s : s + self.context + 1] for s in starts])
        return window[:, :-1], window[:, 1:]


def without_teachers(spec: LossGraphSpec) -> LossGraphSpec | None:
    """The same graph with every loss node that reads a teacher removed (None if nothing is left)."""
    context = check_spec(spec).context
    plan = context.plan
    reads_teacher = {
        term.node
        for term in plan.terms
        if term.target is not None
        and any(isinstance(leaf, (DenseTarget, TopKTarget)) for leaf in target_leaves(term.target))
    }
    data = spec.model_dump(exclude_none=True)
    data["losses"] = {name: loss for name, loss in data["losses"].items() if name not in reads_teacher}
    if not data["losses"]:
        return None
    # Keep the sources the remaining loss nodes read, and those their targets are derived from.
    used = {source for name in data["losses"] for source in context.graph.loss_sources(name)}
    data["sources"] = {name: source for name, source in data["sources"].items() if name in used}
    baseline = LossGraphSpec.model_validate(data)
    return baseline if check_spec(baseline).ok else None


def _check_graph(spec: LossGraphSpec) -> None:
    if not any(head.offset == 1 for head in spec.heads.values()):
        raise LossGraphError("the demo scores the next-token head on held-out text: declare a head with offset 1")
    for name in spec.heads:
        if spec.head_vocab(name) != VOCAB:
            raise LossGraphError(
                f"the demo models bytes: head {name!r} must have vocab_size {VOCAB} (the graph says "
                f"{spec.head_vocab(name)}); set vocab_size: {VOCAB}"
            )
    for name, source in spec.sources.items():
        if source_kind(source.type).is_teacher:
            if source.offset != 1:
                raise LossGraphError(
                    f"the demo's teacher predicts the next token; source {name!r} has offset {source.offset}"
                )
            if spec.source_vocab(name) != VOCAB:
                raise LossGraphError(f"the demo's teacher has vocab {VOCAB}; source {name!r} declares another")


@dataclass
class RunLog:
    """What one training run recorded."""

    phase: str
    rows: list[dict] = field(default_factory=list)
    held_out: list[tuple[int, float]] = field(default_factory=list)


def _teachers_for(graph: CompiledGraph, teacher: TinyLM | None, tokens: torch.Tensor) -> dict[str, Callable]:
    """Callables giving every teacher source of the graph from the one trained teacher model."""
    if not graph.plan.teachers:
        return {}
    cache: dict[str, torch.Tensor] = {}

    def logits() -> torch.Tensor:
        if "next" not in cache:
            cache["next"] = teacher(tokens)["next"]
        return cache["next"]

    sources: dict[str, Callable] = {}
    for name, target in graph.plan.teachers.items():
        if isinstance(target, TopKTarget):
            k = target.k

            def topk(k: int = k) -> TopK:
                log_probs = torch.log_softmax(logits().float(), dim=-1)
                best = log_probs.topk(k, dim=-1)
                return TopK(best.indices, best.values)

            sources[name] = topk
        else:
            sources[name] = logits
    return sources


def held_out_loss(model: TinyLM, windows: Windows, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats per byte) of the model's offset-1 head on held-out windows."""
    tokens, labels = (t.to(device) for t in windows.evaluation())
    next_head = next(name for name, offset in model.head_offsets.items() if offset == 1)
    model.eval()
    with torch.no_grad():
        logits = model(tokens)[next_head]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1))
    model.train()
    return float(loss)


def train(
    phase: str,
    model: TinyLM,
    graph: CompiledGraph,
    windows: Windows,
    config: DemoConfig,
    device: torch.device,
    teacher: TinyLM | None,
    show: Callable[[str, int, dict[str, float]], None],
) -> RunLog:
    """Train `model` with `graph` for config.steps steps; evaluate on held-out text as it goes."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    log = RunLog(phase)
    for step in range(config.steps):
        tokens, labels = (t.to(device) for t in windows.batch(config.batch_size))
        out = graph(model(tokens), labels=labels, teachers=_teachers_for(graph, teacher, tokens), step=step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        nodes = {name: float(value) for name, value in out.by_node().items()}
        # the names and meanings of GraphOutput: `terms` after their weights, `values` before them
        row = {
            "phase": phase,
            "step": step,
            "loss": float(out.loss.detach()),
            "nodes": nodes,
            "terms": {key: float(value) for key, value in out.terms.items()},
            "values": {key: float(value) for key, value in out.values.items()},
            "accuracy": {head: float(m["accuracy"]) for head, m in out.metrics.items() if "accuracy" in m},
        }
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            row["held_out_loss"] = held_out_loss(model, windows, device)
            log.held_out.append((step + 1, row["held_out_loss"]))
        log.rows.append(row)
        show(phase, step + 1, {"loss": row["loss"], **nodes})
    return log


class _Display:
    """A progress bar per phase and a live table of the latest loss of every node."""

    def __init__(self, console: Console, phases: list[tuple[str, int]]):
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        # each bar's clock starts with its phase
        self.tasks = {phase: self.progress.add_task(phase, total=steps, start=False) for phase, steps in phases}
        self.latest: dict[str, dict[str, float]] = {}
        # drawn afresh at every refresh (and when the display stops), so it always shows the last step
        self.live = Live(get_renderable=self._render, console=console, refresh_per_second=4, transient=False)

    def _render(self) -> Group:
        latest = list(self.latest.items())  # one atomic copy: training updates it from the main thread
        table = Table(title="latest loss per node (weighted)", title_justify="left")
        table.add_column("phase")
        names = sorted({name for _, values in latest for name in values}, key=lambda name: (name != "loss", name))
        for name in names:
            table.add_column(name, justify="right")
        for phase, values in latest:
            table.add_row(phase, *(f"{values[n]:.4f}" if n in values else "" for n in names))
        return Group(self.progress, table)

    def update(self, phase: str, step: int, values: dict[str, float]) -> None:
        if step == 1:
            self.progress.start_task(self.tasks[phase])
        self.progress.update(self.tasks[phase], completed=step)
        self.latest[phase] = values


# metrics.jsonl's mappings as metrics.csv's series: `node/lm`, `term/lm/next`, `value/lm/next`, `accuracy/next`
CSV_SERIES = (("nodes", "node"), ("terms", "term"), ("values", "value"), ("accuracy", "accuracy"))


def _write_outputs(out: Path, logs: list[RunLog], summary: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.jsonl", out / "metrics.csv", out / "summary.json"]
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as file:
        for log in logs:
            for row in log.rows:
                file.write(json.dumps(row) + "\n")
    with (out / "metrics.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["phase", "step", "series", "value"])
        for log in logs:
            for row in log.rows:
                writer.writerow([log.phase, row["step"], "loss", row["loss"]])
                for field_name, prefix in CSV_SERIES:
                    for name, value in row[field_name].items():
                        writer.writerow([log.phase, row["step"], f"{prefix}/{name}", value])
                if "held_out_loss" in row:
                    writer.writerow([log.phase, row["step"], "held_out_loss", row["held_out_loss"]])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written += _plots(out, logs)
    return written


def _plots(out: Path, logs: list[RunLog]) -> list[Path]:
    """PNG plots (need matplotlib, the `demo` extra): per loss node, each head's term before its
    weights, one curve per phase (so a scheduled weight does not look like a changing loss, and the
    teacher's next-token head is compared with the students' next-token head, not with their sum over
    heads); and the held-out loss of every phase."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    keys = [key for log in logs for row in log.rows[:1] for key in row["values"]]
    nodes = list(dict.fromkeys(key.split("/", 1)[0] for key in keys))
    for node in nodes:
        heads = list(dict.fromkeys(key.split("/", 1)[1] for key in keys if key.split("/", 1)[0] == node))
        figure, axes = plt.subplots(
            1, len(heads), figsize=(4.5 * len(heads) + 1.5, 3.5), squeeze=False, layout="constrained"
        )
        for axis, head in zip(axes[0], heads):
            key = f"{node}/{head}"
            for color, log in enumerate(logs):  # one colour per phase in every plot
                points = [(row["step"], row["values"][key]) for row in log.rows if key in row["values"]]
                if points:
                    steps, values = zip(*points)
                    axis.plot(steps, _smooth(values), color=f"C{color}", label=log.phase)
            axis.set_title(f"{key}")
            axis.set_xlabel("step")
            axis.set_ylabel("value before weights")
            axis.legend(fontsize="small")
        terms = "each head's term" if len(heads) > 1 else "its term"
        # wrapped at the figure's edges: a one-panel figure is narrower than the sentence
        figure.suptitle(f"loss node {node!r}: {terms} before its weights, smoothed over 10 steps", wrap=True)
        path = out / f"loss_{node}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    figure, axis = plt.subplots(figsize=(6, 3.5), layout="constrained")
    for color, log in enumerate(logs):
        if log.held_out:
            steps, values = zip(*log.held_out)
            axis.plot(steps, values, marker="o", color=f"C{color}", label=log.phase)
    axis.set_title("held-out next-token loss")
    axis.set_xlabel("step")
    axis.set_ylabel("nats per byte")
    axis.legend(fontsize="small")
    path = out / "held_out.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    written.append(path)
    return written


def _smooth(values: tuple[float, ...], window: int = 10) -> list[float]:
    smoothed, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        smoothed.append(total / min(index + 1, window))
    return smoothed


def _fresh_student(heads: dict[str, int], config: DemoConfig, device: torch.device, windows: Windows) -> TinyLM:
    """A student with the same initial weights and batch order every time it is called."""
    torch.manual_seed(config.seed + 1)
    windows.generator.manual_seed(config.seed + 1)
    return TinyLM(heads, dim=64, layers=2, context=config.context).to(device)


def run_demo(config: DemoConfig, console: Console | None = None, started: float | None = None) -> dict:
    """Run the demo; returns the summary (also written to `config.out/summary.json`). `started` is the
    `time.perf_counter()` the run counts its seconds from (the command's start, before torch loads)."""
    console = console or Console()
    started = time.perf_counter() if started is None else started
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    if config.graph is not None:
        spec = loads(read_text(config.graph), str(config.graph))
    else:
        spec = loads(default_graph_text(), "mtp_distill.yaml")
    _check_graph(spec)
    try:  # fail before training, not after it
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LossGraphError(f"--out {config.out}: cannot create the folder ({exc.strerror})") from None
    graph = compile(spec)
    baseline_spec = without_teachers(spec)
    heads = {head.name: head.offset for head in graph.plan.heads}
    windows = Windows(corpus(), config.context, generator)
    console.print(
        f"graph: {len(graph.plan.heads)} head(s), {len(graph.plan.terms)} term(s), "
        f"{len(graph.fusion.launches)} fused launch(es); corpus {len(windows.train)} training bytes, "
        f"{len(windows.held_out)} held-out bytes; device {device}"
    )

    teacher = None
    student_phase = DISTILLED_PHASE if graph.plan.teachers else STUDENT_PHASE
    phases = [(student_phase, config.steps)]
    if graph.plan.teachers:
        phases.insert(0, (TEACHER_PHASE, config.steps))
    compare = baseline_spec is not None and bool(graph.plan.teachers)
    if compare:
        phases.append((BASELINE_PHASE, config.steps))
    display = _Display(console, phases)
    logs: list[RunLog] = []
    summary: dict = {"graph": str(config.graph or "examples/mtp_distill.yaml"), "steps": config.steps}
    with display.live:
        if graph.plan.teachers:
            teacher = TinyLM({"next": 1}, dim=128, layers=3, context=config.context).to(device)
            teacher_graph = compile(loads(_TEACHER_GRAPH, "teacher.yaml"))
            logs.append(train(TEACHER_PHASE, teacher, teacher_graph, windows, config, device, None, display.update))
            teacher.eval().requires_grad_(False)
            summary["teacher_held_out_loss"] = logs[-1].held_out[-1][1]
        # both students start from the same weights and see the same batches: only the teacher differs
        student = _fresh_student(heads, config, device, windows)
        logs.append(train(student_phase, student, graph, windows, config, device, teacher, display.update))
        summary["student_held_out_loss"] = logs[-1].held_out[-1][1]
        if compare:
            plain = _fresh_student(heads, config, device, windows)
            logs.append(
                train(BASELINE_PHASE, plain, compile(baseline_spec), windows, config, device, None, display.update)
            )
            summary["baseline_held_out_loss"] = logs[-1].held_out[-1][1]
    first = {log.phase: log.rows[0]["loss"] for log in logs}
    last = {log.phase: sum(r["loss"] for r in log.rows[-10:]) / len(log.rows[-10:]) for log in logs}
    summary["training_loss"] = {phase: {"first": first[phase], "last10_mean": last[phase]} for phase in first}
    summary["seconds"] = time.perf_counter() - started
    written = _write_outputs(config.out, logs, summary)
    console.print()
    _report(console, logs, summary, written)
    return summary


_TEACHER_GRAPH = """
version: 1
vocab_size: 256
heads: {next: {offset: 1}}
sources: {labels: {type: labels}}
losses: {lm: {type: cross_entropy, heads: [next], target: labels}}
"""


def _report(console: Console, logs: list[RunLog], summary: dict, written: list[Path]) -> None:
    """Each phase's model by its phase's name, with its last held-out loss; what the teacher bought."""
    table = Table(title="held-out next-token loss (nats per byte; lower is better)", title_justify="left")
    table.add_column("model")
    table.add_column("loss", justify="right")
    table.add_column("bits per byte", justify="right")
    for log in logs:
        loss = log.held_out[-1][1]
        table.add_row(log.phase, f"{loss:.4f}", f"{loss / math.log(2):.3f}")
    console.print(table)
    if "baseline_held_out_loss" in summary:
        change = summary["student_held_out_loss"] - summary["baseline_held_out_loss"]
        verdict = "lower" if change < 0 else "higher"
        console.print(
            f"the teacher made the student's held-out loss {abs(change):.4f} nats per byte {verdict} "
            f"({100 * change / summary['baseline_held_out_loss']:+.1f}%)"
        )
    console.print(f"finished in {summary['seconds']:.0f} s; wrote:")
    for path in written:
        console.print(f"  {path}", markup=False)
