"""z_loss: (logsumexp z)^2 on the raw logits, which keeps the softmax normalizer near 1 (PaLM)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels import names
from ...kernels.fragments import FIRST_READ, LinearGradient, LossFragments
from ...spec.nodes import LossNode
from ..loss import LossKind


class ZLoss(LossNode):
    """(logsumexp of the logits)^2: keeps the softmax normalizer near 1 (PaLM's z-loss)."""

    type: Literal["z_loss"] = Field(description="Loss kind.")


class ZLossFragments(LossFragments):
    name = "z_loss"
    fixed_temperature_one = True

    def formulas(self, term):
        return {"value": "l = lse(z)^2", "gradient": "dl/dz_j = 2 lse(z) q_j"}

    def value_stage(self, term):
        return FIRST_READ

    def value_after_first_pass(self, k, t, term):
        lse = names.student_lse(term.slot)
        return f"{lse} * {lse}"

    def gradient(self, k, t, term):
        return LinearGradient(((f"2.0 * {names.student_lse(term.slot)}", k.q(term.slot)),))


class ZLossKind(LossKind):
    name = "z_loss"
    model = ZLoss
    fragments = ZLossFragments()
    formula = ("ℓ = (logsumexp z)², on the raw logits z (no temperature)",)
    example = "z: {type: z_loss, heads: [next], weight: 1.0e-4}"
    note = "No `target` and no `temperature`: it reads the student's raw logits."

    def reference(self, row, term):
        import torch

        return torch.logsumexp(row.logits, dim=-1) ** 2


KIND = ZLossKind()
