"""entropy: -sum_j q_j log q_j of the student; a negative weight rewards spread-out predictions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels import names
from ...kernels.fragments import FIRST_READ, MOMENT, LossFragments
from ...spec.nodes import TemperedLoss
from ..loss import LossKind


class EntropyLoss(TemperedLoss):
    """Entropy of the student distribution; a negative weight rewards spread-out predictions."""

    type: Literal["entropy"] = Field(description="Loss kind.")

    allows_negative_weight = True  # a negative weight rewards spread-out predictions (spec.nodes.LossNode)


class EntropyFragments(LossFragments):
    name = "entropy"

    def formulas(self, term):
        return {
            "value": "H = log S - sum_j exp(s_j - m) (s_j - m) / S (S, m: the slot's sum-exp and max)",
            "gradient": "dH/ds_j = -q_j (log q_j + H)",
        }

    def first_pass_statistics(self, term):
        return (MOMENT,)

    def value_stage(self, term):
        return FIRST_READ

    def value_after_first_pass(self, k, t, term):
        s = term.slot
        return f"{names.student_log_sum(s)} - {names.moment(s)} / {names.student_sum(s)}"

    def gradient(self, k, t, term):
        q, log_q = k.q(term.slot), k.log_q(term.slot)
        return f"tl.where({q} > 0, -{q} * ({log_q} + {names.value(t)}), 0.0)"


class Entropy(LossKind):
    name = "entropy"
    model = EntropyLoss
    fragments = EntropyFragments()
    formula = ("ℓ = −Σ_j q_j log q_j",)
    example = "entropy: {type: entropy, heads: [next], weight: -0.01}"
    note = "No `target`. This is the only loss whose `weight` may be negative."

    def reference(self, row, term):
        import torch

        q = row.log_q.exp()
        return -(q * torch.where(q > 0, row.log_q, 0.0)).sum(-1)


KIND = Entropy()
