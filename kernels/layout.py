"""The layout of a fused kernel, derived from its `KernelSpec` without writing any source: which
softmax states and row statistics pass 1 keeps, which terms need a second read for row sums, which
reads of the row stream which dense teachers. The planner reads it for its byte estimates and notes;
the generator writes the kernel from it. Pure Python, like the spec it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import names
from .fragments import CROSS_MOMENT, MOMENT, ROW_SUMS, STREAMED
from .signature import KernelSpec, KTopK, dense_teachers


@dataclass(frozen=True)
class KernelLayout:
    student_slots: tuple[int, ...]  # slots with a student softmax state over the whole row
    teacher_states: tuple[tuple[int, int], ...]  # (dense teacher, slot) softmax states
    moment_slots: tuple[int, ...]  # slots whose centered moment pass 1 keeps (fragments.MOMENT)
    cross_moments: tuple[tuple[int, int, int], ...]  # (slot, dense teacher, its slot) cross moments (CROSS_MOMENT)
    tail_sources: tuple[int, ...]  # top-k sources with a bucket term: pass 1 keeps their tail's state
    topk_sources: tuple[int, ...]  # top-k sources some term reads
    topk_terms: tuple[int, ...]  # terms on a top-k target
    reduction_terms: tuple[int, ...]  # terms whose value needs row sums from a second read
    streamed_terms: tuple[int, ...]  # terms whose value the last read sums over the columns
    pass_reads: tuple[frozenset[int], ...]  # per read of the row: the dense teachers it streams

    @property
    def passes(self) -> int:
        """Reads of the logits row: 2, or 3 when a term needs row sums before its gradient."""
        return len(self.pass_reads)


def effective(spec: KernelSpec) -> KernelSpec:
    """The spec as generated: without a gradient, no term takes part in one."""
    if spec.gradient:
        return spec
    return replace(spec, terms=tuple(replace(term, active=False) for term in spec.terms))


def first_pass_statistics(spec: KernelSpec, term) -> tuple[str, ...]:
    """The statistics pass 1 keeps for a term: its value's, and its row diagnostics' where the spec has them."""
    own = term.loss.first_pass_statistics(term)
    if spec.row_diagnostics and term.loss.diagnostic_names(term):
        return own + term.loss.diagnostic_statistics(term)
    return own


def kernel_layout(spec: KernelSpec) -> KernelLayout:
    spec = effective(spec)
    terms = spec.terms
    dense_terms = [(t, term) for t, term in enumerate(terms) if not isinstance(term.target, KTopK)]
    stage = {t: term.loss.value_stage(term) for t, term in dense_terms}
    statistics = {t: first_pass_statistics(spec, term) for t, term in dense_terms}
    for t, term in dense_terms:
        if CROSS_MOMENT in statistics[t] and term.target.single_teacher() is None:
            raise ValueError(f"{term.loss.name}: a cross moment needs a single dense teacher as target")
    buckets = [term for term in terms if isinstance(term.target, KTopK) and term.target.tail == "bucket"]
    reduction_terms = tuple(t for t, _ in dense_terms if stage[t] == ROW_SUMS)
    streamed_terms = tuple(t for t, _ in dense_terms if stage[t] == STREAMED)

    def teachers_of(indices) -> frozenset[int]:
        return frozenset(i for t in indices for i in dense_teachers(terms[t].target))

    # pass 1 reads every dense teacher (its softmax states and argmax); the last read streams the
    # teachers of every term that writes a gradient or streams its value on a dense target
    last_read = [t for t, term in dense_terms if term.active or t in streamed_terms]
    reads = [frozenset(range(len(spec.dense)))]
    if reduction_terms:
        reads.append(teachers_of(reduction_terms))
    if spec.gradient or streamed_terms:
        reads.append(teachers_of(last_read))
    return KernelLayout(
        student_slots=tuple(
            sorted({t.slot for t in terms if not (isinstance(t.target, KTopK) and t.target.tail == "renormalize")})
        ),
        teacher_states=tuple(sorted({(i, term.target_slot) for term in terms for i in dense_teachers(term.target)})),
        moment_slots=tuple(sorted({terms[t].slot for t, _ in dense_terms if MOMENT in statistics[t]})),
        cross_moments=tuple(
            sorted(
                {
                    (terms[t].slot, terms[t].target.single_teacher(), terms[t].target_slot)
                    for t, _ in dense_terms
                    if CROSS_MOMENT in statistics[t]
                }
            )
        ),
        tail_sources=tuple(sorted({term.target.source for term in buckets})),
        topk_sources=tuple(sorted({term.target.source for term in terms if isinstance(term.target, KTopK)})),
        topk_terms=tuple(t for t, term in enumerate(terms) if isinstance(term.target, KTopK)),
        reduction_terms=reduction_terms,
        streamed_terms=streamed_terms,
        pass_reads=tuple(reads),
    )


# --------------------------------------------------------------------------------------------------
# What crosses ranks under vocab parallel: the layout of the statistics buffers.
# --------------------------------------------------------------------------------------------------


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def float_statistics(spec: KernelSpec, layout: KernelLayout) -> list[tuple[str, str, tuple]]:
    """(variable, how ranks combine it, the softmax state it belongs to) for each float statistic.

    max: all-reduce max; sum_exp: the state's sum of exp(x - max), rescaled to the global max and
    summed; scaled: another sum taken against the state's local max, combined the same way;
    moment: the centered moment (re-centered on the global max, summed); sum: summed as is (the
    label's logit, written by the rank holding it); argmax: the max of a running argmax (its index
    is in the int buffer, same order).
    """
    entries: list[tuple[str, str, tuple]] = []
    for s in layout.student_slots:
        entries += [(names.student_max(s), "max", ("s", s)), (names.student_sum(s), "sum_exp", ("s", s))]
    entries += [(names.moment(s), "moment", ("s", s)) for s in layout.moment_slots]
    for i in layout.tail_sources:
        entries += [(names.tail_max(i), "max", ("tail", i)), (names.tail_sum(i), "sum_exp", ("tail", i))]
    entries += [(names.cross_moment(s, i, u), "scaled", ("s", s)) for s, i, u in layout.cross_moments]
    for i, s in layout.teacher_states:
        entries += [(names.teacher_max(i, s), "max", ("t", i, s)), (names.teacher_sum(i, s), "sum_exp", ("t", i, s))]
    entries += [(names.best_value(teacher), "argmax", ()) for teacher in [None, *range(len(spec.dense))]]
    if spec.uses_labels:
        entries.append((names.LABEL_LOGIT, "sum", ()))
    return entries


def int_statistics(spec: KernelSpec) -> list[str]:
    """The argmax indices (global ids) of the student and each dense teacher, in the int buffer."""
    return [names.best_index(teacher) for teacher in [None, *range(len(spec.dense))]]


def reduction_statistics(spec: KernelSpec, layout: KernelLayout) -> list[str]:
    """The row sums pass 2 takes (summed across ranks under vocab parallel)."""
    return [
        names.row_sum(name, t)
        for t in layout.reduction_terms
        for name in spec.terms[t].loss.row_sum_names(spec.terms[t])
    ]


def topk_width(spec: KernelSpec, i: int) -> int:
    """The width of top-k source i's vectors: k rounded up to a power of two."""
    return next_power_of_two(spec.topk[i])
