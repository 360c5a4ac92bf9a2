"""The source graph: which sources each source reads, and the one walk over it.

Sources are where targets come from. `labels`, `teacher` and `topk_teacher` sources are leaves; derived
sources (`label_smoothing`, `mixture`) read other sources and should form a DAG. `SourceGraph` is built
once from a spec (the `build_graph` pass stores it in the `CompileContext`); the passes, the planner,
the descriptions, the diagrams and the demo ask it instead of following the fields of the sources
themselves. It is built for any spec, valid or not: a member that names no declared source is listed by
`members` but has no edge, and a member that closes a cycle is not walked into again (`cycles` reports
the cycles). Pure Python on networkx: no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import networkx as nx

from ..kinds import Member, source_kind
from ..spec.models import LossGraphSpec


def source_members(source: object) -> list[Member]:
    """The sources that `source` reads, in declaration order (duplicates and unknown names kept): its
    kind says which of its fields name them (`SourceKind.members`)."""
    return source_kind(source.type).members(source)


class SourceGraph:
    """The sources of a spec as a networkx digraph, with an edge from each member to each source reading it
    (the direction data flows, as in `lossgraph viz`), and the loss nodes' targets."""

    def __init__(self, spec: LossGraphSpec):
        self.spec = spec
        self._members = {name: source_members(source) for name, source in spec.sources.items()}
        self._flow = nx.DiGraph()
        self._flow.add_nodes_from(spec.sources)
        for name, members in self._members.items():
            self._flow.add_edges_from((m.name, name) for m in members if m.name in spec.sources)
        self._reads = self._flow.reverse(copy=False)  # from each source to the sources it reads
        self._targets = {
            loss_name: target
            for loss_name, loss in spec.losses.items()
            if (target := getattr(loss, "target", None)) is not None and target in spec.sources
        }

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def members(self, name: str) -> list[Member]:
        """The sources `name` reads directly, in declaration order ([] for leaves and unknown names)."""
        return self._members.get(name, [])

    def is_derived(self, name: str) -> bool:
        """True for a declared source that reads other sources (label_smoothing, mixture)."""
        return bool(self._members.get(name))

    def postorder(self, name: str | None = None) -> list[str]:
        """The declared sources reachable from `name` (itself included), each after the sources it reads.

        Each source is listed once; a member already entered (one that closes a cycle, or a second path
        to a shared source) is not walked into again, so the walk is linear and does not recurse. With no
        `name`, the whole graph, started from each source in declaration order.
        """
        if name is not None and name not in self._members:
            return []
        return list(nx.dfs_postorder_nodes(self._reads, source=name))

    def leaves(self, name: str) -> list[str]:
        """The labels, teacher and top-k teacher sources that `name` reads (itself, for a leaf), each once,
        in order of first appearance reading the members left to right."""
        return [current for current in self.postorder(name) if not self.is_derived(current)]

    def leaf_inputs(self, name: str) -> list[tuple[str, str]]:
        """(leaf, reader) for each leaf member of each derived source that `name` reads, through derived sources.

        `reader` is the derived source that lists the leaf (a leaf read by several is given once per
        reader); readers come before the sources they read. For a leaf `name`: [(name, "")].
        """
        if name in self._members and not self.is_derived(name):
            return [(name, "")]
        return [
            (member.name, reader)
            for reader in reversed(self.postorder(name))
            for member in self.members(reader)
            if member.name in self._members and not self.is_derived(member.name)
        ]

    def loss_sources(self, loss: str) -> list[str]:
        """The sources a loss node depends on: its target and what the target reads (none without a target)."""
        target = self._targets.get(loss)
        return self.postorder(target) if target is not None else []

    def cycles(self, first: Callable[[str], object] | None = None) -> list[list[str]]:
        """One cycle for each knot of sources that read each other (or a source that reads itself).

        A cycle is the list of its sources along the data flow, from the knot's source that sorts first
        by `first` (declaration order by default; ties too) to the one it reads, by a shortest way.
        """
        found = []
        for knot in nx.strongly_connected_components(self._flow):
            if len(knot) == 1 and not any(self._flow.has_edge(node, node) for node in knot):
                continue  # a source on no cycle
            inside = self._subgraph(node for node in self._flow if node in knot)
            start = min(inside, key=first) if first is not None else next(iter(inside))
            loops = [nx.shortest_path(inside, start, last) for last in inside.predecessors(start)]
            found.append(min(loops, key=len))
        return found

    def _subgraph(self, nodes: Iterable[str]) -> nx.DiGraph:
        """A copy of the graph on `nodes`, keeping the order of nodes and of each node's edges."""
        inside = nx.DiGraph()
        inside.add_nodes_from(nodes)
        inside.add_edges_from((u, v) for u, v in self._flow.edges(list(inside)) if v in inside)
        return inside
