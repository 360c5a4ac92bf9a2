"""reverse_kl: KL(q || p) = sum_j q_j (log q_j - log p_j), mode-seeking distillation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels import names
from ...kernels.fragments import CROSS_MOMENT, FIRST_READ, MOMENT, ROW_SUMS, BucketForm, LossFragments, Vectors
from ...spec.nodes import TargetLoss
from ..loss import LossKind
from ..math import relative_entropy


class ReverseKLLoss(TargetLoss):
    """KL(student || target): mode-seeking distillation; the target must give every token some mass."""

    type: Literal["reverse_kl"] = Field(description="Loss kind.")


class ReverseKLFragments(LossFragments):
    """Against one dense teacher u the value streams in pass 1 (a cross moment); against smoothed
    labels it follows from the student's entropy moment; against a mixture it needs a second read."""

    name = "reverse_kl"

    def formulas(self, term):
        value = "l = sum_j q_j (log q_j - log p_j)"
        if _single_teacher(term) is not None:
            value = "l = sum_j q_j (s_j - u_j) - lse(s) + lse(u) (u: the teacher's logits / T)"
        elif _smoothed(term):
            value = "l = sum_j q_j log q_j - sum_j q_j log p_j, where log p_j = log(eps/V) + [j = y] c"
        return {
            "value": value,
            "row sums": "rk = sum_j q_j (log q_j - log p_j)",
            "gradient": "dl/ds_j = q_j (log q_j - log p_j - l)",
            "vector": "l = sum_i q_i (log q_i - log p_i); dl/ds_i = q_i (log q_i - log p_i - l)",
            "bucket": "l = sum_b Q_b (log Q_b - log P_b); G'_b = log Q_b - log P_b - l",
        }

    def first_pass_statistics(self, term):
        if _single_teacher(term) is not None:
            return (CROSS_MOMENT,)
        if _smoothed(term):
            return (MOMENT,)
        return ()

    def value_stage(self, term):
        return FIRST_READ if _single_teacher(term) is not None or _smoothed(term) else ROW_SUMS

    def value_after_first_pass(self, k, t, term):
        s = term.slot
        log_sum, total = names.student_log_sum(s), names.student_sum(s)
        i = _single_teacher(term)
        if i is not None:
            u = term.target_slot
            return (
                f"{names.cross_moment(s, i, u)} / {total} - ({names.student_max(s)} - {names.teacher_max(i, u)}) "
                f"- {log_sum} + {names.teacher_log_sum(i, u)}"
            )
        eps, vocab = repr(term.target.label_smoothing()), names.VOCAB_FLOAT
        k.emit(
            f"q_label = fast_exp(({k.scaled_label_logit(s)} - {names.student_max(s)}) - {log_sum})",
            f"low = tl.log({eps} / {vocab})",
        )
        return (
            f"({names.moment(s)} / {total} - {log_sum}) - low - q_label * (tl.log(1.0 - {eps} + {eps} / {vocab}) - low)"
        )

    def row_sum_names(self, term):
        return ("rk",)

    def row_sums(self, k, t, term):
        s = term.slot
        q, log_q, log_p = k.q(s), k.log_q(s), k.log_p(term.target, term.target_slot)
        return (f"tl.where({q} > 0, {q} * ({log_q} - {log_p}), 0.0)",)

    def value_from_row_sums(self, k, t, term):
        return names.row_sum("rk", t)

    def gradient(self, k, t, term):
        s = term.slot
        q, log_q, log_p = k.q(s), k.log_q(s), k.log_p(term.target, term.target_slot)
        return f"tl.where({q} > 0, {q} * ({log_q} - {log_p} - {names.value(t)}), 0.0)"

    def vector(self, k, t, term, v: Vectors):
        k.emit(f"val = tl.sum(tl.where({v.q} > 0, {v.q} * ({v.log_q} - {v.log_p}), 0.0), 0)")
        return "val", f"tl.where({v.q} > 0, {v.q} * ({v.log_q} - {v.log_p} - val), 0.0)"

    def bucket(self, k, t, term, v: Vectors):
        value = (
            f"tl.sum(tl.where({v.q} > 0, {v.q} * ({v.log_q} - {v.log_p}), 0.0), 0) + "
            f"tl.where({v.q_tail} > 0, {v.q_tail} * ({v.log_q_tail} - {v.log_p_tail}), 0.0)"
        )
        loss = names.value(t)
        return BucketForm(
            value=value,
            stored=f"tl.where({v.q} > 0, {v.q} * ({v.log_q} - {v.log_p} - {loss}), 0.0)",
            tail_factor=f"{v.log_q_tail} - {v.log_p_tail} - {loss}",
        )


def _single_teacher(term) -> int | None:
    """The dense teacher the term's target is exactly (its value then streams in pass 1), else None."""
    return term.target.single_teacher()


def _smoothed(term) -> bool:
    """The target is smoothed labels (eps > 0; hard labels have no reverse KL): the value follows from
    the student's entropy moment."""
    epsilon = term.target.label_smoothing()
    return epsilon is not None and epsilon > 0.0


class ReverseKL(LossKind):
    name = "reverse_kl"
    model = ReverseKLLoss
    fragments = ReverseKLFragments()
    formula = ("ℓ = Σ_j q_j (log q_j − log p_j)",)
    example = "rkl: {type: reverse_kl, heads: [next], target: teacher, weight: 0.1}"
    checks = (
        "`target` may not be the `labels` source.",
        "The target must give every token some mass: hard labels, a teacher with `vocab_map: pad`, or a mixture "
        "whose weighted parts are all such, are errors. Use `forward_kl` or `jsd`, or smooth the labels.",
    )
    accepts_hard_labels = False
    needs_full_support = True

    def divergence(self, log_p, log_q, term):
        return relative_entropy(log_q, log_p)


KIND = ReverseKL()
