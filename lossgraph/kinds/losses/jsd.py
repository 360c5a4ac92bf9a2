"""jsd: the generalized Jensen-Shannon divergence beta KL(p || M) + (1 - beta) KL(q || M),
M = beta p + (1 - beta) q."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...kernels import names
from ...kernels.fragments import ROW_SUMS, BucketForm, LossFragments, Vectors
from ...spec.nodes import TargetLoss
from ..loss import LossKind, constant
from ..math import log_mixture, relative_entropy


class JSDLoss(TargetLoss):
    """Generalized Jensen-Shannon divergence: beta KL(p||M) + (1 - beta) KL(q||M), M = beta p + (1 - beta) q."""

    type: Literal["jsd"] = Field(description="Loss kind.")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="Weight of the target in the mixture M, in (0, 1).")


class JSDFragments(LossFragments):
    """The gradient needs KL(q || M), a row sum over p and q at once: a second read."""

    name = "jsd"

    def formulas(self, term):
        return {
            "row sums": "kp = sum_j p_j log(p_j / M_j), kq = sum_j q_j log(q_j / M_j), M = beta p + (1 - beta) q",
            "gradient": "dl/ds_j = (1 - beta) q_j (log(q_j / M_j) - KL(q || M))",
            "vector": "l = beta KL(p || M) + (1 - beta) KL(q || M); dl/ds_i = (1 - beta) q_i (log(q_i / M_i) - kq)",
            "bucket": "G'_b = (1 - beta) (log(Q_b / M_b) - KL(Q || M))",
        }

    def value_stage(self, term):
        return ROW_SUMS

    def log_m(self, k, t, term, log_p: str, log_q: str) -> str:
        return k.cached(f"lm{t}", k.log_mixture(constant(term, "beta"), log_p, log_q))

    def row_sum_names(self, term):
        return ("kp", "kq")

    def row_sums(self, k, t, term):
        s = term.slot
        q, log_q = k.q(s), k.log_q(s)
        p, log_p = k.p(term.target, s), k.log_p(term.target, s)
        lm = self.log_m(k, t, term, log_p, log_q)
        return (f"tl.where({p} > 0, {p} * ({log_p} - {lm}), 0.0)", f"tl.where({q} > 0, {q} * ({log_q} - {lm}), 0.0)")

    def value_from_row_sums(self, k, t, term):
        beta = repr(constant(term, "beta"))
        return f"{beta} * {names.row_sum('kp', t)} + (1.0 - {beta}) * {names.row_sum('kq', t)}"

    def gradient(self, k, t, term):
        s = term.slot
        q, log_q = k.q(s), k.log_q(s)
        lm = self.log_m(k, t, term, k.log_p(term.target, s), log_q)
        beta = repr(constant(term, "beta"))
        return f"(1.0 - {beta}) * tl.where({q} > 0, {q} * ({log_q} - {lm} - {names.row_sum('kq', t)}), 0.0)"

    def vector(self, k, t, term, v: Vectors):
        beta = constant(term, "beta")
        k.emit(
            f"lm{t} = {k.log_mixture(beta, v.log_p, v.log_q)}",
            f"kp{t} = tl.sum(tl.where({v.p} > 0, {v.p} * ({v.log_p} - lm{t}), 0.0), 0)",
            f"kq{t} = tl.sum(tl.where({v.q} > 0, {v.q} * ({v.log_q} - lm{t}), 0.0), 0)",
            f"val{t} = {beta!r} * kp{t} + (1.0 - {beta!r}) * kq{t}",
        )
        return f"val{t}", f"(1.0 - {beta!r}) * tl.where({v.q} > 0, {v.q} * ({v.log_q} - lm{t} - kq{t}), 0.0)"

    def bucket(self, k, t, term, v: Vectors):
        beta = constant(term, "beta")
        k.emit(
            f"lM{t} = {k.log_mixture(beta, v.log_p, v.log_q)}",
            f"lMt{t} = {k.log_mixture(beta, v.log_p_tail, v.log_q_tail)}",
            f"kp{t} = tl.sum(tl.where({v.p} > 0, {v.p} * ({v.log_p} - lM{t}), 0.0), 0) + "
            f"tl.where({v.p_tail} > 0, {v.p_tail} * ({v.log_p_tail} - lMt{t}), 0.0)",
            f"kq{t} = tl.sum(tl.where({v.q} > 0, {v.q} * ({v.log_q} - lM{t}), 0.0), 0) + "
            f"tl.where({v.q_tail} > 0, {v.q_tail} * ({v.log_q_tail} - lMt{t}), 0.0)",
            f"gv{t} = (1.0 - {beta!r}) * ({v.log_q} - lM{t} - kq{t})",
        )
        return BucketForm(
            value=f"{beta!r} * kp{t} + (1.0 - {beta!r}) * kq{t}",
            stored=f"tl.where({v.q} > 0, {v.q} * gv{t}, 0.0)",
            tail_factor=f"(1.0 - {beta!r}) * ({v.log_q_tail} - lMt{t} - kq{t})",
        )


class JSD(LossKind):
    name = "jsd"
    model = JSDLoss
    fragments = JSDFragments()
    formula = ("M = βp + (1−β)q; ℓ = β KL(p‖M) + (1−β) KL(q‖M)",)
    example = "jsd: {type: jsd, heads: [next], target: teacher, beta: 0.3, weight: 0.2}"
    checks = ("`target` may not be the `labels` source.",)
    accepts_hard_labels = False

    def constants(self, loss):
        return (("beta", loss.beta),)

    def details(self, loss):
        return [f"beta {loss.beta:g}"]

    def divergence(self, log_p, log_q, term):
        beta = constant(term, "beta")
        log_m = log_mixture(log_p, log_q, beta)
        return beta * relative_entropy(log_p, log_m) + (1.0 - beta) * relative_entropy(log_q, log_m)


KIND = JSD()
