"""What one fused launch computes, in plain hashable data: the key of a generated kernel.

lossgraph's planner translates the terms of a head into a `KernelSpec`; the code generator turns a
`KernelSpec` into Triton source. Keeping this neutral (no lossgraph imports) keeps the kernels
package usable and testable on its own.

Temperatures and weights are run-time arguments (they follow schedules); what is baked into the
source is the structure: which terms, which targets, which terms share a temperature ("slot"),
label-smoothing epsilons, mixture weights and JSD betas (constants of the spec), and which terms
take part in the gradient (a weight of 0 at this step leaves a term out of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

KINDS = ("cross_entropy", "z_loss", "forward_kl", "reverse_kl", "jsd", "tvd", "entropy")


@dataclass(frozen=True)
class KLabels:
    """One-hot of the row's label."""


@dataclass(frozen=True)
class KSmoothed:
    """(1 - epsilon) one-hot + epsilon / V."""

    epsilon: float


@dataclass(frozen=True)
class KDense:
    """Softmax of dense teacher `teacher` (an index into KernelSpec.dense) at the term's temperature."""

    teacher: int


@dataclass(frozen=True)
class KMixture:
    """Sum of weight x part."""

    parts: tuple[tuple[float, KTarget], ...]


@dataclass(frozen=True)
class KTopK:
    """Top-k teacher `source` (an index into KernelSpec.topk) with its tail mode."""

    source: int
    tail: str  # "renormalize" | "bucket"


KTarget = Union[KLabels, KSmoothed, KDense, KMixture, KTopK]


@dataclass(frozen=True)
class KernelTerm:
    kind: str
    target: KTarget | None
    slot: int  # temperature slot; terms with equal temperatures share one student softmax
    beta: float = 0.5
    active: bool = True  # takes part in the gradient (its weight is not 0 at this step)


@dataclass(frozen=True)
class DenseTeacher:
    mapping: str  # "same" | "truncate" (teacher vocab larger) | "pad" (teacher vocab smaller)


@dataclass(frozen=True)
class KernelSpec:
    terms: tuple[KernelTerm, ...]
    slot_is_one: tuple[bool, ...]  # per temperature slot: the temperature is the constant 1
    dense: tuple[DenseTeacher, ...] = ()
    topk: tuple[int, ...] = ()  # k of each top-k teacher
    accumulate: bool = False  # add to the gradient buffer (a later launch of a split head)
    gradient: bool = True  # write dl/dz; False (under torch.no_grad) writes nothing N x V

    @property
    def tile_streams(self) -> int:
        """How many N x V streams a tile holds in registers: the student, each dense teacher, and two
        for each top-k source with a bucket term (the histogram of its stored ids in the tile)."""
        buckets = {t.target.source for t in self.terms if isinstance(t.target, KTopK) and t.target.tail == "bucket"}
        return 1 + len(self.dense) + 2 * len(buckets)

    @property
    def uses_labels(self) -> bool:
        return any(_reads_labels(term.target) for term in self.terms)

    def key(self) -> str:
        """A stable text key (the generated module's cache name hashes it)."""
        return repr(self)


def _reads_labels(target: KTarget | None) -> bool:
    if isinstance(target, (KLabels, KSmoothed)):
        return True
    if isinstance(target, KMixture):
        return any(_reads_labels(part) for _, part in target.parts)
    return False


def needs_reduction_pass(term: KernelTerm) -> bool:
    """True when the term's gradient needs a row sum that only a second read of the row gives.

    jsd and tvd need sum_k q_k dl/dq_k, which involves p and q at once; reverse_kl needs its own value,
    which streams in the first pass only against a single dense teacher or smoothed labels.
    """
    if isinstance(term.target, KTopK):
        return False
    if term.kind in ("jsd", "tvd"):
        return True
    return term.kind == "reverse_kl" and not isinstance(term.target, (KDense, KSmoothed))
