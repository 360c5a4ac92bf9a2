"""Diagrams of a loss graph: Mermaid and Graphviz DOT text, and SVG/PNG through Graphviz's `dot`.

Sources are drawn on the left, loss nodes in the middle and heads on the right, so a diagram reads as
data flow: where targets come from, which losses compare them with which head.
"""

from __future__ import annotations

import shutil
import subprocess

from ..compiler.graph import SourceGraph
from ..errors import LossGraphError
from ..kinds import source_kind
from ..spec.describe import number, scheduled
from ..spec.models import LossGraphSpec

FORMATS = ("mermaid", "dot", "svg", "png")


class GraphvizMissingError(LossGraphError):
    """Rendering SVG or PNG needs Graphviz's `dot` program."""


def _edges(spec: LossGraphSpec) -> list[tuple[str, str, str]]:
    """(from id, to id, label) for every edge of the diagram."""
    edges: list[tuple[str, str, str]] = []
    graph = SourceGraph(spec)
    for name in spec.sources:
        for member in graph.members(name):  # labelled with its weight in a mixture
            label = "" if member.weight is None else f"{member.weight:.3g}"
            edges.append((f"source_{member.name}", f"source_{name}", label))
    for name, loss in spec.losses.items():
        target = getattr(loss, "target", None)
        if target:
            edges.append((f"source_{target}", f"loss_{name}", ""))
        for index, head in enumerate(loss.heads):
            label = f"x{number(loss.head_weights[index])}" if loss.head_weights else ""
            edges.append((f"loss_{name}", f"head_{head}", label))
    return edges


def _loss_label(spec: LossGraphSpec, name: str) -> list[str]:
    loss = spec.losses[name]
    lines = [name, loss.type, f"w {scheduled(loss.weight)}"]
    temperature = getattr(loss, "temperature", 1.0)
    if temperature != 1.0:
        lines.append(f"T {scheduled(temperature)}")
    return lines


def _source_label(spec: LossGraphSpec, name: str) -> list[str]:
    source = spec.sources[name]
    label = source_kind(source.type).diagram_label(source)
    return [name, source.type, label] if label else [name, source.type]


def _head_label(spec: LossGraphSpec, name: str) -> list[str]:
    return [name, f"t+{spec.heads[name].offset}, V {spec.head_vocab(name)}"]


def _mermaid_text(lines: list[str]) -> str:
    return "<br/>".join(line.replace('"', "#quot;") for line in lines)


def to_mermaid(spec: LossGraphSpec) -> str:
    """A Mermaid flowchart (renders in GitHub and most Markdown viewers)."""
    out = ["flowchart LR"]
    if spec.sources:
        out.append('  subgraph sources["sources"]')
        out += [f'    source_{n}[/"{_mermaid_text(_source_label(spec, n))}"/]' for n in spec.sources]
        out.append("  end")
    out.append('  subgraph losses["losses"]')
    out += [f'    loss_{n}{{{{"{_mermaid_text(_loss_label(spec, n))}"}}}}' for n in spec.losses]
    out.append("  end")
    out.append('  subgraph heads["heads"]')
    out += [f'    head_{n}(["{_mermaid_text(_head_label(spec, n))}"])' for n in spec.heads]
    out.append("  end")
    for start, end, label in _edges(spec):
        arrow = f' -->|"{label}"| ' if label else " --> "
        out.append(f"  {start}{arrow}{end}")
    return "\n".join(out) + "\n"


def _dot_text(lines: list[str]) -> str:
    return "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)


def to_dot(spec: LossGraphSpec, title: str = "lossgraph") -> str:
    """A Graphviz DOT digraph."""
    out = [
        f'digraph "{_dot_text([title])}" {{',
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    clusters = [
        ("sources", "source", spec.sources, _source_label, 'shape=parallelogram, style=filled, fillcolor="#dbeafe"'),
        ("losses", "loss", spec.losses, _loss_label, 'shape=hexagon, style=filled, fillcolor="#fef3c7"'),
        ("heads", "head", spec.heads, _head_label, 'shape=box, style="rounded,filled", fillcolor="#dcfce7"'),
    ]
    for cluster, prefix, names, label, style in clusters:
        if not names:
            continue
        out.append(f'  subgraph cluster_{cluster} {{ label="{cluster}"; color="#9ca3af";')
        out += [f'    {prefix}_{n} [label="{_dot_text(label(spec, n))}", {style}];' for n in names]
        out.append("  }")
    for start, end, label in _edges(spec):
        attributes = f' [label="{label}"]' if label else ""
        out.append(f"  {start} -> {end}{attributes};")
    out.append("}")
    return "\n".join(out) + "\n"


def render(spec: LossGraphSpec, fmt: str, title: str = "lossgraph") -> bytes:
    """The diagram in `fmt` (one of FORMATS) as bytes."""
    if fmt == "mermaid":
        return to_mermaid(spec).encode()
    if fmt == "dot":
        return to_dot(spec, title).encode()
    if fmt not in FORMATS:
        raise LossGraphError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizMissingError(
            f"--format {fmt} needs Graphviz's `dot` program, which is not on PATH; install Graphviz "
            "(e.g. `apt-get install graphviz` or `brew install graphviz`), or use --format mermaid or dot"
        )
    result = subprocess.run([dot, f"-T{fmt}"], input=to_dot(spec, title).encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise LossGraphError(f"Graphviz `dot` failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
