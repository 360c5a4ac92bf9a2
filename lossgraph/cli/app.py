"""The `lossgraph` command line.

Exit codes: 0 success; 1 an invalid loss graph or a failed run; 2 a usage error or a file that cannot
be read or written (or a plugin that cannot be loaded). Errors are printed as `FILE:LINE:COL: path: message`,
never as tracebacks. Commands that need torch import it inside their own body, so `lossgraph --help`,
`validate`, `show`, `kernel`, `viz`, `schema`, `kinds` and `init` start fast and work without a GPU stack.

Plugins (`lossgraph --plugin MODULE COMMAND`, LOSSGRAPH_PLUGINS, installed packages' entry points) load
after the command line is parsed and before the command runs (`_Command.invoke`): `--help` loads none.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .. import __version__
from ..errors import ConfigError, Diagnostic, LossGraphError, PluginError, SourceFileError


class _PlainArgument(TyperArgument):
    """An argument shown by its metavar alone (`FILE...`), without a Python type (`<list[Path]>`)."""

    def display_type_rich(self, ctx) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        return self.display_name_raw if self.required else f"[{self.display_name_raw}]"


class _PlainOption(TyperOption):
    """An option shown by its metavar (`--tokens N`); a flag shows none (not `<bool>`)."""

    def display_type_rich(self, ctx) -> str | None:
        if self.is_flag:
            return None
        return self.metavar if self.metavar is not None else super().display_type_rich(ctx)


def _plain(params: list) -> list:
    for param in params:
        if type(param) is TyperArgument:
            param.__class__ = _PlainArgument
        elif type(param) is TyperOption:
            param.__class__ = _PlainOption
    return params


_NO_KINDS = {"init"}  # commands that never read the kinds, so load no plugin


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _plain(super().get_params(ctx))

    def invoke(self, ctx):
        if self.name not in _NO_KINDS:
            _load_plugins(ctx.find_root().params.get("plugins") or [])
        return super().invoke(ctx)


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _plain(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="lossgraph",
    help="Declarative loss graphs for language-model training: validate, show, draw and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

EXIT_INVALID = 1
EXIT_USAGE = 2


class _StandardOutput(Console):
    """Standard output. In a terminal, tables and trees fit its width; COLUMNS, when set, overrides it.
    Written to a pipe or a file (colours forced or not) they keep their whole width, as the docs show
    them: rich would wrap them at 80 columns there, splitting table cells and tree lines."""

    UNWRAPPED = 10_000  # columns: wider than any table or tree; nothing printed pads lines to the width

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.file.isatty() or os.environ.get("COLUMNS", "").isdigit():
            return size
        return ConsoleDimensions(self.UNWRAPPED, size.height)


out = _StandardOutput(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_plain(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn lossgraph's exceptions into a clean message and an exit code (the CLI edge)."""
    try:
        yield
    except (SourceFileError, PluginError) as exc:
        _print_plain(err, f"error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except ConfigError as exc:
        for diagnostic in exc.diagnostics:
            _print_plain(err, diagnostic.format())
        raise typer.Exit(EXIT_INVALID) from None
    except LossGraphError as exc:
        _print_plain(err, f"error: {exc}")
        raise typer.Exit(EXIT_INVALID) from None


def write_or_exit(path: Path, data: bytes) -> None:
    """Write an output file; a path that cannot be written is a usage error, not a traceback."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        _print_plain(err, f"error: cannot write {path}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_USAGE) from None


def load_or_exit(path: Path):  # -> LossGraphSpec, kept unannotated to keep imports lazy
    """Load a valid graph for commands that need one; print its problems and exit otherwise."""
    from ..document import check_file

    report = check_file(path)
    for diagnostic in report.warnings:
        _print_plain(err, diagnostic.format())
    if report.spec is None:
        raise ConfigError(report.diagnostics)
    return report.spec


def _load_plugins(modules: list[str]) -> None:
    """Load the installed plugins, LOSSGRAPH_PLUGINS and the `--plugin` modules; exit 2 if one fails."""
    with cli_errors():
        from ..kinds.plugins import load

        load(modules)


def _version(value: bool) -> None:
    if value:
        _print_plain(out, f"lossgraph {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    plugins: Annotated[
        Optional[list[str]],
        typer.Option(
            "--plugin",
            metavar="MODULE",
            help=(
                "Import this module (or MODULE:ATTRIBUTE) for the kinds it adds; repeat it for several. "
                "LOSSGRAPH_PLUGINS=MOD1,MOD2 and installed packages' `lossgraph.kinds` entry points load too."
            ),
            show_default=False,
        ),
    ] = None,
) -> None:
    """Declarative loss graphs for language-model training."""


FileArg = Annotated[Path, typer.Argument(metavar="FILE", help="A loss-graph YAML file.", show_default=False)]


@app.command(cls=_Command)
def validate(
    files: Annotated[
        list[Path], typer.Argument(metavar="FILE...", help="Loss-graph YAML files to check.", show_default=False)
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Treat warnings as errors.")] = False,
) -> None:
    """Check loss-graph files; print every problem as FILE:LINE:COL: path: message.

    Exit code 0 when all files are valid, 1 when one is invalid, 2 when one cannot be read.
    """
    from ..document import check_file

    code = 0
    results = []
    for path in files:
        try:
            report = check_file(path)
        except SourceFileError as exc:
            code = EXIT_USAGE
            results.append(
                {
                    "file": str(path),
                    "readable": False,
                    "valid": False,
                    "errors": 1,
                    "warnings": 0,
                    "diagnostics": [Diagnostic("error", "", str(exc), str(path)).to_dict()],
                }
            )
            if not json_output:
                _print_plain(err, f"error: {exc}")
            continue
        failed = bool(report.errors) or (strict and bool(report.warnings))
        if failed and code == 0:
            code = EXIT_INVALID
        results.append(
            {
                "file": str(path),
                "readable": True,
                "valid": not failed,
                "errors": len(report.errors),
                "warnings": len(report.warnings),
                "diagnostics": [d.to_dict() for d in report.diagnostics],
            }
        )
        if not json_output:
            for diagnostic in report.diagnostics:
                _print_plain(out, diagnostic.format())
            status = "[red]invalid[/]" if failed else "[green]valid[/]"
            counts = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
            out.print(f"{escape(str(path))}: {status} ({counts})")
    if json_output:
        _print_plain(out, json.dumps({"valid": code == 0, "files": results}, indent=2))
    raise typer.Exit(code)


@app.command(cls=_Command)
def show(file: FileArg) -> None:
    """Show a graph as a tree: heads with their loss nodes, weights and temperatures, then sources."""
    from .show import graph_tree

    with cli_errors():
        spec = load_or_exit(file)
        out.print(graph_tree(spec, str(file)), soft_wrap=False)  # wrap long lines; never crop them


class VizFormat(str, Enum):
    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"
    png = "png"


@app.command(cls=_Command)
def viz(
    file: FileArg,
    fmt: Annotated[
        VizFormat, typer.Option("--format", "-f", metavar="mermaid|dot|svg|png", help="Diagram format.")
    ] = VizFormat.mermaid,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", metavar="PATH", help="Write here instead of standard output.")
    ] = None,
) -> None:
    """Draw a graph: Mermaid or DOT text, or SVG/PNG through Graphviz's `dot`."""
    from .viz import render

    with cli_errors():
        spec = load_or_exit(file)
        if fmt is VizFormat.png and output is None and sys.stdout.isatty():
            raise LossGraphError("PNG is binary; write it to a file with -o FILE.png")
        data = render(spec, fmt.value, title=file.stem)
        if output is None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            write_or_exit(output, data)
            _print_plain(err, f"wrote {output}")


@app.command(cls=_Command)
def schema(
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", metavar="PATH", help="Write here instead of standard output.")
    ] = None,
) -> None:
    """Print the JSON Schema of loss-graph files (for editor completion and validation)."""
    from ..spec.models import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        write_or_exit(output, text.encode("utf-8"))
        _print_plain(err, f"wrote {output}")


