"""Diagrams of a loss graph: Mermaid and Graphviz DOT text, and SVG/PNG through Graphviz's `dot`.

Sources are drawn on the left, loss nodes in the middle and heads on the right, so a diagram reads as
data flow: where targets come from, which losses compare them with which head. A loss node's box names
its kind once and shows what scales it (weight, temperature, x T^2, the kind's own settings such as
jsd's beta); a teacher's box shows the token it predicts (t+offset). In DOT the losses share one
column and the heads another, with no cluster boxes to pin their order, so Graphviz is free to find a
drawing without crossing edges where one exists.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap

from ..compiler.graph import SourceGraph
from ..errors import LossGraphError
from ..kinds import loss_kind, source_kind
from ..spec.describe import number, scheduled
from ..spec.models import LossGraphSpec

FORMATS = ("mermaid", "dot", "svg", "png")
WIDTH = 26  # characters per line of a box's text
# Greek letters and arrows written out in the kinds' short descriptions, as a diagram shows them.
SYMBOLS = {"beta ": "β ", "epsilon ": "ε ", "eps ": "ε ", " -> ": " → "}


class GraphvizMissingError(LossGraphError):
    """Rendering SVG or PNG needs Graphviz's `dot` program."""


def _symbols(text: str) -> str:
    for word, symbol in SYMBOLS.items():
        text = text.replace(word, symbol)
    return text


def _wrap(lines: list[str]) -> list[str]:
    return [part for line in lines for part in textwrap.wrap(line, WIDTH, break_long_words=False) or [""]]


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
            label = f"×{number(loss.head_weights[index])}" if loss.head_weights else ""
            edges.append((f"loss_{name}", f"head_{head}", label))
    return edges


def loss_label(spec: LossGraphSpec, name: str) -> list[str]:
    """`fkl`, `forward_kl`, `w 1, T 2, ×T²`: the kind once (not when the node is named after it)."""
    loss = spec.losses[name]
    lines = [name] if name == loss.type else [name, loss.type]
    details = [f"w {scheduled(loss.weight)}"]
    temperature = getattr(loss, "temperature", 1.0)
    if temperature != 1.0:
        details.append(f"T {scheduled(temperature)}")
    teacher_temperature = getattr(loss, "teacher_temperature", None)
    if teacher_temperature is not None:
        details.append(f"teacher T {scheduled(teacher_temperature)}")
    if getattr(loss, "temperature_scaling", False):
        details.append("×T²")
    details += loss_kind(loss.type).details(loss)
    return lines + _wrap([_symbols(", ".join(details))])


def source_label(spec: LossGraphSpec, name: str) -> list[str]:
    """`teacher2`, `teacher`, `t+2, V 32064 (truncate)`: a teacher shows the token it predicts."""
    source = spec.sources[name]
    kind = source_kind(source.type)
    lines = [name] if name == source.type else [name, source.type]
    details = []
    extra = kind.diagram_label(source)
    if extra:
        details.append(extra)
    if kind.is_teacher:
        where = f"t+{source.offset}"
        vocab = spec.source_vocab(name)
        if vocab is not None and vocab != spec.vocab_size:
            where += f", V {vocab}"
            if getattr(source, "vocab_map", None):
                where += f" ({source.vocab_map})"
        details.append(where)
    return lines + _wrap([_symbols(", ".join(details))] if details else [])


def head_label(spec: LossGraphSpec, name: str) -> list[str]:
    return [name, f"t+{spec.heads[name].offset}, V {spec.head_vocab(name)}"]


def _mermaid_text(lines: list[str]) -> str:
    return "<br/>".join(line.replace('"', "#quot;") for line in lines)


def to_mermaid(spec: LossGraphSpec) -> str:
    """A Mermaid flowchart (renders in GitHub and most Markdown viewers)."""
    out = ["flowchart LR"]
    if spec.sources:
        out.append('  subgraph sources["sources"]')
        out += [f'    source_{n}[/"{_mermaid_text(source_label(spec, n))}"/]' for n in spec.sources]
        out.append("  end")
    out.append('  subgraph losses["losses"]')
    out += [f'    loss_{n}{{{{"{_mermaid_text(loss_label(spec, n))}"}}}}' for n in spec.losses]
    out.append("  end")
    out.append('  subgraph heads["heads"]')
    out += [f'    head_{n}(["{_mermaid_text(head_label(spec, n))}"])' for n in spec.heads]
    out.append("  end")
    for start, end, label in _edges(spec):
        arrow = f' -->|"{label}"| ' if label else " --> "
        out.append(f"  {start}{arrow}{end}")
    return "\n".join(out) + "\n"


def _dot_text(lines: list[str]) -> str:
    return "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)


def to_dot(spec: LossGraphSpec, title: str = "lossgraph") -> str:
    """A Graphviz DOT digraph, left to right: sources, then one column of losses, one of heads.

    No cluster boxes: they would hold Graphviz to an order of nodes with crossing edges (every_loss.yaml
    drew four); shapes and colours tell the kinds of node apart, and the title names the columns.
    """
    out = [
        f'digraph "{_dot_text([title])}" {{',
        "  rankdir=LR;",
        "  remincross=true;",
        f'  label="{_dot_text([title])}: sources → losses → heads"; labelloc=t; fontname="Helvetica"; fontsize=12;',
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    columns = [
        ("source", list(spec.sources), source_label, 'shape=box, style=filled, fillcolor="#dbeafe"'),
        ("loss", list(spec.losses), loss_label, 'shape=hexagon, style=filled, fillcolor="#fef3c7"'),
        ("head", list(spec.heads), head_label, 'shape=box, style="rounded,filled", fillcolor="#dcfce7"'),
    ]
    for prefix, names, label, style in columns:
        out += [f'  {prefix}_{n} [label="{_dot_text(label(spec, n))}", {style}];' for n in names]
        if prefix != "source" and names:  # derived sources take the ranks before the losses
            out.append("  { rank=same; " + " ".join(f"{prefix}_{n};" for n in names) + " }")
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
