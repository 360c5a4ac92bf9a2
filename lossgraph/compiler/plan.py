"""The execution plan of a validated graph: the terms of every head, with their targets resolved.

A term is one loss node applied to one head. Its target is resolved from source names into a small
tree (labels, a dense teacher, a top-k teacher, smoothed labels, a mixture) that both backends read.
Pure Python: building a plan imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..spec.models import (
    LabelSmoothingSource,
    LabelsSource,
    LossGraphSpec,
    MixtureSource,
    TeacherSource,
    TopKTeacherSource,
)
from .graph import SourceGraph


@dataclass(frozen=True)
class LabelsTarget:
    """Hard next-token labels (a one-hot distribution)."""

    name: str
    ignore_index: int


@dataclass(frozen=True)
class DenseTarget:
    """Dense teacher logits, mapped onto the head's vocab (`truncate`, `pad` or none)."""

    name: str
    vocab_size: int
    vocab_map: str | None


@dataclass(frozen=True)
class TopKTarget:
    """A teacher known on k tokens per position: indices and log-probs at temperature 1."""

    name: str
    k: int
    tail: str
    vocab_size: int


@dataclass(frozen=True)
class SmoothedTarget:
    """(1 - epsilon) one-hot(labels) + epsilon / V."""

    name: str
    epsilon: float
    labels: LabelsTarget


@dataclass(frozen=True)
class MixtureTarget:
    """Sum of weight x distribution over the parts."""

    name: str
    parts: tuple[tuple[float, Target], ...]


Target = Union[LabelsTarget, DenseTarget, TopKTarget, SmoothedTarget, MixtureTarget]


def target_leaves(target: Target) -> list[LabelsTarget | DenseTarget | TopKTarget]:
    """The labels and teachers a target reads, each once, in order of first appearance (the order of
    `SourceGraph.leaves` for the source the target was resolved from)."""
    if isinstance(target, SmoothedTarget):
        leaves: list[LabelsTarget | DenseTarget | TopKTarget] = [target.labels]
    elif isinstance(target, MixtureTarget):
        leaves = [leaf for _, part in target.parts for leaf in target_leaves(part)]
    else:
        leaves = [target]
    unique: dict[str, LabelsTarget | DenseTarget | TopKTarget] = {}
    for leaf in leaves:
        unique.setdefault(leaf.name, leaf)
    return list(unique.values())


@dataclass(frozen=True)
class Term:
    """One loss node applied to one head."""

    node: str
    head: str
    kind: str
    target: Target | None
    weight: object  # a number or a schedule model
    head_weight: float
    temperature: object  # a number or a schedule model; 1.0 for kinds without temperature
    temperature_scaling: bool
    beta: float  # jsd only

    @property
    def key(self) -> str:
        """`node/head`, the name of the term in outputs and plans."""
        return f"{self.node}/{self.head}"


@dataclass(frozen=True)
class HeadPlan:
    """A head and every term bound to it (the terms one fused kernel computes)."""

    name: str
    offset: int
    vocab_size: int
    terms: tuple[Term, ...]
    hidden_input: bool = False  # receives lossgraph.Linear(hidden, weight, bias), chunked

    @property
    def teachers(self) -> list[DenseTarget | TopKTarget]:
        """Teachers read by this head's terms, each once."""
        found: dict[str, DenseTarget | TopKTarget] = {}
        for term in self.terms:
            if term.target is not None:
                for leaf in target_leaves(term.target):
                    if not isinstance(leaf, LabelsTarget):
                        found.setdefault(leaf.name, leaf)
        return list(found.values())


@dataclass(frozen=True)
class Plan:
    """What the runtime executes: heads in declaration order, plus graph-wide settings."""

    normalization: str
    heads: tuple[HeadPlan, ...]
    labels: LabelsTarget | None
    teachers: dict[str, DenseTarget | TopKTarget] = field(default_factory=dict)

    @property
    def terms(self) -> list[Term]:
        return [term for head in self.heads for term in head.terms]

    def head(self, name: str) -> HeadPlan:
        return next(head for head in self.heads if head.name == name)


def resolve_target(
    spec: LossGraphSpec, name: str, graph: SourceGraph | None = None, resolved: dict[str, Target] | None = None
) -> Target:
    """The resolved tree of source `name` (the spec must be valid).

    Sources are resolved in the source graph's postorder, each from the targets of the sources it reads;
    `graph` and `resolved` (which is updated) let the targets of one plan share that work.
    """
    graph = SourceGraph(spec) if graph is None else graph
    resolved = {} if resolved is None else resolved
    for current in graph.postorder(name):
        if current not in resolved:
            inputs = [(member.weight, resolved[member.name]) for member in graph.members(current)]
            resolved[current] = _resolve_source(spec, current, inputs)
    return resolved[name]


def _resolve_source(spec: LossGraphSpec, name: str, inputs: list[tuple[float | None, Target]]) -> Target:
    """The target of source `name`, given the (mixture weight, target) of each source it reads."""
    source = spec.sources[name]
    if isinstance(source, LabelsSource):
        return LabelsTarget(name, source.ignore_index)
    if isinstance(source, TeacherSource):
        return DenseTarget(name, spec.source_vocab(name), source.vocab_map)
    if isinstance(source, TopKTeacherSource):
        return TopKTarget(name, source.k, source.tail, spec.source_vocab(name))
    if isinstance(source, LabelSmoothingSource):
        ((_, labels),) = inputs
        return SmoothedTarget(name, source.epsilon, labels)
    if isinstance(source, MixtureSource):
        return MixtureTarget(name, tuple((weight, part) for weight, part in inputs if weight is not None))
    raise TypeError(f"unknown source type {source.type!r}")  # unreachable for a validated spec


def build_plan(spec: LossGraphSpec) -> Plan:
    """Terms grouped by head, for a spec that passed validation."""
    graph, resolved = SourceGraph(spec), {}
    heads = []
    for head_name, head in spec.heads.items():
        terms = []
        for node, loss in spec.losses.items():
            if head_name not in loss.heads:
                continue
            index = loss.heads.index(head_name)
            target_name = getattr(loss, "target", None)
            terms.append(
                Term(
                    node=node,
                    head=head_name,
                    kind=loss.type,
                    target=resolve_target(spec, target_name, graph, resolved) if target_name else None,
                    weight=loss.weight,
                    head_weight=loss.head_weights[index] if loss.head_weights else 1.0,
                    temperature=getattr(loss, "temperature", 1.0),
                    temperature_scaling=getattr(loss, "temperature_scaling", False),
                    beta=getattr(loss, "beta", 0.5),
                )
            )
        heads.append(HeadPlan(head_name, head.offset, spec.head_vocab(head_name), tuple(terms), head.input == "hidden"))
    labels = next(
        (LabelsTarget(n, s.ignore_index) for n, s in spec.sources.items() if isinstance(s, LabelsSource)), None
    )
    teachers: dict[str, DenseTarget | TopKTarget] = {}
    for head in heads:
        for teacher in head.teachers:
            teachers.setdefault(teacher.name, teacher)
    return Plan(spec.normalization, tuple(heads), labels, teachers)