@app.command(cls=_Command)
def kinds(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")] = False,
) -> None:
    """List the loss and source kinds a `type:` may name, and where each came from (built in or a plugin)."""
    from rich.table import Table

    from ..kinds.plugins import registered_kinds

    rows = registered_kinds()
    if json_output:
        document = {
            section: [{"type": row.name, "from": row.origin} for row in rows if row.family == family]
            for section, family in (("losses", "loss"), ("sources", "source"))
        }
        _print_plain(out, json.dumps(document, indent=2))
        return
    table = Table()
    for column in ("type", "kind", "from"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, row.family, row.origin)
    out.print(table, soft_wrap=False)


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


DTYPES = "|".join(d.value for d in Dtype)


@app.command(cls=_Command)
def plan(
    ctx: typer.Context,
    file: FileArg,
    tokens: Annotated[
        int, typer.Option("--tokens", min=1, metavar="N", help="Tokens per step for the estimate.")
    ] = 8192,
    vocab: Annotated[
        Optional[int],
        typer.Option("--vocab", min=1, metavar="V", help="Estimate at this vocab size instead of the graph's own."),
    ] = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", metavar=DTYPES, help="Element type of logits and teachers.")] = (
        Dtype.bf16
    ),
    bandwidth: Annotated[
        float,
        typer.Option(
            "--bandwidth", min=1.0, metavar="GBPS", help="Memory bandwidth in GB/s (an H100 copies at about 3000)."
        ),
    ] = 3000.0,
    hidden: Annotated[
        Optional[int],
        typer.Option(
            "--hidden",
            min=1,
            metavar="H",
            help="Hidden size, for the memory and matmul estimate of heads declared input: hidden.",
        ),
    ] = None,
    tflops: Annotated[
        float,
        typer.Option(
            "--tflops",
            min=1.0,
            metavar="TFLOPS",
            help="Matmul rate in TFLOP/s for that estimate (an H100 reaches about 790 in bf16).",
        ),
    ] = 790.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")] = False,
) -> None:
    """Show the fused kernel launches a graph compiles to, with the bytes they move.

    Per launch: the head, its loss nodes, the reads of the logits row, the bytes and the time they take.

    Then the softmax states each launch keeps, and for heads that take hidden states the chunking.
    """
    from ..compiler.fusion import estimate
    from ..document import analysis
    from .show import byte_size, launch_names, plan_states, plan_table

    with cli_errors():
        spec = load_or_exit(file)
        context = analysis(spec)  # the analysis that loading it ran
        report = estimate(
            context.plan,
            context.fusion,
            tokens=tokens,
            dtype=dtype.value,
            bandwidth=bandwidth * 1e9,
            vocab=vocab,
            hidden=hidden,
            flops=tflops * 1e12,
        )
    if not any(head.hidden_input for head in context.plan.heads):
        given = [f"--{name}" for name in ("hidden", "tflops") if _given(ctx, name)]
        if given:
            _print_plain(
                err,
                f"warning: {' and '.join(given)} ignored: no head of {file} takes hidden states "
                "(input: hidden), so there is no matmul or memory estimate to make",
            )
    if json_output:
        _print_plain(out, json.dumps({"file": str(file), **report}, indent=2))
        return
    _print_plain(out, f"{file}: {report['kernel_launches']} fused launch(es), {tokens} tokens, {dtype.value}")
    out.print(plan_table(report), soft_wrap=False)
    _print_plain(
        out,
        f"total {byte_size(report['bytes'])} in {report['milliseconds']:.3f} ms at {bandwidth:g} GB/s, "
        f"{report['ratio_to_floor']:.2f}x the floor",
    )
    _print_plain(
        out,
        f"floor {byte_size(report['floor_bytes'])} in {report['floor_milliseconds']:.3f} ms: each tensor read once, "
        "each gradient written once",
    )
    for line in plan_states(report):
        _print_plain(out, line)
    for name, entry in zip(launch_names(report), report["launches"]):
        for note in entry["notes"]:
            _print_plain(out, f"note ({name}): {note}")
        chunking = entry["chunking"]
        if chunking:
            line = (
                f"{entry['head']} takes hidden states: {chunking['chunks']} chunk(s) of {chunking['chunk_rows']} "
                "rows; the logits are never held whole"
            )
            if "peak_extra_bytes" in chunking:
                line += (
                    f"; peak extra memory {byte_size(chunking['peak_extra_bytes'])} (gradients + one chunk); "
                    f"matmuls {chunking['matmul_flop'] / 1e12:.2f} TFLOP, {chunking['matmul_milliseconds']:.3f} ms "
                    f"at {tflops:g} TFLOP/s"
                )
            else:
                line += "; give --hidden for the memory and matmul estimate"
            _print_plain(out, line)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


