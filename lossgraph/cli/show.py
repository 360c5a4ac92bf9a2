"""`lossgraph show`: the graph as a rich tree, head by head."""

from __future__ import annotations

from rich.markup import escape
from rich.tree import Tree

from ..spec.describe import loss_summary, source_summary
from ..spec.models import LossGraphSpec


def graph_tree(spec: LossGraphSpec, title: str) -> Tree:
    """Heads with the loss nodes bound to them, then the sources."""
    header = f"[bold]{escape(title)}[/]  normalization {spec.normalization}"
    if spec.vocab_size is not None:
        header += f", vocab {spec.vocab_size}"
    if spec.description:
        header += f"\n[dim]{escape(spec.description)}[/]"
    tree = Tree(header)
    heads = tree.add("[bold]heads[/]")
    for head_name, head in spec.heads.items():
        label = f"[green]{escape(head_name)}[/]  predicts t+{head.offset}, vocab {spec.head_vocab(head_name)}"
        if head.description:
            label += f"  [dim]{escape(head.description)}[/]"
        branch = heads.add(label)
        bound = [(name, loss.heads.index(head_name)) for name, loss in spec.losses.items() if head_name in loss.heads]
        if not bound:
            branch.add("[yellow]no loss bound[/]")
        for loss_name, index in bound:
            label = f"[cyan]{escape(loss_name)}[/]: {escape(loss_summary(spec, loss_name, index))}"
            if spec.losses[loss_name].description:
                label += f"  [dim]{escape(spec.losses[loss_name].description)}[/]"
            branch.add(label)
    if spec.sources:
        sources = tree.add("[bold]sources[/]")
        for name, source in spec.sources.items():
            label = f"[blue]{escape(name)}[/]: {escape(source_summary(spec, name))}"
            if source.description:
                label += f"  [dim]{escape(source.description)}[/]"
            sources.add(label)
    return tree
