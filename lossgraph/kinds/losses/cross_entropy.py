"""cross_entropy: -sum_j p_j log q_j, against hard labels (the label's -log q) or a distribution."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels import names
from ...kernels.fragments import FIRST_READ, STREAMED, BucketForm, LinearGradient, LossFragments, Vectors
from ...spec.nodes import TargetLoss
from ..loss import LossKind
from ..math import soft_cross_entropy
from ..sources.labels import KLabels


class CrossEntropyLoss(TargetLoss):
    """Cross-entropy against hard labels (ignore_index aware) or against a target distribution."""

    type: Literal["cross_entropy"] = Field(description="Loss kind.")


class CrossEntropyFragments(LossFragments):
    name = "cross_entropy"
    streams_in_bits = True

    def formulas(self, term):
        if isinstance(term.target, KLabels):
            return {"value": "l = lse(s) - s_y", "gradient": "dl/ds_j = q_j - [j = y]"}
        return {
            "value": "l = -sum_j p_j log q_j",
            "gradient": "dl/ds_j = q_j - p_j",
            "vector": "l = -sum_i p_i log q_i; dl/ds_i = q_i - p_i",
            "bucket": "l = -sum_b P_b log Q_b; q_i G'_i = Q_i sum_c P_c - P_i (sum_c P_c is 1 unless the "
            "stored tokens cover the vocab with less mass)",
        }

    def value_stage(self, term):
        return FIRST_READ if isinstance(term.target, KLabels) else STREAMED

    def value_after_first_pass(self, k, t, term):
        s = term.slot
        return f"({names.student_max(s)} - {k.scaled_label_logit(s)}) + {names.student_log_sum(s)}"

    def streamed_value(self, k, t, term):
        p = k.p(term.target, term.target_slot)
        # -p_j log2 q_j, in bits (streams_in_bits); 0 where p_j = 0 (and log q_j may be -inf)
        return f"{p} * tl.where({p} > 0, -{k.log2_q(term.slot)}, 0.0)"

    def gradient(self, k, t, term):
        q = k.q(term.slot)
        if isinstance(term.target, KLabels):
            return LinearGradient((("1.0", q),), at_label="-1.0")
        return LinearGradient((("1.0", q), ("-1.0", k.p(term.target, term.target_slot))))

    def vector(self, k, t, term, v: Vectors):
        k.emit(f"val{t} = tl.sum(tl.where({v.p} > 0, -{v.p} * {v.log_q}, 0.0), 0)")
        return f"val{t}", f"{v.q} - {v.p}"

    def bucket(self, k, t, term, v: Vectors):
        k.emit(
            f"mass{t} = tl.sum({v.p}, 0) + {v.p_tail}",
        )
        value = (
            f"tl.sum(tl.where({v.p} > 0, -{v.p} * {v.log_q}, 0.0), 0) + "
            f"tl.where({v.p_tail} > 0, -{v.p_tail} * {v.log_q_tail}, 0.0)"
        )
        return BucketForm(value=value, stored=f"{v.q} * mass{t} - {v.p}")

    def bucket_tail_gradient(self, k, t, term, q, log_q):
        return mass_tail_gradient(t, q, log_q)


def mass_tail_gradient(t: int, q: str, log_q: str) -> str:
    """q_j G'_tail = q_j (sum_c P_c - P_tail / Q_tail) for cross-entropy and forward KL, written as
    q_j sum_c P_c - P_tail exp(log q_j - log Q_tail): the ratio is at most 1 for an unstored token,
    where P_tail / Q_tail alone could overflow, and it stays exact where q_j itself underflows."""
    return f'{q} * mass{t} - tl.where(lQt{t} > float("-inf"), Pt{t} * fast_exp({log_q} - lQt{t}), 0.0)'


class CrossEntropy(LossKind):
    name = "cross_entropy"
    model = CrossEntropyLoss
    fragments = CrossEntropyFragments()
    formula = (
        "hard labels (a `labels` source, or a `label_smoothing` source with ε): "
        "ℓ = −(1−ε) log q[y] − (ε/V) Σ_j log q[j] (ε = 0 for plain labels)",
        "a distribution target (teacher, mixture): ℓ = −Σ_j p_j log q_j",
    )
    example = "lm: {type: cross_entropy, heads: [next, mtp2], head_weights: [1.0, 0.5], target: labels}"
    note = "`target` may be any source."

    def divergence(self, log_p, log_q, term):
        return soft_cross_entropy(log_p, log_q)

    def reference(self, row, term):
        if row.hard_labels:
            return -row.at_labels(row.log_q)
        return self.divergence(row.log_p(), row.log_q, term)


KIND = CrossEntropy()
