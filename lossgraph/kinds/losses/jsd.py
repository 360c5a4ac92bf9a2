"""jsd: the generalized Jensen-Shannon divergence beta KL(p || M) + (1 - beta) KL(q || M),
M = beta p + (1 - beta) q; with `normalize`, divided by beta (1 - beta), which makes it continuous on
[0, 1] with forward KL(p || q) at beta = 0 and reverse KL(q || p) at beta = 1.

Why the division: JSD_beta = beta KL(p || q) + O(beta^2) as beta -> 0 (KL(q || M) is second order in
beta), and symmetrically (1 - beta) KL(q || p) + O((1 - beta)^2) as beta -> 1. So JSD_beta tends to 0
at both ends, and JSD_beta / (beta (1 - beta)) tends to the two KLs. Trainers that return a KL at the
endpoints without the division jump there. At beta = 0 and 1 this kind hands the term to forward_kl
and reverse_kl, whose formulas are the limits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels import names
from ...kernels.fragments import ROW_SUMS, BucketForm, LossFragments, Vectors
from ...spec.nodes import TargetLoss
from ..loss import LossKind, constant
from ..math import log_mixture, relative_entropy
from .forward_kl import KIND as FORWARD_KL
from .reverse_kl import KIND as REVERSE_KL


class JSDLoss(TargetLoss):
    """Generalized Jensen-Shannon divergence: beta KL(p||M) + (1 - beta) KL(q||M), M = beta p + (1 - beta) q."""

    type: Literal["jsd"] = Field(description="Loss kind.")
    beta: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Weight of the target in the mixture M, in [0, 1]. 0 and 1 need `normalize: true` (the "
            "unnormalized divergence is 0 there)."
        ),
    )
    normalize: bool = Field(
        False,
        description=(
            "Divide by beta (1 - beta): the value then tends to forward KL(p || q) as beta -> 0 and to "
            "reverse KL(q || p) as beta -> 1, and equals them at 0 and 1 (GKD's endpoints)."
        ),
    )


class JSDFragments(LossFragments):
    """The gradient needs KL(q || M), a row sum over p and q at once: a second read. Constants: beta,
    and `scale` = 1 / (beta (1 - beta)) with `normalize`, else 1 (it multiplies value and gradient)."""

    name = "jsd"

    def formulas(self, term):
        scale = "" if constant(term, "scale") == 1.0 else "scale x "
        return {
            "row sums": "kp = sum_j p_j log(p_j / M_j), kq = sum_j q_j log(q_j / M_j), M = beta p + (1 - beta) q",
            "gradient": f"dl/ds_j = {scale}(1 - beta) q_j (log(q_j / M_j) - KL(q || M))",
            "vector": f"l = {scale}(beta KL(p || M) + (1 - beta) KL(q || M)); "
            f"dl/ds_i = {scale}(1 - beta) q_i (log(q_i / M_i) - kq)",
            "bucket": f"G'_b = {scale}(1 - beta) (log(Q_b / M_b) - KL(Q || M))",
        }

    def value_stage(self, term):
        return ROW_SUMS

    def log_m(self, k, term, log_p: str, log_q: str) -> str:
        return k.cached("lm", k.log_mixture(constant(term, "beta"), log_p, log_q))

    @staticmethod
    def factors(term) -> tuple[str, str, str]:
        """beta, scale x beta and scale x (1 - beta), as source literals."""
        beta, scale = constant(term, "beta"), constant(term, "scale")
        return repr(beta), repr(scale * beta), repr(scale * (1.0 - beta))

    def row_sum_names(self, term):
        return ("kp", "kq")

    def row_sums(self, k, t, term):
        s = term.slot
        q, log_q = k.q(s), k.log_q(s)
        p, log_p = k.p(term.target, term.target_slot), k.log_p(term.target, term.target_slot)
        lm = self.log_m(k, term, log_p, log_q)
        return (f"tl.where({p} > 0, {p} * ({log_p} - {lm}), 0.0)", f"tl.where({q} > 0, {q} * ({log_q} - {lm}), 0.0)")

    def value_from_row_sums(self, k, t, term):
        _, on_p, on_q = self.factors(term)
        return f"{on_p} * {names.row_sum('kp', t)} + {on_q} * {names.row_sum('kq', t)}"

    def gradient(self, k, t, term):
        s = term.slot
        q, log_q = k.q(s), k.log_q(s)
        lm = self.log_m(k, term, k.log_p(term.target, term.target_slot), log_q)
        _, _, on_q = self.factors(term)
        return f"{on_q} * tl.where({q} > 0, {q} * ({log_q} - {lm} - {names.row_sum('kq', t)}), 0.0)"

    def vector(self, k, t, term, v: Vectors):
        beta, on_p, on_q = self.factors(term)
        k.emit(
            f"lm = {k.log_mixture(float(beta), v.log_p, v.log_q)}",
            f"kp = tl.sum(tl.where({v.p} > 0, {v.p} * ({v.log_p} - lm), 0.0), 0)",
            f"kq = tl.sum(tl.where({v.q} > 0, {v.q} * ({v.log_q} - lm), 0.0), 0)",
            f"val = {on_p} * kp + {on_q} * kq",
        )
        return "val", f"{on_q} * tl.where({v.q} > 0, {v.q} * ({v.log_q} - lm - kq), 0.0)"

    def bucket(self, k, t, term, v: Vectors):
        beta, on_p, on_q = self.factors(term)
        k.emit(
            f"lm = {k.log_mixture(float(beta), v.log_p, v.log_q)}",
            f"lm_tail = {k.log_mixture(float(beta), v.log_p_tail, v.log_q_tail)}",
            f"kp = tl.sum(tl.where({v.p} > 0, {v.p} * ({v.log_p} - lm), 0.0), 0) + "
            f"tl.where({v.p_tail} > 0, {v.p_tail} * ({v.log_p_tail} - lm_tail), 0.0)",
            f"kq = tl.sum(tl.where({v.q} > 0, {v.q} * ({v.log_q} - lm), 0.0), 0) + "
            f"tl.where({v.q_tail} > 0, {v.q_tail} * ({v.log_q_tail} - lm_tail), 0.0)",
            f"gv = {on_q} * ({v.log_q} - lm - kq)",
        )
        return BucketForm(
            value=f"{on_p} * kp + {on_q} * kq",
            stored=f"tl.where({v.q} > 0, {v.q} * gv, 0.0)",
            tail_factor=f"{on_q} * ({v.log_q_tail} - lm_tail - kq)",
        )


class JSD(LossKind):
    name = "jsd"
    model = JSDLoss
    fragments = JSDFragments()
    formula = (
        "M = βp + (1−β)q; ℓ = β KL(p‖M) + (1−β) KL(q‖M)",
        "with `normalize: true`: ℓ / (β(1−β)), which is KL(p‖q) at β = 0 and KL(q‖p) at β = 1",
    )
    example = "jsd: {type: jsd, heads: [next], target: teacher, beta: 0.3, weight: 0.2}"
    checks = (
        "`target` may not be the `labels` source.",
        "`beta: 0` and `beta: 1` need `normalize: true`: without it the divergence is 0 at both ends.",
        "With `beta: 1` (reverse KL), the target must give every token some mass, as for `reverse_kl`.",
    )
    accepts_hard_labels = False

    @staticmethod
    def endpoint(term) -> LossKind | None:
        """forward_kl at beta 0 and reverse_kl at beta 1 (which validation allows only with normalize)."""
        return {0.0: FORWARD_KL, 1.0: REVERSE_KL}.get(constant(term, "beta"))

    def check_fields(self, loss):
        if loss.beta in (0.0, 1.0) and not loss.normalize:
            kl = "forward_kl" if loss.beta == 0.0 else "reverse_kl"
            return [
                (
                    "beta",
                    f"jsd at beta {loss.beta:g} is 0 for every input; set normalize: true to get its limit "
                    f"({kl}), or use type: {kl}",
                )
            ]
        return []

    def check_target(self, target, loss):
        problems = super().check_target(target, loss)
        if not problems and loss.beta == 1.0 and target.zero_mass_reason:  # reverse KL needs full support
            message = (
                f"jsd at beta 1 is reverse KL, which needs a target with mass on every token, but "
                f"{target.zero_mass_reason}; lower beta, or smooth the labels"
            )
            problems.append(("beta", message))
        return problems

    def kernel_fragments(self, term):
        endpoint = self.endpoint(term)
        return endpoint.fragments if endpoint else self.fragments

    def constants(self, loss):
        beta = loss.beta
        scale = 1.0 / (beta * (1.0 - beta)) if loss.normalize and 0.0 < beta < 1.0 else 1.0
        return (("beta", beta), ("scale", scale))

    def details(self, loss):
        return [f"beta {loss.beta:g}"] + (["normalized"] if loss.normalize else [])

    def divergence(self, log_p, log_q, term):
        endpoint = self.endpoint(term)
        if endpoint:
            return endpoint.divergence(log_p, log_q, term)
        beta, scale = constant(term, "beta"), constant(term, "scale")
        log_m = log_mixture(log_p, log_q, beta)
        return scale * (beta * relative_entropy(log_p, log_m) + (1.0 - beta) * relative_entropy(log_q, log_m))


KIND = JSD()