@app.command(cls=_Command)
def init(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="Where to write the starter graph.")] = Path(
        "lossgraph.yaml"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter graph (LM loss plus distillation) that validates as is."""
    from importlib.resources import files

    if path.exists() and not force:
        _print_plain(err, f"error: {path} exists; pass --force to overwrite it")
        raise typer.Exit(EXIT_USAGE)
    write_or_exit(path, files("lossgraph").joinpath("data/starter.yaml").read_bytes())
    _print_plain(out, f"wrote {path}; check it with: lossgraph validate {path}")


class KernelPhase(str, Enum):  # kernels/codegen.py PHASES
    single = "single"
    stats = "stats"
    reduce = "reduce"
    apply = "apply"


@app.command(cls=_Command)
def kernel(
    file: FileArg,
    head: Annotated[
        Optional[str], typer.Option("--head", metavar="H", help="Print this head's launches only.", show_default=False)
    ] = None,
    phase: Annotated[
        KernelPhase,
        typer.Option(
            "--phase",
            metavar="single|stats|reduce|apply",
            help="The kernel to print: the whole launch (single) or one vocab-parallel phase.",
        ),
    ] = KernelPhase.single,
    launch: Annotated[
        Optional[int],
        typer.Option(
            "--launch",
            min=1,
            metavar="N",
            help="Print each head's N-th launch only (1 is the first).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the generated Triton source of a graph's fused launches.

    Each kernel follows a comment line naming its head, launch and phase.
    """
    from ..document import analysis
    from .kernel import KernelSelectionError, kernel_sources

    with cli_errors():
        spec = load_or_exit(file)
        try:
            sources = kernel_sources(analysis(spec).fusion, head=head, phase=phase.value, launch=launch)
        except KernelSelectionError as exc:
            _print_plain(err, f"error: {exc}")
            raise typer.Exit(EXIT_USAGE) from None
    for i, kernel_source in enumerate(sources):
        if i:
            sys.stdout.write("\n\n")
        sys.stdout.write(kernel_source.header() + "\n" + kernel_source.source)


# lossgraph.apps.bench: a-d from standard_cases(), e from run_linear_case(), f from rl_case() and run_rl_case()
BENCH_CASES = ("a", "b", "c", "d", "e", "f")


def _looks_like_a_file(name: str) -> bool:
    """A bench argument that names a file rather than a case: it exists, has a folder or a YAML suffix."""
    path = Path(name)
    return path.exists() or len(path.parts) > 1 or path.suffix.lower() in (".yaml", ".yml")


class BenchDevice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command(cls=_Command)
def bench(
    cases: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="CASE|FILE...",
            help=(
                "Standard cases a, b, c, d (logits), e (from hidden states) and f (policy gradient), or paths of "
                "loss-graph files (run with lossgraph's fused and reference backends on random inputs of their "
                "shapes). Default: a b c d e f."
            ),
            show_default=False,
        ),
    ] = None,
    tokens: Annotated[
        Optional[int], typer.Option("--tokens", min=1, metavar="N", help="Tokens per case (default: the case's).")
    ] = None,
    vocab: Annotated[
        Optional[int],
        typer.Option("--vocab", min=1, metavar="V", help="Vocab size (default: the case's; a file keeps its own)."),
    ] = None,
    hidden: Annotated[
        Optional[int],
        typer.Option("--hidden", min=1, metavar="H", help="Hidden size of case e (default 4096; 64 on a CPU)."),
    ] = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", metavar=DTYPES, help="Element type of logits and teachers.")] = (
        Dtype.bf16
    ),
    device: Annotated[
        BenchDevice, typer.Option("--device", metavar="auto|cpu|cuda", help="auto: CUDA when available.")
    ] = BenchDevice.auto,
    repeats: Annotated[int, typer.Option("--repeats", min=1, metavar="R", help="Timed steps per implementation.")] = 20,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, metavar="W", help="Untimed steps first (compilation, caches).")
    ] = 3,
    json_path: Annotated[
        Optional[Path], typer.Option("--json", metavar="PATH", help="Also write the results to this file.")
    ] = None,
) -> None:
    """Time forward+backward of the standard cases (or of loss-graph files) for lossgraph and its peers.

    Each case is printed next to its floor: its bytes at the copy bandwidth measured in the same run.

    On a CPU the cases shrink, keeping their proportions (a smoke test: the fused kernels need a GPU).
    """
    names = cases or list(BENCH_CASES)
    with cli_errors():
        # before torch loads: a mistyped case or an unreadable (or invalid) file fails at once
        for name in names:
            if name in BENCH_CASES:
                continue
            if not _looks_like_a_file(name):  # a usage error, as an unknown option is
                _print_plain(
                    err, f"error: unknown case {name!r}: give {', '.join(BENCH_CASES)} or the path of a loss-graph file"
                )
                raise typer.Exit(EXIT_USAGE)
            load_or_exit(Path(name))  # exit 2 when it cannot be read, 1 when it is invalid

        import torch
        from rich.progress import Progress
        from rich.table import Table

        from ..apps.bench import (
            FILE_TOKENS,
            LINEAR_HIDDEN,
            LINEAR_SIZES,
            SMALL_FILE_TOKENS,
            SMALL_HIDDEN,
            SMALL_SIZES,
            copy_bandwidth,
            environment,
            ratio,
            rl_case,
            run_case,
            run_graph_file,
            run_linear_case,
            run_rl_case,
            standard_cases,
            write_json,
        )
        from .show import byte_size

        if device is BenchDevice.auto:
            target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            target = torch.device(device.value)
            if target.type == "cuda" and not torch.cuda.is_available():
                raise LossGraphError("--device cuda: no CUDA device is available; use --device cpu")
        small = target.type == "cpu"
        known = {case.name: case for case in standard_cases(tokens, vocab, small=small)}
        info = environment(target)
        bandwidth = copy_bandwidth(target, megabytes=256 if target.type == "cpu" else 1024)
        results = []
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("benchmarking", total=len(names))
            settings = {
                "dtype": dtype.value,
                "device": target,
                "repeats": repeats,
                "warmup": warmup,
                "progress": lambda text: progress.update(task, description=text),
                # the JSON grows with every measurement: a run stopped by a time limit keeps what it measured
                "checkpoint": lambda partial: json_path and write_json(json_path, info, bandwidth, [*results, partial]),
            }
            for name in names:
                if name == "e":
                    case_tokens, case_vocab = SMALL_SIZES["e"] if small else LINEAR_SIZES
                    results.append(
                        run_linear_case(
                            tokens=tokens or case_tokens,
                            vocab=vocab or case_vocab,
                            hidden=hidden or (SMALL_HIDDEN if small else LINEAR_HIDDEN),
                            **settings,
                        )
                    )
                elif name == "f":
                    results.append(run_rl_case(rl_case(tokens, vocab, small=small), bandwidth=bandwidth, **settings))
                elif name not in known:
                    file_tokens = tokens or (SMALL_FILE_TOKENS if small else FILE_TOKENS)
                    results.append(run_graph_file(Path(name), tokens=file_tokens, bandwidth=bandwidth, **settings))
                else:
                    results.append(run_case(known[name], bandwidth=bandwidth, **settings))
                progress.advance(task)
        _print_plain(
            out,
            f"{info['card']}; torch {info['torch']}, triton {info.get('triton', '-')}; {dtype.value}; "
            f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; median of {repeats} forward+backward steps",
        )
        for result in results:
            table = Table()
            for column in ("implementation", "median", "min", "x floor", "peak extra", "note"):
                table.add_column(
                    column, justify="right" if column in ("median", "min", "x floor", "peak extra") else "left"
                )
            table.add_row(f"floor ({result.floor})", f"{result.floor_ms:.3f} ms", "", "1.00x", "", "")
            for m in result.measurements:
                table.add_row(
                    m.implementation,
                    f"{m.median_ms:.3f} ms" if m.median_ms is not None else "",
                    f"{m.min_ms:.3f} ms" if m.min_ms is not None else "",
                    ratio(m.median_ms, result.floor_ms),
                    byte_size(m.peak_extra_bytes) if m.peak_extra_bytes is not None else "",
                    m.note,
                )
            _print_plain(out, f"case ({result.case}) {result.description}: N={result.tokens}, V={result.vocab}")
            out.print(table, soft_wrap=False)
        if json_path is not None:
            write_json(json_path, info, bandwidth, results)
            _print_plain(err, f"wrote {json_path}")


