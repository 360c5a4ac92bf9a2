"""cross_entropy: -sum_j p_j log q_j, against hard labels (the label's -log q) or a distribution."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...errors import quote
from ...kernels import names
from ...kernels.fragments import FIRST_READ, STREAMED, BucketForm, LinearGradient, LossFragments, Vectors
from ...spec.nodes import Name, TargetLoss
from ..class_weights import KWeighted
from ..loss import LossKind
from ..math import soft_cross_entropy
from ..sources.labels import KLabels


class CrossEntropyLoss(TargetLoss):
    """Cross-entropy against hard labels (ignore_index aware) or against a target distribution."""

    type: Literal["cross_entropy"] = Field(description="Loss kind.")
    class_weights: Name | None = Field(
        None,
        description=(
            "Per-class weights w [vocab] given at run time, `graph(..., class_weights={NAME: tensor})`, as "
            "torch's `F.cross_entropy(weight=w)` (Liger's `ce_weight`). Only against a `labels` source or a "
            "`label_smoothing` of it (ε): the term is −(1−ε) w_y log q_y − (ε/V) Σ_j w_j log q_j, and under "
            "`normalization: tokens` with `normalizer: positions` (the default) the sum over the term's "
            "positions is divided by Σ_i m_i w_{y_i}, the summed weights of their labels (m_i a float "
            "loss_mask's weight), as torch's mean; with `normalizer: targets`, by the head's target count "
            "(or `num_items`). Other terms (z_loss) are not weighted. The tensor: [vocab_size] floating, "
            "finite, ≥ 0, on the logits' device, with a sum > 0."
        ),
    )


class CrossEntropyFragments(LossFragments):
    name = "cross_entropy"
    streams_in_bits = True

    def formulas(self, term):
        if isinstance(term.target, KWeighted):
            return {
                "value": "l = -sum_j p~_j log q_j, p~_j = w_j p_j (class weights w, p the labels' distribution)",
                "gradient": "dl/ds_j = M q_j - p~_j, M = sum_j p~_j = (1 - eps) w_y + (eps / V) W",
            }
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
        if isinstance(term.target, KWeighted):
            return FIRST_READ if term.target.epsilon == 0.0 else STREAMED
        return FIRST_READ if isinstance(term.target, KLabels) else STREAMED

    def value_after_first_pass(self, k, t, term):
        s = term.slot
        if isinstance(term.target, KWeighted):  # w_y (lse - s_y)
            w_y = k.label_class_weight(term.target.vector)
            return f"{w_y} * (({names.student_max(s)} - {k.scaled_label_logit(s)}) + {names.student_log_sum(s)})"
        return f"({names.student_max(s)} - {k.scaled_label_logit(s)}) + {names.student_log_sum(s)}"

    def streamed_value(self, k, t, term):
        p = k.p(term.target, term.target_slot)
        # -p_j log2 q_j, in bits (streams_in_bits); 0 where p_j = 0 (and log q_j may be -inf)
        return f"{p} * tl.where({p} > 0, -{k.log2_q(term.slot)}, 0.0)"

    def gradient(self, k, t, term):
        q = k.q(term.slot)
        target = term.target
        if isinstance(target, KWeighted):
            # dl/ds_j = M q_j - p~_j = M q_j - (eps / V) w_j - (1 - eps) w_y [j = y]
            label = f"-{target.label_part(k)}"
            if target.epsilon == 0.0:
                return LinearGradient(((target.mass(k), q),), at_label=label)
            w = k.class_weight_tile(target.vector)
            return LinearGradient(((target.mass(k), q), (f"-{target.spread()}", w)), at_label=label)
        if isinstance(target, KLabels):
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
    log_q_tail, p_tail = names.tail_log_q(t), names.tail_p(t)
    return f'{q} * mass{t} - tl.where({log_q_tail} > float("-inf"), {p_tail} * fast_exp({log_q} - {log_q_tail}), 0.0)'


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
    note = (
        "`target` may be any source. `class_weights` weighs the classes of a `labels` or `label_smoothing` "
        "target, as torch's `F.cross_entropy(weight=...)` (see 'Class weights' in concepts.md)."
    )

    def details(self, loss):
        return [] if loss.class_weights is None else [f"class weights {loss.class_weights}"]

    def check_target(self, target, loss):
        problems = super().check_target(target, loss)
        if loss.class_weights is not None and not target.label_distribution:
            problems.append(
                (
                    "class_weights",
                    f"class_weights weigh the classes of the labels, but target {quote(target.name)} is not the "
                    "labels source or a label_smoothing of it; target the labels (or their label_smoothing), "
                    "or drop class_weights",
                )
            )
        return problems

    def divergence(self, log_p, log_q, term):
        return soft_cross_entropy(log_p, log_q)

    def reference(self, row, term):
        weights = row.class_weights
        if weights is not None:  # -sum_j w_j p_j log q_j (torch's F.cross_entropy(weight=w))
            if row.hard_labels:
                return -row.at_labels(weights[None, :].expand_as(row.log_q)) * row.at_labels(row.log_q)
            import torch

            p = row.log_p().exp() * weights
            return -torch.where(p > 0, p * row.log_q, 0.0).sum(-1)
        if row.hard_labels:
            return -row.at_labels(row.log_q)
        return self.divergence(row.log_p(), row.log_q, term)


KIND = CrossEntropy()
