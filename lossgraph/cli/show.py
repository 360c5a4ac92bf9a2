"""Renderings of `lossgraph show` (the graph as a rich tree, head by head) and `lossgraph plan` (its launches)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from ..errors import printable
from ..spec.describe import loss_summary, source_summary
from ..spec.models import LossGraphSpec


def graph_tree(spec: LossGraphSpec, title: str) -> Tree:
    """Heads with the loss nodes bound to them, then the sources."""
    header = f"[bold]{escape(title)}[/]  normalization {spec.normalization}"
    if spec.vocab_size is not None:
        header += f", vocab {spec.vocab_size}"
    if spec.description:
        header += f"\n[dim]{_text(spec.description)}[/]"
    tree = Tree(header)
    heads = tree.add("[bold]heads[/]")
    for head_name, head in spec.heads.items():
        label = f"[green]{escape(head_name)}[/]  predicts t+{head.offset}, vocab {spec.head_vocab(head_name)}"
        if head.logits_scale is not None:
            label += f", logits x {head.logits_scale:g}"
        if head.softcap is not None:
            label += f", softcap {head.softcap:g}"
        if head.description:
            label += f"  [dim]{_text(head.description)}[/]"
        branch = heads.add(label)
        bound = [(name, loss.heads.index(head_name)) for name, loss in spec.losses.items() if head_name in loss.heads]
        if not bound:
            branch.add("[yellow]no loss bound[/]")
        for loss_name, index in bound:
            label = f"[cyan]{escape(loss_name)}[/]: {escape(loss_summary(spec, loss_name, index))}"
            if spec.losses[loss_name].description:
                label += f"  [dim]{_text(spec.losses[loss_name].description)}[/]"
            branch.add(label)
    if spec.sources:
        sources = tree.add("[bold]sources[/]")
        for name, source in spec.sources.items():
            label = f"[blue]{escape(name)}[/]: {escape(source_summary(spec, name))}"
            if source.description:
                label += f"  [dim]{_text(source.description)}[/]"
            sources.add(label)
    return tree


def _text(description: str) -> str:
    """A description as the tree shows it: no rich markup, and no character that would move the cursor
    or reorder the line (an escape written in a quoted YAML string can hold any)."""
    return escape(printable(description))


def byte_size(count: float) -> str:
    """1,006.00 MiB, 9.79 GiB: binary units, two decimals (bytes in full)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def launch_names(report: dict) -> list[str]:
    """Each launch's name in `plan`'s output: its head, with `#N` when the head has several launches."""
    per_head: dict[str, int] = {}
    for entry in report["launches"]:
        per_head[entry["head"]] = per_head.get(entry["head"], 0) + 1
    return [
        entry["head"] if per_head[entry["head"]] == 1 else f"{entry['head']} #{entry['launch']}"
        for entry in report["launches"]
    ]


def plan_table(report: dict) -> Table:
    """One row per launch: head, loss nodes, reads of the row, bytes per token, total and time.

    The loss nodes are the terms of the row's head (`lm` on head `next` is the term `lm/next`); names
    wrap between names, never inside one. The softmax states go below the table (`plan_states`): they
    are shared by the launch's terms, not paired with them.
    """
    table = Table()
    table.add_column("head", no_wrap=True)
    table.add_column("loss nodes", overflow="fold", min_width=10)
    for column in ("passes", "B/token", "total", "time"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, entry in zip(launch_names(report), report["launches"]):
        nodes = ", ".join(escape(key.rsplit("/", 1)[0]) for key in entry["terms"])
        table.add_row(
            escape(name),
            nodes,
            str(entry["passes"]),
            f"{entry['bytes_per_token']:,}",
            byte_size(entry["bytes"]),
            f"{entry['milliseconds']:.3f} ms",
        )
    return table


def plan_states(report: dict) -> list[str]:
    """The online-softmax states each launch keeps in its first read of the row, one line per launch."""
    lines = ["softmax states each launch keeps (its terms share them):"]
    for name, entry in zip(launch_names(report), report["launches"]):
        states = ", ".join(f"{s['tensor']} T={s['temperature']}" for s in entry["softmaxes"]) or "none"
        lines.append(f"  {name}: {states}")
    return lines