DEMO_STEPS = 300  # the default of DemoConfig.steps (kept here: `lossgraph --help` imports no torch)


class DemoDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@app.command(cls=_Command)
def demo(
    graph: Annotated[
        Optional[Path],
        typer.Option(
            "--graph",
            metavar="FILE",
            help="Loss graph for the student (default: examples/mtp_distill.yaml, built in).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, metavar="N", help="Training steps of each model.")] = (
        DEMO_STEPS
    ),
    device: Annotated[DemoDevice, typer.Option("--device", metavar="cpu|cuda", help="Where to train.")] = (
        DemoDevice.cpu
    ),
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for metrics and plots.")] = Path(
        "lossgraph-demo"
    ),
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Random seed.")] = 0,
) -> None:
    """Train a teacher and an MTP student on a built-in corpus, with and without distillation.

    The student learns from the labels and the teacher as the graph says, then again without the teacher.

    All models are scored on held-out text; metrics and plots go to --out.
    """
    # Idle OpenMP threads sleep instead of spinning: on a CPU that other work shares, spinning threads
    # made each step several times slower (2.1 s against 0.3 s for a teacher step on two busy cores).
    # Read when torch loads, so only where it has not been loaded yet; an exported value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    started = time.perf_counter()  # the time it prints counts loading torch too
    with cli_errors():
        from ..apps.demo import DemoConfig, run_demo

        if device is DemoDevice.cuda:
            import torch

            if not torch.cuda.is_available():
                raise LossGraphError("--device cuda: no CUDA device is available; use --device cpu")
        run_demo(DemoConfig(graph=graph, steps=steps, device=device.value, out=out_dir, seed=seed), out, started)


def run() -> None:
    """Console-script entry point."""
    app()
