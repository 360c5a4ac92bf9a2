"""What a loss kind is: one object that holds everything lossgraph knows about the kind.

A kind module (one per kind, next to this file) defines the kind's pydantic model, its target rules,
its reference math, its kernel fragments and its docs, and exports them as one `LossKind`. The
compiler, the planner, the reference backend, the kernel generator and the docs read the kind through
this interface and never branch on its name. See docs/architecture.md, "How to add a loss kind".

Nothing here imports torch: a kind's reference math imports it inside the method, so that loading and
validating a file stays free of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import quote
from ..kernels.fragments import LossFragments
from ..spec.nodes import LossNode

if TYPE_CHECKING:
    import torch


class Term(Protocol):
    """A term as the kind's math sees it: the plan's `Term` or the kernel's `KernelTerm`."""

    constants: tuple[tuple[str, float], ...]  # what `LossKind.constants` gave for the node


class ReferenceRow(Protocol):
    """What `LossKind.reference` reads for one term at every position of a head (the reference
    backend builds it: `lossgraph.runtime.reference.TermRows`)."""

    logits: torch.Tensor  # [N, V] at temperature 1, zero on masked rows
    log_q: torch.Tensor  # log softmax of the logits at the term's temperature
    hard_labels: bool  # the target is the labels source itself
    class_weights: torch.Tensor | None  # [V] the term's per-class weights (cross_entropy's), or None

    def log_p(self) -> torch.Tensor:
        """log p [N, V] of the term's target at its temperature."""

    def at_labels(self, values: torch.Tensor) -> torch.Tensor:
        """values[i, label_i] (NaN for a label outside the vocab)."""


@dataclass(frozen=True)
class TargetFacts:
    """What the target rules of a kind may ask of the source a loss node targets."""

    name: str  # the source's name
    hard_labels: bool  # the source is the `labels` source itself (a one-hot target)
    zero_mass_reason: str | None  # why some token may get no target mass, or None
    # the source is the labels' own distribution, one-hot or smoothed (SourceKind.label_distribution):
    # per-class weights (cross_entropy's class_weights) apply to it
    label_distribution: bool = False
    # the source's `type` (a kind that reads one source kind only refuses the others)
    kind: str = ""


class LossKind:
    """One loss kind. Subclass it in the kind's module, set the class attributes, and override the
    methods the kind needs."""

    #: the `type:` of the loss node
    name: ClassVar[str]
    #: the kind's pydantic model (a subclass of spec.nodes.LossNode with `type: Literal[name]`)
    model: ClassVar[type[LossNode]]
    #: the kind's kernel code
    fragments: ClassVar[LossFragments]
    #: docs: the per-position term, one line each (Unicode math)
    formula: ClassVar[tuple[str, ...]]
    #: docs: a one-line YAML example of a node of this kind
    example: ClassVar[str]
    #: docs: the checks of this kind, in words (beyond those every loss node has)
    checks: ClassVar[tuple[str, ...]] = ()
    #: docs: a note on targets or fields, or ""
    note: ClassVar[str] = ""
    #: the kind may compare with the `labels` source itself; if not, `hard_labels_fix` says what to do
    accepts_hard_labels: ClassVar[bool] = True
    hard_labels_fix: ClassVar[str] = "use cross_entropy, or compare with a label_smoothing source of the labels"
    #: the kind needs target mass on every token (a log of the target appears in its value)
    needs_full_support: ClassVar[bool] = False

    @property
    def takes_target(self) -> bool:
        return "target" in self.model.model_fields

    # ----------------------------------------------------------------------------------------------
    # Spec and compiler.
    # ----------------------------------------------------------------------------------------------

    def constants(self, loss: LossNode) -> tuple[tuple[str, float], ...]:
        """The node's constants that the math needs (baked into the kernel), as (name, value) pairs."""
        return ()

    def kernel_fragments(self, term: Term) -> LossFragments:
        """The fragments the kernel of `term` runs (a kind may hand a term to another kind's code at a
        value of its constants where the two agree: jsd at beta 0 and 1)."""
        return self.fragments

    def aggregation(self, loss: LossNode) -> tuple[str, float] | None:
        """How the node's terms aggregate over their target's leaf, when not as the head's targets do:
        (aggregation, constant), handed to the leaf's form (`LeafForm.group_weights`), which weighs the
        rows and gives the total the sum is divided by; None (the default) for the head's own positions."""
        return None

    def details(self, loss: LossNode) -> list[str]:
        """Short descriptions of the kind's own fields, for `show` and `plan` (e.g. `beta 0.3`)."""
        return []

    def check_fields(self, loss: LossNode) -> list[tuple[str, str]]:
        """(field, message) for each problem among the node's own fields (beyond their types)."""
        return []

    def check_target(self, target: TargetFacts, loss: LossNode) -> list[tuple[str, str]]:
        """(field, message) for each problem of this kind with its target."""
        problems = []
        if target.hard_labels and not self.accepts_hard_labels:
            problems.append(
                (
                    "target",
                    f"{self.name} compares two distributions, but {quote(target.name)} holds hard labels; "
                    f"{self.hard_labels_fix}",
                )
            )
        elif self.needs_full_support and target.zero_mass_reason:
            problems.append(
                (
                    "target",
                    f"{self.name} needs a target with mass on every token, but {target.zero_mass_reason}; "
                    "use forward_kl or jsd, or smooth the labels",
                )
            )
        return problems

    # ----------------------------------------------------------------------------------------------
    # Reference math (PyTorch, differentiated by autograd).
    # ----------------------------------------------------------------------------------------------

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor, term: Term) -> torch.Tensor:
        """The per-position value between target log p and student log q over the last dimension
        (the whole vocab, or the buckets of a top-k teacher)."""
        raise NotImplementedError(f"{self.name} takes no target")

    def reference(self, row: ReferenceRow, term: Term) -> torch.Tensor:
        """The per-position value [N] on a dense target (or none): by default the divergence."""
        return self.divergence(row.log_p(), row.log_q, term)

    # ----------------------------------------------------------------------------------------------
    # Metrics: per-row diagnostics (from the shared softmax) and what the kind reports of them.
    # ----------------------------------------------------------------------------------------------

    def diagnostics(self, term: Term) -> tuple[str, ...]:
        """The row diagnostics of `term`: per-row quantities both backends compute beside its values (the
        kernel in the same launch, `LossFragments.row_diagnostics`), from which `metrics` reports."""
        return self.kernel_fragments(term).diagnostic_names(term)

    def reference_diagnostics(self, row: ReferenceRow, term: Term) -> tuple[torch.Tensor, ...]:
        """Reference: each of `diagnostics` at every position, [N] each (the readable math)."""
        raise NotImplementedError(f"{self.name}: no row diagnostics")

    #: the metrics (keys of `metrics`) that a peer's trainer logs under the same name and meaning (TRL's
    #: GRPOTrainer for a policy gradient), so that an integration can log them as that trainer would
    trainer_metrics: tuple[str, ...] = ()

    def metrics(self, term: Any, diagnostics: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        """The term's metrics (0-d device tensors, no host sync) from its row diagnostics by name ([N],
        0 where masked) and the batch as its group sees it (`HeadBatch.group`); keys without the node's
        name, which the graph puts before them."""
        return {}

    def __repr__(self) -> str:
        return f"<loss kind {self.name}>"


def constant(term: Any, name: str) -> float:
    """A constant of a plan term or a kernel term (see `LossKind.constants`)."""
    return dict(term.constants)[name]
