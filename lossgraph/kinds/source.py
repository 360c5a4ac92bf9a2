"""What a source kind is: where a target comes from, as one object per kind, and the plan's view of it.

A source kind module (one per kind under `sources/`) defines the kind's pydantic model, the sources it
reads (for derived sources), its rules, how it resolves into a plan `Target`, and its docs. The
`Target` it resolves into carries the rest of the kind's knowledge: which leaves it reads, its kernel
form, its reference log-probabilities and its input checks. The compiler, the planner, the reference
and the docs go through these interfaces and do not branch on a source's `type`.

A leaf target (labels, a teacher) has a `form`: the name of a registered `form.LeafForm`, which owns its
run-time value (input checks, kernel arguments, the vocab-parallel split). The built-in forms are
`labels` (the row's label), `dense` (a teacher's logits over the vocab) and `topk` (k stored tokens); a
plugin adds its own. A derived target (smoothed labels, a mixture) has no form of its own: it is made
of leaves that do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..spec.nodes import SourceNode

if TYPE_CHECKING:
    import torch

    from ..kernels.fragments import KTarget

# Annotations below: `spec` is a lossgraph.spec.models.LossGraphSpec and `batch` a
# lossgraph.runtime.inputs.HeadBatch; both sit above the kinds, which do not import them.
LossGraphSpec = Any
HeadBatch = Any

LABELS = "labels"
DENSE = "dense"
TOPK = "topk"


class Member(NamedTuple):
    """One source that a derived source reads."""

    name: str
    path: tuple[str | int, ...]  # where it is written inside the reading source: ("source",) or ("sources", i)
    weight: float | None  # its share of a mixture (equal shares when `weights` is omitted); None otherwise


@dataclass(frozen=True)
class LaunchIndex:
    """Where a launch keeps its leaves: each leaf's position among the launch's leaves of its form, by
    name (dense teacher i is `t{i}_ptr`, top-k teacher i `k{i}_...`, a plugin form's names its own)."""

    positions: dict[str, int]

    @staticmethod
    def of(leaves: Iterable[Target]) -> LaunchIndex:
        """The index of a launch reading `leaves` (each once), in that order within each form."""
        counts: dict[str | None, int] = {}
        positions = {}
        for leaf in leaves:
            positions[leaf.name] = counts.get(leaf.form, 0)
            counts[leaf.form] = positions[leaf.name] + 1
        return LaunchIndex(positions)


@dataclass(frozen=True)
class Target:
    """A source resolved for the plan. Leaves (labels and teachers) have a `form`; derived targets are
    made of leaves."""

    name: str

    #: a leaf's form: the name of its registered `form.LeafForm` (LABELS, DENSE, TOPK or a plugin's);
    #: None for a derived target
    form: ClassVar[str | None] = None
    #: capabilities the runtime asks of a target instead of its class:
    #: the target is the row's label, one-hot (cross-entropy's value is then lse - s_y)
    hard_labels: ClassVar[bool] = False
    #: the leaf's run-time value has a column per token, split over the ranks with the head's logits
    vocab_columns: ClassVar[bool] = False

    def leaves(self) -> list[Target]:
        """The labels and teachers this target reads, with repeats, in order."""
        return [self]

    def kernel_target(self, index: LaunchIndex) -> KTarget:
        """The target's form in a kernel (`kernels.fragments.TargetFragments`, or `KTopK`); a leaf that
        takes a run-time value finds its position in the launch in `index`."""
        raise NotImplementedError(f"{type(self).__name__} has no kernel form")

    def class_weighted(self, vector: int) -> KTarget:
        """The target's kernel form weighted per class by class-weight vector `vector` of the launch
        (only for a target whose source kind has `label_distribution`)."""
        raise NotImplementedError(f"{type(self).__name__} takes no class weights")

    def log_probs(self, batch: HeadBatch, vocab: int, temperature: float, dtype: torch.dtype) -> torch.Tensor:
        """Reference: log p [N, V] at `temperature` (masked rows hold finite placeholder values)."""
        raise NotImplementedError(f"{type(self).__name__} is not a dense target")

    def vector_log_probs(
        self, batch: HeadBatch, z: torch.Tensor, mask: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Reference, for a target known on a few tokens per row only: (log p, log q, usable rows) over
        its small vectors, z the student's logits at its temperature; None for a target over the whole
        vocab (`log_probs`)."""
        return None

    def read_bytes(self, head_vocab: int, vocab_override: int | None, logits_bytes: int) -> int:
        """Plan estimates: the bytes a perfect kernel reads of the leaf's run-time value per position, for a
        head of `head_vocab` tokens (`vocab_override`: the estimate's vocab in place of the graph's)."""
        return 0

    def rows_finite(self, batch: HeadBatch, vocab: int) -> torch.Tensor | None:
        """Reference: [N] True where every teacher behind the target is a distribution (no NaN or +inf,
        something finite); None when the target reads no teacher."""
        parts = [leaf.rows_finite(batch, vocab) for leaf in self.leaves() if leaf is not self]
        parts = [part for part in parts if part is not None]
        if not parts:
            return None
        import torch

        return torch.stack(parts).all(0)


class SourceKind:
    """One source kind. Subclass it in the kind's module and set what the kind needs."""

    #: the `type:` of the source
    name: ClassVar[str]
    #: the kind's pydantic model (a subclass of spec.nodes.SourceNode with `type: Literal[name]`)
    model: ClassVar[type[SourceNode]]
    #: docs: a one-line YAML example, the checks in words, and a note ("" for none)
    example: ClassVar[str]
    checks: ClassVar[tuple[str, ...]] = ()
    note: ClassVar[str] = ""
    #: a teacher: predicts one offset and has a vocab of its own (offset and vocab rules apply)
    is_teacher: ClassVar[bool] = False
    #: the kind provides the labels tensor (and the token mask): one such source per graph
    provides_labels: ClassVar[bool] = False
    #: the source's distribution is the labels' own, one-hot or smoothed (`labels`, `label_smoothing`):
    #: cross_entropy's per-class weights apply to it (its target's `class_weighted` gives the kernel form)
    label_distribution: ClassVar[bool] = False

    def members(self, source: Any) -> list[Member]:
        """The sources `source` reads, in declaration order (duplicates and unknown names kept)."""
        return []

    def summary(self, spec: LossGraphSpec, name: str, source: Any) -> str:
        """One line for `show`, e.g. `labels (ignore_index -100)`."""
        return self.name

    def diagram_label(self, source: Any) -> str:
        """Extra text of the source's box in `lossgraph viz` ("" for none)."""
        return ""

    def check(self, name: str, source: Any, spec: LossGraphSpec) -> list[tuple[tuple[str | int, ...], str]]:
        """(path inside the source, message) for each problem of the source with the rest of the graph
        (the sources it reads, its vocab)."""
        return []

    def check_fields(self, name: str, source: Any) -> list[tuple[tuple[str | int, ...], str]]:
        """(path inside the source, message) for each problem among the source's own fields."""
        return []

    def check_loss(self, name: str, source: Any, loss: Any) -> list[tuple[str, str]]:
        """(field of the loss node, message) for each problem of a loss node that targets this source."""
        return []

    def mixture_member_problem(self, name: str) -> str | None:
        """Why source `name` of this kind cannot be part of a mixture, or None when it can."""
        return None

    def zero_mass_reason(self, name: str, source: Any, member_reasons: dict[str, str | None], spec) -> str | None:
        """Why the source's distribution is exactly zero on some tokens, or None; `member_reasons`
        holds the reasons of the sources it reads (computed first)."""
        return None

    def resolve(self, spec: LossGraphSpec, name: str, source: Any, inputs: list[tuple[float | None, Target]]) -> Target:
        """The plan's target of source `name`, from the (mixture weight, target) of each member."""
        raise NotImplementedError(self.name)

    def __repr__(self) -> str:
        return f"<source kind {self.name}>"
