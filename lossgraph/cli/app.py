"""The `lossgraph` command line.

Exit codes: 0 success; 1 an invalid loss graph or a failed run; 2 a usage error or a file that cannot
be read or written. Errors are printed as `FILE:LINE:COL: path: message`, never as tracebacks. Commands that need
torch import it inside their own body, so `lossgraph --help`, `validate`, `show`, `viz`, `schema` and
`init` start fast and work without a GPU stack.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .. import __version__
from ..errors import ConfigError, Diagnostic, LossGraphError, SourceFileError

app = typer.Typer(
    name="lossgraph",
    help="Declarative loss graphs for language-model training: validate, show, draw and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

EXIT_INVALID = 1
EXIT_USAGE = 2

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_plain(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn lossgraph's exceptions into a clean message and an exit code (the CLI edge)."""
    try:
        yield
    except SourceFileError as exc:
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


def _version(value: bool) -> None:
    if value:
        _print_plain(out, f"lossgraph {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Declarative loss graphs for language-model training."""


FileArg = Annotated[Path, typer.Argument(help="A loss-graph YAML file.", show_default=False)]


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Loss-graph YAML files to check.", show_default=False)],
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


@app.command()
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


@app.command()
def viz(
    file: FileArg,
    fmt: Annotated[VizFormat, typer.Option("--format", "-f", help="Diagram format.")] = VizFormat.mermaid,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write here instead of standard output.")
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


@app.command()
def schema(
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write here instead of standard output.")
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


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@app.command()
def plan(
    file: FileArg,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Tokens per step for the estimate.")] = 8192,
    vocab: Annotated[
        Optional[int],
        typer.Option("--vocab", min=1, help="Estimate at this vocab size instead of the graph's own."),
    ] = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Element type of logits and teachers.")] = Dtype.bf16,
    bandwidth: Annotated[
        float,
        typer.Option("--bandwidth", min=1.0, help="Memory bandwidth in GB/s (an H100 copies at about 3000)."),
    ] = 3000.0,
    hidden: Annotated[
        Optional[int],
        typer.Option("--hidden", min=1, help="Hidden size, for the memory and matmul estimate of input: hidden heads."),
    ] = None,
    tflops: Annotated[
        float, typer.Option("--tflops", min=1.0, help="Matmul rate in TFLOP/s (an H100 reaches about 790 in bf16).")
    ] = 790.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")] = False,
) -> None:
    """Show the fused kernels a graph compiles to: per launch the head, terms, softmax states, passes
    over memory and bytes moved, with a time estimate at a given bandwidth; for heads that take
    hidden states, the chunking and the peak extra memory."""
    from rich.table import Table

    from ..compiler.fusion import estimate
    from ..document import analysis

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
    if json_output:
        _print_plain(out, json.dumps({"file": str(file), **report}, indent=2))
        return
    _print_plain(out, f"{file}: {report['kernel_launches']} fused launch(es), {tokens} tokens, {dtype.value}")
    table = Table()
    for column in ("head", "#", "terms", "softmax states", "passes", "B/token", "total", "time"):
        numeric = column in ("B/token", "total", "time")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold", no_wrap=numeric)
    for entry in report["launches"]:
        states = "\n".join(f"{s['tensor']} T={s['temperature']}" for s in entry["softmaxes"])
        table.add_row(
            entry["head"],
            str(entry["launch"]),
            "\n".join(entry["terms"]),
            states,
            str(entry["passes"]),
            f"{entry['bytes_per_token']:,}",
            _bytes(entry["bytes"]),
            f"{entry['milliseconds']:.3f} ms",
        )
    out.print(table, soft_wrap=False)
    _print_plain(
        out,
        f"total {_bytes(report['bytes'])} in {report['milliseconds']:.3f} ms at {bandwidth:g} GB/s; "
        f"floor (each tensor read once, gradients written once) {_bytes(report['floor_bytes'])} in "
        f"{report['floor_milliseconds']:.3f} ms; ratio {report['ratio_to_floor']:.2f}x",
    )
    for entry in report["launches"]:
        for note in entry["notes"]:
            _print_plain(out, f"note ({entry['head']}, launch {entry['launch']}): {note}")
        chunking = entry["chunking"]
        if chunking:
            line = (
                f"{entry['head']} takes hidden states: {chunking['chunks']} chunk(s) of {chunking['chunk_rows']} "
                "rows; the logits are never held whole"
            )
            if "peak_extra_bytes" in chunking:
                line += (
                    f"; peak extra memory {_bytes(chunking['peak_extra_bytes'])} (gradients + one chunk); "
                    f"matmuls {chunking['matmul_flop'] / 1e12:.2f} TFLOP, {chunking['matmul_milliseconds']:.3f} ms "
                    f"at {tflops:g} TFLOP/s"
                )
            else:
                line += "; give --hidden for the memory and matmul estimate"
            _print_plain(out, line)


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter graph.")] = Path("lossgraph.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter graph (LM loss plus distillation) that validates as is."""
    from importlib.resources import files

    if path.exists() and not force:
        _print_plain(err, f"error: {path} exists; pass --force to overwrite it")
        raise typer.Exit(EXIT_USAGE)
    write_or_exit(path, files("lossgraph").joinpath("data/starter.yaml").read_bytes())
    _print_plain(out, f"wrote {path}; check it with: lossgraph validate {path}")


class BenchDevice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def bench(
    cases: Annotated[
        Optional[list[str]],
        typer.Argument(help="Cases to run: a b c d (logits), e (from hidden states); default all.", show_default=False),
    ] = None,
    tokens: Annotated[
        Optional[int], typer.Option("--tokens", min=1, help="Tokens per case (default: the case's).")
    ] = None,
    vocab: Annotated[Optional[int], typer.Option("--vocab", min=1, help="Vocab size (default: the case's).")] = None,
    hidden: Annotated[
        Optional[int], typer.Option("--hidden", min=1, help="Hidden size of case e (default 4096; 64 on a CPU).")
    ] = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Element type of logits and teachers.")] = Dtype.bf16,
    device: Annotated[BenchDevice, typer.Option("--device", help="auto: cuda when available.")] = BenchDevice.auto,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed steps per implementation.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first (compilation, caches).")] = 3,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this file.")] = None,
) -> None:
    """Time forward+backward of the standard cases for lossgraph and its peers, with the memory floor.

    On a CPU the cases shrink to 512 tokens and a 4096 vocab unless --tokens/--vocab say otherwise
    (a smoke test: the fused kernels and the peers' GPU kernels need a GPU).
    """
    with cli_errors():
        import torch
        from rich.progress import Progress
        from rich.table import Table

        from ..apps.bench import (
            copy_bandwidth,
            environment,
            ratio,
            run_case,
            run_graph_file,
            run_linear_case,
            standard_cases,
            write_json,
        )

        if device is BenchDevice.auto:
            target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            target = torch.device(device.value)
            if target.type == "cuda" and not torch.cuda.is_available():
                raise LossGraphError("--device cuda: no CUDA device is available; use --device cpu")
        if target.type == "cpu":
            tokens, vocab, hidden = tokens or 512, vocab or 4096, hidden or 64
        known = {case.name: case for case in standard_cases(tokens, vocab)}
        names = cases or [*known, "e"]
        unknown = [name for name in names if name not in known and name != "e" and not Path(name).is_file()]
        if unknown:
            raise LossGraphError(
                f"unknown case(s) {', '.join(unknown)}: give a, b, c, d, e or the path of a loss-graph file"
            )
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
                    case_tokens, case_vocab = tokens or 8192, vocab or 128256
                    results.append(
                        run_linear_case(tokens=case_tokens, vocab=case_vocab, hidden=hidden or 4096, **settings)
                    )
                elif name not in known:
                    results.append(run_graph_file(Path(name), tokens=tokens or 8192, bandwidth=bandwidth, **settings))
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
                    _bytes(m.peak_extra_bytes) if m.peak_extra_bytes is not None else "",
                    m.note,
                )
            _print_plain(out, f"case ({result.case}) {result.description}: N={result.tokens}, V={result.vocab}")
            out.print(table, soft_wrap=False)
        if json_path is not None:
            write_json(json_path, info, bandwidth, results)
            _print_plain(err, f"wrote {json_path}")


class DemoDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def demo(
    graph: Annotated[
        Optional[Path],
        typer.Option("--graph", help="Loss graph for the student (default: examples/mtp_distill.yaml, built in)."),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps of each model.")] = 300,
    device: Annotated[DemoDevice, typer.Option("--device", help="Where to train.")] = DemoDevice.cpu,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for metrics and plots.")] = Path("lossgraph-demo"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
) -> None:
    """Train a small teacher, then a student with multi-token-prediction heads that learns from labels
    and from the teacher as a loss graph declares; compare it with the same student without the teacher."""
    with cli_errors():
        from ..apps.demo import DemoConfig, run_demo

        if device is DemoDevice.cuda:
            import torch

            if not torch.cuda.is_available():
                raise LossGraphError("--device cuda: no CUDA device is available; use --device cpu")
        run_demo(DemoConfig(graph=graph, steps=steps, device=device.value, out=out_dir, seed=seed), out)


def run() -> None:
    """Console-script entry point."""
    app()
