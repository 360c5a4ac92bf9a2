"""tvd: the total variation distance 1/2 sum_j |p_j - q_j|."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels import names
from ...kernels.fragments import ROW_SUMS, BucketForm, LossFragments, Vectors
from ...spec.nodes import TargetLoss
from ..loss import LossKind


class TVDLoss(TargetLoss):
    """Total variation distance: half the L1 distance between target and student distributions."""

    type: Literal["tvd"] = Field(description="Loss kind.")


class TVDFragments(LossFragments):
    """The gradient needs c = sum_k q_k sign(q_k - p_k) / 2, a row sum over p and q: a second read."""

    name = "tvd"

    def formulas(self, term):
        return {
            "row sums": "tv = 1/2 sum_j |p_j - q_j|, tc = 1/2 sum_j q_j sign(q_j - p_j)",
            "gradient": "dl/ds_j = q_j (sign(q_j - p_j) / 2 - tc)",
            "vector": "l = 1/2 sum_i |p_i - q_i|; dl/ds_i = q_i (sign(q_i - p_i) / 2 - c)",
            "bucket": "G'_b = sign(Q_b - P_b) / 2 - c, c = sum_b Q_b sign(Q_b - P_b) / 2",
        }

    def value_stage(self, term):
        return ROW_SUMS

    def row_sum_names(self, term):
        return ("tv", "tc")

    def row_sums(self, k, t, term):
        q, p = k.q(term.slot), k.p(term.target, term.target_slot)
        return (f"0.5 * tl.abs({p} - {q})", f"0.5 * {q} * sign_of_difference({q}, {p})")

    def value_from_row_sums(self, k, t, term):
        return names.row_sum("tv", t)

    def gradient(self, k, t, term):
        q, p = k.q(term.slot), k.p(term.target, term.target_slot)
        return f"{q} * (0.5 * sign_of_difference({q}, {p}) - {names.row_sum('tc', t)})"

    def vector(self, k, t, term, v: Vectors):
        k.emit(
            f"sg = sign_of_difference({v.q}, {v.p})",
            f"val = 0.5 * tl.sum(tl.abs({v.p} - {v.q}), 0)",
            f"c = 0.5 * tl.sum({v.q} * sg, 0)",
        )
        return "val", f"{v.q} * (0.5 * sg - c)"

    def bucket(self, k, t, term, v: Vectors):
        k.emit(
            f"sg = sign_of_difference({v.q}, {v.p})",
            f"sg_tail = sign_of_difference({v.q_tail}, {v.p_tail})",
            f"c = 0.5 * (tl.sum({v.q} * sg, 0) + {v.q_tail} * sg_tail)",
        )
        return BucketForm(
            value=f"0.5 * (tl.sum(tl.abs({v.p} - {v.q}), 0) + tl.abs({v.p_tail} - {v.q_tail}))",
            stored=f"tl.where({v.q} > 0, {v.q} * (0.5 * sg - c), 0.0)",
            tail_factor="0.5 * sg_tail - c",
        )


class TVD(LossKind):
    name = "tvd"
    model = TVDLoss
    fragments = TVDFragments()
    formula = ("ℓ = ½ Σ_j |p_j − q_j|",)
    example = "tvd: {type: tvd, heads: [next], target: cached, weight: 0.1}"
    checks = ("`target` may not be the `labels` source.",)
    accepts_hard_labels = False

    def divergence(self, log_p, log_q, term):
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


KIND = TVD()
