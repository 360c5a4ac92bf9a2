"""kl_estimate: KL(student || reference) estimated from the sampled token, as TRL's GRPO penalty (k3).

Per token, with lq = log softmax(z / T)_y the student's log-prob of the sampled token y (the label) and
ref the reference model's (from the rollout), d = ref - lq:
- k1: l = -d;         dl/dlq = 1
- k2: l = d^2 / 2;    dl/dlq = -d
- k3: l = e^d - d - 1 (TRL's); dl/dlq = 1 - e^d
A function of lq alone: dl/ds_j = g (onehot_j - q_j), known after the first read. For the exact KL to
the reference model, give its logits as a `teacher` source and use `reverse_kl` (docs/rl.md).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ...kernels.fragments import FIRST_READ, LossFragments
from ..loss import LossKind, constant
from .policy_gradient import (
    RolloutLoss,
    check_rollout_fields,
    check_rollout_target,
    logprob_gradient,
    rollout_aggregation,
    rollout_details,
    student_logprob,
)

ESTIMATORS = ("k1", "k2", "k3")


class KLEstimateLoss(RolloutLoss):
    """KL(student || reference) estimated per sampled token from the rollout's reference log-probs (k1, k2, k3)."""

    #: the rollout must carry the reference model's log-probs
    needs_reference_logprobs: ClassVar[bool] = True

    type: Literal["kl_estimate"] = Field(description="Loss kind.")
    estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description=(
            "With d = ref − log q of the sampled token: `k1` −d, `k2` d²/2, `k3` eᵈ − d − 1 (TRL's GRPO penalty, "
            "the default; unbiased and ≥ 0)."
        ),
    )


class KLEstimateFragments(LossFragments):
    name = "kl_estimate"

    def formulas(self, term):
        value = {
            "k1": "l = -d, d = ref - lq",
            "k2": "l = d^2 / 2, d = ref - lq",
            "k3": "l = exp(d) - d - 1, d = ref - lq",
        }[_estimator(term)]
        gradient = {"k1": "g = 1", "k2": "g = -d", "k3": "g = 1 - exp(d)"}[_estimator(term)]
        return {"value": value, "gradient": f"dl/ds_j = g (onehot_j - q_j), {gradient}"}

    def value_stage(self, term):
        return FIRST_READ

    def value_after_first_pass(self, k, t, term):
        logprob = student_logprob(k, term)
        k.emit(f"d = {term.target.ref_logprob(k)} - {logprob}")
        estimator = _estimator(term)
        if estimator == "k1":
            k.emit("g = 1.0")
            return "-d"
        if estimator == "k2":
            k.emit("g = -d")
            return "0.5 * d * d"
        k.emit("ref_ratio = tl.exp(d)", "g = 1.0 - ref_ratio")
        return "ref_ratio - d - 1.0"

    def gradient(self, k, t, term):
        return logprob_gradient(k, term)


def _estimator(term) -> str:
    return ESTIMATORS[int(constant(term, "estimator"))]


class KLEstimate(LossKind):
    name = "kl_estimate"
    model = KLEstimateLoss
    fragments = KLEstimateFragments()
    formula = (
        "d = ref[y] − log q[y] (y the sampled token, ref from the rollout)",
        "k1: ℓ = −d; k2: ℓ = d²/2; k3: ℓ = eᵈ − d − 1",
    )
    example = "kl: {type: kl_estimate, heads: [next], target: rollouts, weight: 0.04, estimator: k3}"
    checks = (
        "The target is a `rollout` source that declares `ref_logprobs: true`.",
        "`aggregation` as `policy_gradient`'s: give both nodes the same one to reproduce TRL's loss.",
    )
    note = (
        "TRL's GRPO adds β · k3 per token to the policy loss: a `kl_estimate` node of weight β. For the exact KL "
        "to the reference model, give its logits as a `teacher` and use `reverse_kl` (see [rl.md](rl.md))."
    )

    def constants(self, loss):
        return (("estimator", float(ESTIMATORS.index(loss.estimator))),)

    def aggregation(self, loss):
        return rollout_aggregation(loss)

    def details(self, loss):
        return [f"estimator {loss.estimator}", *rollout_details(loss)]

    def check_fields(self, loss):
        return check_rollout_fields(loss)

    def check_target(self, target, loss):
        return check_rollout_target(self.name, target)

    def reference(self, row, term):
        import torch

        _, _, ref = row.term.target.rows(row.batch, row.log_q.dtype)
        d = ref - row.at_labels(row.log_q)
        estimator = _estimator(term)
        if estimator == "k1":
            return -d
        if estimator == "k2":
            return 0.5 * d * d
        return torch.exp(d) - d - 1.0


KIND = KLEstimate()
