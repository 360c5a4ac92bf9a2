"""The execution plan of a validated graph: the terms of every head, with their targets resolved.

A term is one loss node applied to one head. Its target is resolved from source names into a small
tree (labels, a dense teacher, a top-k teacher, smoothed labels, a mixture) that both backends read.
Pure Python: building a plan imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kinds import Target, leaf_form, loss_kind, source_kind
from ..kinds.sources.label_smoothing import SmoothedTarget
from ..kinds.sources.labels import LabelsTarget
from ..kinds.sources.mixture import MixtureTarget
from ..kinds.sources.teacher import DenseTarget
from ..kinds.sources.topk_teacher import TopKTarget
from ..spec.models import LossGraphSpec
from .graph import SourceGraph

# The plan's targets are defined by their source kinds (lossgraph/kinds/sources/); named here for the
# code that reads a plan.
__all__ = [
    "DenseTarget",
    "HeadPlan",
    "LabelsTarget",
    "MixtureTarget",
    "Plan",
    "SmoothedTarget",
    "Target",
    "Term",
    "TermGroup",
    "TopKTarget",
    "build_plan",
    "resolve_target",
    "target_leaves",
]


def target_leaves(target: Target) -> list[Target]:
    """The labels and teachers a target reads, each once, in order of first appearance (the order of
    `SourceGraph.leaves` for the source the target was resolved from)."""
    unique: dict[str, Target] = {}
    for leaf in target.leaves():
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
    constants: tuple[tuple[str, float], ...] = ()  # the kind's constants (LossKind.constants), e.g. jsd's beta
    teacher_temperature: object = None  # the target's teacher logits' temperature; None: `temperature`
    positions: str = "targets"  # "targets", "all" or "mask:NAME" (the node's `positions`)
    normalizer: str = "positions"  # "positions" or "targets" (the node's `normalizer`)
    group: int = 0  # index of the term's TermGroup in its head's `groups`; 0: the head's targets
    class_weights: str | None = None  # the run-time class-weight vector the term reads (cross_entropy's)

    @property
    def key(self) -> str:
        """`node/head`, the name of the term in outputs and plans."""
        return f"{self.node}/{self.head}"

    @property
    def position_note(self) -> str:
        """The term's non-default positions and normalizer in words ("" for the defaults)."""
        weighted = self.class_weights is not None and self.normalizer == "positions"
        if self.positions == "targets" and not weighted:
            return ""
        where = {"targets": "the head's targets", "all": "all positions"}.get(
            self.positions, f"positions of mask {self.positions[5:]!r}"
        )
        by = "the head's target count" if self.normalizer == "targets" else "their own count"
        if weighted:
            by = f"the sum of their labels' class weights {self.class_weights!r}"
        return f"{where}, divided by {by}"


@dataclass(frozen=True)
class TermGroup:
    """Positions and a normalizer that terms of a head share (one row scale of the fused kernel).

    Group 0 of every head is its targets (`positions: targets`), whatever the normalizer says.
    """

    positions: str = "targets"  # "targets", "all" or "mask:NAME"
    normalizer: str = "positions"  # "positions": the group's own count; "targets": the head's normalizer
    labelled: bool = False  # a named mask kept to the positions that are targets (its terms read labels)
    # normalizer "positions" of class-weighted cross-entropy: the sum of the positions' weights times
    # their labels' weights in this run-time class-weight vector (torch's weighted mean)
    class_weights: str | None = None
    # (leaf source, aggregation, constant): the rows weighed and the sum divided as the loss kind
    # aggregates over that leaf's value (`LossKind.aggregation`, `LeafForm.group_weights`); None: plainly
    aggregation: tuple[str, str, float] | None = None

    @property
    def mask(self) -> str | None:
        """The run-time mask's name, for a named mask."""
        return self.positions[5:] if self.positions.startswith("mask:") else None


TARGETS = TermGroup()


@dataclass(frozen=True)
class HeadPlan:
    """A head and every term bound to it (the terms one fused kernel computes)."""

    name: str
    offset: int
    vocab_size: int
    terms: tuple[Term, ...]
    hidden_input: bool = False  # receives lossgraph.Linear(hidden, weight, bias), chunked
    softcap: float | None = None  # the losses see softcap * tanh(z / softcap)
    groups: tuple[TermGroup, ...] = (TARGETS,)  # the positions its terms take; Term.group indexes it
    logits_scale: float | None = None  # the losses see a * z (before the cap); None: no scaling

    @property
    def teachers(self) -> list[Target]:
        """The leaves with a run-time value (the call's `teachers=`: dense and top-k teachers, a plugin
        form's sources) read by this head's terms, each once."""
        found: dict[str, Target] = {}
        for term in self.terms:
            if term.target is not None:
                for leaf in target_leaves(term.target):
                    if leaf_form(leaf.form).takes_value:
                        found.setdefault(leaf.name, leaf)
        return list(found.values())


