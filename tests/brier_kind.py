"""A loss kind that exists only in the test suite: the Brier score sum_j (q_j - p_j)^2.

It is here to show that a new loss is one module: its model, its target rules (the defaults), its
reference math, its kernel fragments and its docs, registered with `register_loss_kind` by the tests
(tests/test_kind_plugin.py) and then used through validate, plan, the reference and the fused kernels.
It takes every kernel form a kind can have: row sums of a second read, a vector on top-k tokens and
buckets with a tail.

Math: l = sum_j (q_j - p_j)^2. With dq_k/ds_j = q_k ([k = j] - q_j),
dl/ds_j = 2 q_j ((q_j - p_j) - c), c = sum_k q_k (q_k - p_k): a row sum over p and q, so the value
and c are summed by a second read before the gradient's read. On buckets (T = 1) the same holds with
G'_b = 2 (Q_b - P_b) - 2 c.
"""

from __future__ import annotations

from typing import Literal

from lossgraph.kernels import names
from lossgraph.kernels.fragments import ROW_SUMS, BucketForm, LossFragments, Vectors
from pydantic import Field

from lossgraph.kinds import LossKind
from lossgraph.spec.nodes import TargetLoss


class BrierLoss(TargetLoss):
    """Brier score: the squared L2 distance between the student's and the target's distributions."""

    type: Literal["brier"] = Field(description="Loss kind.")


class BrierFragments(LossFragments):
    name = "brier"

    def formulas(self, term):
        return {
            "row sums": "bs = sum_j (q_j - p_j)^2, bc = sum_j q_j (q_j - p_j)",
            "gradient": "dl/ds_j = 2 q_j (q_j - p_j - bc)",
            "vector": "l = sum_i (q_i - p_i)^2; dl/ds_i = 2 q_i (q_i - p_i - c)",
            "bucket": "G'_b = 2 (Q_b - P_b) - 2 sum_c Q_c (Q_c - P_c)",
        }

    def value_stage(self, term):
        return ROW_SUMS

    def row_sum_names(self, term):
        return ("bs", "bc")

    def row_sums(self, k, t, term):
        q, p = k.q(term.slot), k.p(term.target, term.slot)
        return (f"({q} - {p}) * ({q} - {p})", f"{q} * ({q} - {p})")

    def value_from_row_sums(self, k, t, term):
        return names.row_sum("bs", t)

    def gradient(self, k, t, term):
        q, p = k.q(term.slot), k.p(term.target, term.slot)
        return f"2.0 * {q} * ({q} - {p} - {names.row_sum('bc', t)})"

    def vector(self, k, t, term, v: Vectors):
        k.emit(
            f"val = tl.sum(({v.q} - {v.p}) * ({v.q} - {v.p}), 0)",
            f"c = tl.sum({v.q} * ({v.q} - {v.p}), 0)",
        )
        return "val", f"2.0 * {v.q} * ({v.q} - {v.p} - c)"

    def bucket(self, k, t, term, v: Vectors):
        k.emit(f"c = tl.sum({v.q} * ({v.q} - {v.p}), 0) + {v.q_tail} * ({v.q_tail} - {v.p_tail})")
        return BucketForm(
            value=(
                f"tl.sum(({v.q} - {v.p}) * ({v.q} - {v.p}), 0) + ({v.q_tail} - {v.p_tail}) * ({v.q_tail} - {v.p_tail})"
            ),
            stored=f"{v.q} * 2.0 * ({v.q} - {v.p} - c)",
            tail_factor=f"2.0 * ({v.q_tail} - {v.p_tail} - c)",
        )


class Brier(LossKind):
    name = "brier"
    model = BrierLoss
    fragments = BrierFragments()
    formula = ("ℓ = Σ_j (q_j − p_j)²",)
    example = "brier: {type: brier, heads: [next], target: teacher, weight: 0.5}"
    checks = ("`target` may not be the `labels` source.",)
    accepts_hard_labels = False

    def divergence(self, log_p, log_q, term):
        return ((log_q.exp() - log_p.exp()) ** 2).sum(-1)


KIND = Brier()
