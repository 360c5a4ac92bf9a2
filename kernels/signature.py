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

from .fragments import KernelTerm, KTarget, KTopK, TargetFragments


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
    softcap: float | None = None  # the terms see softcap * tanh(z / softcap); dz'/dz is applied to dl/dz'
    # Row scales per term group: with more than 1, row_scale is [N, row_groups] and term t reads column
    # term_groups[t] (its own positions and normalizer); a row is skipped only where every column is 0.
    row_groups: int = 1
    term_groups: tuple[int, ...] = ()
    # the terms' row diagnostics (`LossFragments.diagnostic_names`) and the statistics they need; off: none
    row_diagnostics: bool = True

    @property
    def grouped(self) -> bool:
        """The terms take row scales of their own (row_scale is [N, row_groups])."""
        return self.row_groups > 1

    def group_of(self, t: int) -> int:
        """The row-scale column of term t."""
        return self.term_groups[t] if self.grouped else 0

    logits_scale: float | None = None  # the terms see a * z (capped after, if softcap); a is folded into the gradient

    @property
    def tile_streams(self) -> int:
        """How many N x V streams a tile holds in registers: the student, each dense teacher, and two
        for each top-k source with a bucket term (the histogram of its stored ids in the tile)."""
        buckets = {t.target.source for t in self.terms if isinstance(t.target, KTopK) and t.target.tail == "bucket"}
        return 1 + len(self.dense) + 2 * len(buckets)

    @property
    def class_weight_vectors(self) -> tuple[int, ...]:
        """The class-weight vectors the terms read (`cw{c}_ptr` and `cw_sum{c}_ptr`; none by default)."""
        return tuple(
            sorted(
                {
                    c
                    for term in self.terms
                    if isinstance(term.target, TargetFragments)
                    for c in term.target.class_weight_vectors()
                }
            )
        )

    @property
    def target_arguments(self) -> tuple[str, ...]:
        """The kernel arguments the terms' targets read besides the dense and top-k teachers' (a plugin
        form's own tensors), each once."""
        return tuple(
            dict.fromkeys(
                name
                for term in self.terms
                if isinstance(term.target, TargetFragments)
                for name in term.target.kernel_arguments()
            )
        )

    @property
    def row_inputs(self) -> tuple[tuple[int, str], ...]:
        """(term, name) of every per-row input computed across rows (`LossFragments.row_inputs`)."""
        return tuple((t, name) for t, term in enumerate(self.terms) for name in term.loss.row_inputs(term))

    @property
    def phased(self) -> bool:
        """The launch runs stats, then (on the device) the row inputs, then apply, even on one rank."""
        return bool(self.row_inputs)

    @property
    def diagnostics(self) -> tuple[tuple[int, str], ...]:
        """(term, name) of each row diagnostic the terms declare (`LossFragments.diagnostic_names`), in the
        order the kernel writes them: after the row's loss in the values buffer; none without `row_diagnostics`."""
        if not self.row_diagnostics:
            return ()
        return tuple((t, name) for t, term in enumerate(self.terms) for name in term.loss.diagnostic_names(term))

    @property
    def value_columns(self) -> int:
        """Columns of the values buffer: each term's value, the row's loss, then the row diagnostics."""
        return len(self.terms) + 1 + len(self.diagnostics)

    @property
    def uses_labels(self) -> bool:
        return any(_reads_labels(term.target) for term in self.terms)

    def key(self) -> str:
        """A stable text key (the generated module's cache name hashes it)."""
        return repr(self)

    def describe(self) -> list[str]:
        """The spec in readable lines (the generated kernel's header)."""
        lines = [f"term {t}: {term.describe()}" for t, term in enumerate(self.terms)]
        lines.append("temperature slots: " + ", ".join("1" if one else "run-time" for one in self.slot_is_one))
        lines += [f"dense teacher {i}: vocab {teacher.mapping}" for i, teacher in enumerate(self.dense)]
        lines += [f"top-k teacher {i}: k = {k}" for i, k in enumerate(self.topk)]
        if self.accumulate:
            lines.append("adds to the gradient of an earlier launch")
        if not self.gradient:
            lines.append("values only (no gradient)")
        if self.logits_scale is not None:
            before = " before the cap" if self.softcap is not None else ""
            lines.append(f"logits scaled by {self.logits_scale!r}{before}")
        if self.softcap is not None:
            lines.append(f"logits soft-capped at {self.softcap!r}")
        if not self.row_diagnostics:
            lines.append("no row diagnostics")
        if self.grouped:
            columns = ", ".join(f"term {t}: {g}" for t, g in enumerate(self.term_groups))
            lines.append(f"row scales: {self.row_groups} columns (a term's positions / normalizer); {columns}")
        return lines


def _reads_labels(target: KTarget | None) -> bool:
    return isinstance(target, TargetFragments) and target.reads_labels


def dense_teachers(target: KTarget | None) -> tuple[int, ...]:
    """The dense teachers a target reads (with repeats, in order)."""
    return target.dense_teachers() if isinstance(target, TargetFragments) else ()