@dataclass(frozen=True)
class Plan:
    """What the runtime executes: heads in declaration order, plus graph-wide settings."""

    normalization: str
    heads: tuple[HeadPlan, ...]
    labels: LabelsTarget | None
    teachers: dict[str, Target] = field(default_factory=dict)  # every HeadPlan.teachers leaf, by name

    @property
    def terms(self) -> list[Term]:
        return [term for head in self.heads for term in head.terms]

    def head(self, name: str) -> HeadPlan:
        return next(head for head in self.heads if head.name == name)

    @property
    def masks(self) -> list[str]:
        """Names of the run-time masks the terms take their positions from (`positions: {mask: NAME}`)."""
        found = {group.mask: None for head in self.heads for group in head.groups if group.mask}
        return list(found)

    @property
    def class_weights(self) -> dict[str, list[HeadPlan]]:
        """Each run-time class-weight vector (`class_weights: NAME`), with the heads whose terms read it."""
        found: dict[str, list[HeadPlan]] = {}
        for head in self.heads:
            for term in head.terms:
                if term.class_weights is not None and head not in found.setdefault(term.class_weights, []):
                    found[term.class_weights].append(head)
        return found


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
            source = spec.sources[current]
            resolved[current] = source_kind(source.type).resolve(spec, current, source, inputs)
    return resolved[name]


def _term_group(loss, target: Target | None) -> TermGroup:
    """The positions and normalizer a loss node's terms take. Class-weighted cross-entropy that divides
    by its own positions has a group of its own: it divides by its labels' summed class weights."""
    positions = loss.positions if isinstance(loss.positions, str) else f"mask:{loss.positions.mask}"
    class_weights = getattr(loss, "class_weights", None) if loss.normalizer == "positions" else None
    aggregation = loss_kind(loss.type).aggregation(loss)
    if aggregation is not None:
        aggregation = (target.leaves()[0].name, *aggregation)
    if positions == "targets" and class_weights is None and aggregation is None:
        return TARGETS
    labelled = positions != "all" and target is not None and any(leaf.hard_labels for leaf in target.leaves())
    if positions == "targets":
        labelled = False  # the head's targets already have a label
    return TermGroup(positions, loss.normalizer, labelled, class_weights, aggregation)


def build_plan(spec: LossGraphSpec) -> Plan:
    """Terms grouped by head, for a spec that passed validation."""
    graph, resolved = SourceGraph(spec), {}
    heads = []
    for head_name, head in spec.heads.items():
        terms = []
        groups = [TARGETS]
        for node, loss in spec.losses.items():
            if head_name not in loss.heads:
                continue
            index = loss.heads.index(head_name)
            target_name = getattr(loss, "target", None)
            target = resolve_target(spec, target_name, graph, resolved) if target_name else None
            group = _term_group(loss, target)
            if group not in groups:
                groups.append(group)
            terms.append(
                Term(
                    node=node,
                    head=head_name,
                    kind=loss.type,
                    target=target,
                    weight=loss.weight,
                    head_weight=loss.head_weights[index] if loss.head_weights else 1.0,
                    temperature=getattr(loss, "temperature", 1.0),
                    temperature_scaling=getattr(loss, "temperature_scaling", False),
                    constants=loss_kind(loss.type).constants(loss),
                    teacher_temperature=getattr(loss, "teacher_temperature", None),
                    positions=group.positions,
                    normalizer=group.normalizer,
                    group=groups.index(group),
                    class_weights=getattr(loss, "class_weights", None),
                )
            )
        heads.append(
            HeadPlan(
                head_name,
                head.offset,
                spec.head_vocab(head_name),
                tuple(terms),
                hidden_input=head.input == "hidden",
                softcap=head.softcap,
                groups=tuple(groups),
                # a scale of 1 is no scale: the same kernels as a head without one
                logits_scale=None if head.logits_scale in (None, 1.0) else head.logits_scale,
            )
        )
    labels = next(
        (
            resolve_target(spec, name, graph, resolved)
            for name, source in spec.sources.items()
            if source_kind(source.type).provides_labels
        ),
        None,
    )
    teachers: dict[str, Target] = {}
    for head in heads:
        for teacher in head.teachers:
            teachers.setdefault(teacher.name, teacher)
    return Plan(spec.normalization, tuple(heads), labels, teachers)
