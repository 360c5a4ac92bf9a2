"""forward_kl: KL(p || q) = sum_j p_j (log p_j - log q_j), the usual distillation loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels.fragments import STREAMED, BucketForm, LinearGradient, LossFragments, Vectors
from ...spec.nodes import TargetLoss
from ..loss import LossKind
from ..math import relative_entropy
from .cross_entropy import keep_mass, mass_tail_gradient


class ForwardKLLoss(TargetLoss):
    """KL(target || student): the usual distillation loss (mean-seeking)."""

    type: Literal["forward_kl"] = Field(description="Loss kind.")


class ForwardKLFragments(LossFragments):
    name = "forward_kl"
    streams_in_bits = True

    def formulas(self, term):
        return {
            "value": "l = sum_j p_j (log p_j - log q_j)",
            "gradient": "dl/ds_j = q_j - p_j",
            "vector": "l = sum_i p_i (log p_i - log q_i); dl/ds_i = q_i - p_i",
            "bucket": "l = sum_b P_b (log P_b - log Q_b); q_i G'_i = Q_i sum_c P_c - P_i",
        }

    def value_stage(self, term):
        return STREAMED

    def streamed_value(self, k, t, term):
        s = term.slot
        p, log2_p = k.p(term.target, term.target_slot), k.log2_p(term.target, term.target_slot)
        # p_j (log2 p_j - log2 q_j), one FMA into the sum; 0 where p_j = 0 (and log p_j may be -inf)
        return f"{p} * tl.where({p} > 0, {log2_p} - {k.log2_q(s)}, 0.0)"

    def gradient(self, k, t, term):
        return LinearGradient((("1.0", k.q(term.slot)), ("-1.0", k.p(term.target, term.target_slot))))

    def vector(self, k, t, term, v: Vectors):
        k.emit(f"val = tl.sum(tl.where({v.p} > 0, {v.p} * ({v.log_p} - {v.log_q}), 0.0), 0)")
        return "val", f"{v.q} - {v.p}"

    def bucket(self, k, t, term, v: Vectors):
        keep_mass(k, v)
        value = (
            f"tl.sum(tl.where({v.p} > 0, {v.p} * ({v.log_p} - {v.log_q}), 0.0), 0) + "
            f"tl.where({v.p_tail} > 0, {v.p_tail} * ({v.log_p_tail} - {v.log_q_tail}), 0.0)"
        )
        return BucketForm(value=value, stored=f"{v.q} * mass - {v.p}")

    def bucket_tail_gradient(self, k, t, term, q, log_q):
        return mass_tail_gradient(q, log_q)


class ForwardKL(LossKind):
    name = "forward_kl"
    model = ForwardKLLoss
    fragments = ForwardKLFragments()
    formula = ("ℓ = Σ_j p_j (log p_j − log q_j)",)
    example = (
        "distill: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, "
        "temperature_scaling: true, weight: 0.5}"
    )
    checks = ("`target` may not be the `labels` source: use `cross_entropy`, or a `label_smoothing` source.",)
    accepts_hard_labels = False
    hard_labels_fix = "use cross_entropy (forward KL against one-hot labels is cross-entropy)"

    def divergence(self, log_p, log_q, term):
        return relative_entropy(log_p, log_q)


KIND = ForwardKL()
