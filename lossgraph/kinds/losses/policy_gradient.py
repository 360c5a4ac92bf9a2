"""policy_gradient: the clipped surrogate of PPO / GRPO (and CISPO) on a rollout's sampled tokens.

Per token, with lq = log softmax(z / T)_y the student's log-prob of the sampled token y (the label), old
the behaviour policy's (absent: on-policy, r = exp(lq - lq.detach()) = 1 with its gradient) and A the
advantage, r = exp(lq - old):
- clip: l = -min(r' A, clip(r, 1 - eps_low, 1 + eps_high) A), r' = min(r, delta) with `delta`, else r;
- cispo: l = -min(r, eps_high).detach() A lq.
The loss depends on the logits only through lq, so dl/ds_j = g (onehot_j - q_j) with g = dl/dlq, known
after the first read. Subgradients are torch's, as TRL's expression has them: clamp passes the gradient
at its bounds (inclusive), min splits it evenly at a tie, so inside the clip range (where both branches
are equal) g = -r A, and at a bound g = -r A as well.

With `importance_sampling: sequence` (GSPO) r is the sequence's length-normalized ratio and with
`top_entropy_quantile` a token below the batch's entropy quantile adds 0: both relate rows, so the
fused path computes each row's value and g on the device between the stats and apply phases
(`policy_gradient_rows`), and the kernel reads them.

The terms aggregate as the node's `aggregation` says: `token_mean` as every term (the head's targets),
`sequence_mean` and `constant` as a term group of their own whose rows the rollout weighs
(`LeafForm.group_weights`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from ...errors import quote
from ...kernels import names
from ...kernels.fragments import FIRST_READ, MOMENT, LinearGradient, LossFragments
from ...spec.nodes import Name, TemperedLoss
from ..loss import LossKind, constant

ROLLOUT = "rollout"
MAX_COMPLETION_LENGTH = 2**24  # positions: far beyond any completion, exact in float32


class RolloutLoss(TemperedLoss):
    """A loss on a rollout's sampled tokens: its target, and how its per-token values aggregate."""

    #: the kind reads a rollout (the rollout source refuses the others)
    reads_rollout: ClassVar[bool] = True

    target: Name = Field(description="Name of the `rollout` source whose sampled tokens (the labels) it scores.")
    aggregation: Literal["token_mean", "sequence_mean", "constant"] = Field(
        "token_mean",
        description=(
            "How the per-token losses add up. `token_mean`: the sum over every token of the batch divided by "
            "their count, like every other term (TRL's `bnpo` and `dapo`; with `num_items` or `normalize_across`, "
            "the count over the ranks). `sequence_mean`: each sequence's mean, then the mean over the sequences "
            "(TRL's `grpo`). `constant`: the sum divided by `max_completion_length` x the number of sequences "
            "(TRL's `dr_grpo`). A sequence is a run of `sequence_ids` (default: a batch row); one whose tokens "
            "are all masked adds 0 and still counts, as in TRL's mean over the completions."
        ),
    )
    max_completion_length: Annotated[int, Field(ge=1, le=MAX_COMPLETION_LENGTH)] | None = Field(
        None, description="The constant of `aggregation: constant` (TRL's `max_completion_length`); only with it."
    )


def check_rollout_fields(loss: RolloutLoss) -> list[tuple[str, str]]:
    """The rules every rollout loss's own fields follow."""
    problems = []
    if loss.aggregation == "constant" and loss.max_completion_length is None:
        problems.append(
            (
                "aggregation",
                "aggregation: constant divides by max_completion_length x sequences; set max_completion_length",
            )
        )
    if loss.aggregation != "constant" and loss.max_completion_length is not None:
        problems.append(
            (
                "max_completion_length",
                f"max_completion_length is the constant of aggregation: constant, but the aggregation is "
                f"{loss.aggregation}; remove it, or set aggregation: constant",
            )
        )
    if loss.positions != "targets":
        problems.append(
            (
                "positions",
                f"{loss.type} takes the head's targets (the sampled tokens are the labels); remove positions, or mask "
                "tokens with loss_mask",
            )
        )
    if loss.aggregation != "token_mean" and loss.normalizer != "positions":
        problems.append(
            (
                "normalizer",
                f"aggregation: {loss.aggregation} divides by the sequences, not by a count of positions; remove "
                "normalizer",
            )
        )
    return problems


def check_rollout_target(kind: str, target) -> list[tuple[str, str]]:
    """A rollout loss targets a rollout source."""
    if target.kind == ROLLOUT:
        return []
    return [
        (
            "target",
            f"{kind} scores a rollout's sampled tokens, but {quote(target.name)} is a {target.kind or 'source'}; "
            "target a source of type rollout",
        )
    ]


def rollout_aggregation(loss: RolloutLoss) -> tuple[str, float] | None:
    """`LossKind.aggregation` of a rollout loss: None for token_mean (the head's own positions)."""
    if loss.aggregation == "token_mean":
        return None
    return loss.aggregation, float(loss.max_completion_length or 0)


def rollout_details(loss: RolloutLoss) -> list[str]:
    if loss.aggregation == "constant":
        return [f"aggregation constant ({loss.max_completion_length})"]
    return [] if loss.aggregation == "token_mean" else [f"aggregation {loss.aggregation}"]


def student_logprob(k, term) -> str:
    """Emit `logprob`, log q of the label at the term's slot, from pass 1's statistics; returns its name."""
    s = term.slot
    k.emit(f"logprob = ({k.scaled_label_logit(s)} - {names.student_max(s)}) - {names.student_log_sum(s)}")
    return "logprob"


def logprob_gradient(k, term) -> LinearGradient:
    """dl/ds_j = g (onehot_j - q_j) for a loss of lq alone, its `g = dl/dlq` a per-row local."""
    return LinearGradient((("-g", k.q(term.slot)),), at_label="g")


#: the constants of a term whose rows depend on other rows (present only where the option is on)
ACROSS_ROWS = ("sequence", "sequence_token", "top_entropy_quantile")


def across_rows_constants(loss) -> tuple[tuple[str, float], ...]:
    """The kernel constants of GSPO and the entropy quantile, only where they are on (a token-level
    term's kernel stays the same)."""
    found = ((loss.importance_sampling, 1.0),) if loss.importance_sampling != "token" else ()
    if loss.top_entropy_quantile < 1.0:
        found += (("top_entropy_quantile", loss.top_entropy_quantile),)
    return found


def across_rows(term, name: str) -> float:
    """A constant of `ACROSS_ROWS`, 0 when the option is off."""
    return dict(term.constants).get(name, 0.0)


def batch_quantile(values, active, q: float):
    """torch.quantile(values[active], q) (linear interpolation) as a 0-d tensor, without the host sync
    of a boolean index: the inactive values sort last as +inf, and the ranks come from the active count.
    +inf when no value is active."""
    import torch

    ordered = torch.sort(torch.where(active, values, torch.inf)).values
    count = active.sum()
    rank = (count - 1).clamp(min=0).to(values.dtype) * q  # q rounded to the values' dtype, as torch.quantile's
    below = ordered.gather(0, rank.long().reshape(1))
    above = ordered.gather(0, rank.ceil().long().reshape(1))
    threshold = torch.lerp(below, above, (rank - rank.floor()).reshape(1))[0]
    return torch.where(count > 0, threshold, torch.inf)


def policy_gradient_rows(term, rows):
    """The fused path's (value, g = dl/dlq) of every row for GSPO and the entropy quantile, from every row's
    log-prob: device tensors, no host sync (`LossFragments.row_input_values`).

    With a the unmasked rows (weight w != 0), keep = a & (entropy >= the batch's 1 - rho quantile), and
    per row u, token level: log r_u = lq_u - old_u; sequence level (GSPO): log r_u = log r_s =
    sum_{t in s} a_t (lq_t - old_t) / max(n_s, 1) for u's sequence s, n_s its unmasked rows. The value is
    keep_u l_u(r_u), and with d_t = dl_t/dlog r (the token-level g at r = r_s: -r A on the branch that
    min takes, half of each at a tie, 0 where clipped):
      token:    g_u = keep_u d_u
      sequence_token (GSPO-token): log r_u = lq_u - sg(lq_u) + sg(log r_s), so g_u = keep_u d_u at r_s
      sequence: the loss is sum_t w_t keep_t l_t(r_s), and dlog r_s/dlq_u = a_u / n_s, so
                dL/dlq_u = (a_u / n_s) sum_{t in s} w_t keep_t d_t; the kernel multiplies g_u by w_u, so
                g_u = sum_{t in s} w_t keep_t d_t / (n_s w_u) (0 where w_u = 0).
    CISPO's weight has no gradient: g_u = -keep_u min(r_u, eps_high) A_u at either level.
    """
    import torch

    advantages, old, _, runs = rows.target
    active = rows.weight != 0.0
    logprob = torch.where(active, rows.logprob, 0.0)
    log_ratio = torch.zeros_like(logprob) if not term.target.old_logprobs else torch.where(active, logprob - old, 0.0)
    sequence = across_rows(term, "sequence")
    if sequence or across_rows(term, "sequence_token"):
        counts = torch.zeros_like(logprob).scatter_add(0, runs, active.to(logprob.dtype)).clamp(min=1.0)
        log_ratio = (torch.zeros_like(logprob).scatter_add(0, runs, log_ratio) / counts)[runs]
    ratio = torch.exp(log_ratio)
    keep = active
    rho = across_rows(term, "top_entropy_quantile")
    if rho:
        keep = active & (rows.student_entropy >= batch_quantile(rows.student_entropy, active, 1.0 - rho))
    high = constant(term, "epsilon_high")
    if constant(term, "cispo"):
        weight = torch.clamp(ratio, max=high) * advantages
        zero = torch.zeros_like(logprob)
        return torch.where(keep, -weight * logprob, zero), torch.where(keep, -weight, zero)
    low, delta = 1.0 - constant(term, "epsilon_low"), constant(term, "delta")
    clipped = torch.clamp(ratio, low, 1.0 + high) * advantages
    d_clipped = torch.where((ratio >= low) & (ratio <= 1.0 + high), ratio * advantages, 0.0)
    unclipped = (torch.clamp(ratio, max=delta) if delta else ratio) * advantages
    d_unclipped = torch.where(ratio <= delta, ratio * advantages, 0.0) if delta else unclipped
    d = -torch.where(
        unclipped < clipped, d_unclipped, torch.where(clipped < unclipped, d_clipped, 0.5 * (d_unclipped + d_clipped))
    )
    value = torch.where(keep, -torch.minimum(unclipped, clipped), 0.0)
    d = torch.where(keep, d, 0.0)
    if not sequence:
        return value, d
    counts = counts[runs]
    shares = torch.zeros_like(d).scatter_add(0, runs, rows.weight * d)[runs]
    return value, torch.where(active, shares / (counts * torch.where(active, rows.weight, 1.0)), 0.0)


class PolicyGradientLoss(RolloutLoss):
    """The clipped surrogate of PPO / GRPO / DAPO (or CISPO) on a rollout's sampled tokens, with TRL's fields."""

    type: Literal["policy_gradient"] = Field(description="Loss kind.")
    objective: Literal["clip", "cispo"] = Field(
        "clip",
        description=(
            "`clip`: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A), PPO's clipped surrogate (TRL's "
            "grpo, bnpo, dr_grpo, dapo). `cispo`: -min(r, epsilon_high).detach() A log q, the clipped importance "
            "weight without gradient times the log-prob (MiniMax-M1; TRL's `cispo`, where epsilon_high bounds the "
            "ratio itself)."
        ),
    )
    epsilon_low: Annotated[float, Field(allow_inf_nan=False, ge=0.0, lt=1.0)] = Field(
        0.2, description="Lower clip: r is clipped below at 1 - epsilon_low (TRL's `epsilon`). Only for `clip`."
    )
    epsilon_high: Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1e3)] | None = Field(
        None,
        description=(
            "`clip`: upper clip at 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); default epsilon_low. "
            "`cispo`: the bound of the importance weight min(r, epsilon_high) (TRL's `epsilon_high` under "
            "loss_type cispo, e.g. 5.0); required there."
        ),
    )
    delta: Annotated[float, Field(allow_inf_nan=False, ge=1.0, le=1e3)] | None = Field(
        None,
        description=(
            "Two-sided clipping (TRL's `delta`): the unclipped branch uses min(r, delta), so a large ratio with a "
            "negative advantage is bounded too; > 1 + epsilon_high in practice. Only for `clip`."
        ),
    )
    importance_sampling: Literal["token", "sequence", "sequence_token"] = Field(
        "token",
        description=(
            "`token`: each token's own ratio r = exp(log q - old). `sequence` (GSPO; TRL's "
            "`importance_sampling_level: sequence`): every token of a sequence takes the sequence's ratio "
            "exp(mean over its unmasked tokens of (log q - old)), a length-normalized geometric mean, whose "
            "gradient reaches every token of the sequence. A sequence is a run of `sequence_ids` (default: a "
            "batch row). `sequence_token` (GSPO-token, TRL's `sequence_token`): the sequence's ratio as value, "
            "each token's own log-prob as gradient (exp(lq - sg(lq) + sg(log r_s))). The fused backend runs the "
            "head in phases (statistics, the ratios across rows on the device, then the gradient)."
        ),
    )
    top_entropy_quantile: Annotated[float, Field(allow_inf_nan=False, gt=0.0, le=1.0)] = Field(
        1.0,
        description=(
            "rho (TRL's `top_entropy_quantile`): train only on the tokens whose entropy (the student's, at the "
            "node's temperature) is at least the (1 - rho) quantile (linear interpolation, as torch.quantile) "
            "of the entropies of the batch's unmasked tokens; ties with the threshold are kept. The others add "
            "0 and still count in the aggregation, as in TRL. 1 (default): every token."
        ),
    )

    @property
    def across_rows(self) -> bool:
        """A row's value depends on other rows: the fused path runs in phases, no chunked (hidden-input) head."""
        return self.importance_sampling != "token" or self.top_entropy_quantile < 1.0


class PolicyGradientFragments(LossFragments):
    """The value and g = dl/dlq after the first read, from the label's log-prob and the rollout's row."""

    name = "policy_gradient"

    def formulas(self, term):
        if constant(term, "cispo"):
            value = "l = -w A lq, w = min(r, eps_high) (no gradient), r = exp(lq - old)"
            gradient = "dl/ds_j = g (onehot_j - q_j), g = -w A"
        else:
            value = "l = -min(r' A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(lq - old), r' = min(r, delta)"
            gradient = "dl/ds_j = g (onehot_j - q_j), g = -(d/dlq of the smaller branch; half of each at a tie)"
        return {"value": value, "gradient": gradient}

    def value_stage(self, term):
        return FIRST_READ

    def first_pass_statistics(self, term):
        return (MOMENT,) if across_rows(term, "top_entropy_quantile") else ()

    def row_inputs(self, term):
        # the value and g = dl/dlq of each row, known only once every row's log-prob (and entropy) is
        return ("value", "gradient") if dict(term.constants).keys() & set(ACROSS_ROWS) else ()

    def row_input_values(self, term, rows):
        return policy_gradient_rows(term, rows)

    def value_after_first_pass(self, k, t, term):
        if self.row_inputs(term):
            k.emit(f"g = tl.load({names.row_input(t, 'gradient')} + row)")
            return f"tl.load({names.row_input(t, 'value')} + row)"
        rollout = term.target
        advantage = rollout.advantage(k)
        logprob = student_logprob(k, term)
        high = constant(term, "epsilon_high")
        if constant(term, "cispo"):
            if not rollout.old_logprobs:  # r = 1
                k.emit(f"weight = {min(1.0, high)!r} * {advantage}")
            else:
                k.emit(f"weight = tl.minimum(tl.exp({logprob} - {rollout.old_logprob(k)}), {high!r}) * {advantage}")
            k.emit("g = -weight")
            return f"-weight * {logprob}"
        if not rollout.old_logprobs:  # r = 1 lies inside [1 - eps_low, 1 + eps_high] and below delta: a tie
            k.emit(f"g = -{advantage}")
            return f"-{advantage}"
        low, delta = 1.0 - constant(term, "epsilon_low"), constant(term, "delta")
        k.emit(
            f"ratio = tl.exp({logprob} - {rollout.old_logprob(k)})",
            f"clipped = tl.minimum(tl.maximum(ratio, {low!r}), {1.0 + high!r}) * {advantage}",
            f"d_clipped = tl.where((ratio >= {low!r}) & (ratio <= {1.0 + high!r}), ratio * {advantage}, 0.0)",
        )
        if delta:
            k.emit(
                f"unclipped = tl.minimum(ratio, {delta!r}) * {advantage}",
                f"d_unclipped = tl.where(ratio <= {delta!r}, ratio * {advantage}, 0.0)",
            )
        else:
            k.emit(f"unclipped = ratio * {advantage}", "d_unclipped = unclipped")
        k.emit(
            "g = -tl.where(unclipped < clipped, d_unclipped, "
            "tl.where(clipped < unclipped, d_clipped, 0.5 * (d_unclipped + d_clipped)))"
        )
        return "-tl.minimum(unclipped, clipped)"

    def gradient(self, k, t, term):
        return logprob_gradient(k, term)

    # the row diagnostics of the metrics (`policy_metrics`): the entropy needs pass 1's moment
    def diagnostic_names(self, term):
        return DIAGNOSTICS

    def diagnostic_statistics(self, term):
        return (MOMENT,)

    def row_diagnostics(self, k, t, term):
        s = term.slot
        entropy = f"{names.student_log_sum(s)} - {names.moment(s)} / {names.student_sum(s)}"
        logprob = f"({k.scaled_label_logit(s)} - {names.student_max(s)}) - {names.student_log_sum(s)}"
        return entropy, logprob


# per row, what the metrics are computed from: the student's entropy and log q of the sampled token (at T)
DIAGNOSTICS = ("entropy", "logprob")


def policy_metrics(term, diagnostics, batch) -> dict:
    """TRL's logged metrics of GRPOTrainer (and PPO's approximate KL) over the term's active tokens, from the
    row diagnostics: 0-d float32 tensors, no host sync (docs/rl.md, "Metrics")."""
    import torch

    entropy, logprob = diagnostics["entropy"], diagnostics["logprob"]
    active = batch.row_weight() != 0  # the term's positions (its group's, with their weights)
    count = active.sum()
    tokens = count.clamp(min=1).to(torch.float32)

    def mean(values):
        return torch.where(active, values.to(torch.float32), 0.0).sum() / tokens

    advantages, old, ref = term.target.rows(batch, torch.float32)
    log_ratio = torch.zeros_like(logprob) if old is None else logprob - old
    ratio = torch.exp(log_ratio)
    epsilon_high = constant(term, "epsilon_high")
    metrics = {"entropy": mean(entropy)}
    if constant(term, "cispo"):
        metrics["cispo_clip_ratio"] = mean((ratio > epsilon_high) & (advantages > 0))
    else:
        delta = constant(term, "delta")
        capped = torch.clamp(ratio, max=delta) if delta else ratio  # TRL counts the clips after the delta cap
        low = (capped < 1.0 - constant(term, "epsilon_low")) & (advantages < 0)  # strict, as TRL's
        high = (capped > 1.0 + epsilon_high) & (advantages > 0)
        metrics |= {
            "clip_ratio/low_mean": mean(low),
            "clip_ratio/high_mean": mean(high),
            "clip_ratio/region_mean": mean(low | high),
        }

    def extreme(reduce, neutral: float):  # NaN without active tokens
        nan = torch.full((), torch.nan, device=ratio.device)
        return torch.where(count > 0, reduce(torch.where(active, ratio, neutral)), nan) if ratio.numel() else nan

    metrics |= {
        "ratio/mean": mean(ratio),
        "ratio/min": extreme(torch.amin, torch.inf),
        "ratio/max": extreme(torch.amax, -torch.inf),
        "approxkl": mean(0.5 * log_ratio.square()),
    }
    if ref is not None:  # TRL's `kl`: the k3 estimate against the reference model
        metrics["kl"] = mean(torch.exp(ref - logprob) - (ref - logprob) - 1.0)
    positions = max(1, active.shape[0])
    metrics["masked_fraction"] = 1.0 - count.to(torch.float32) / positions
    return metrics


class PolicyGradient(LossKind):
    name = "policy_gradient"
    model = PolicyGradientLoss
    fragments = PolicyGradientFragments()
    trainer_metrics = (
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "cispo_clip_ratio",
    )
    formula = (
        "clip: ℓ = −min(r′ A, clip(r, 1−ε_low, 1+ε_high) A), r = exp(log q[y] − old[y]), r′ = min(r, δ) (r′ = r "
        "without `delta`); on-policy (no old log-probs) r = 1 with its gradient, so ℓ = −A",
        "cispo: ℓ = −sg(min(r, ε_high)) A log q[y] (sg: no gradient)",
        "importance_sampling: sequence (GSPO): r = exp(Σ_t m_t (log q_t[y_t] − old_t) / max(n_s, 1)) over the "
        "sequence's n_s unmasked tokens, the same on each of them; `sequence_token` (GSPO-token): that value, "
        "with r = exp(log q[y] − sg(log q[y]) + sg(log r_s)) for the gradient",
        "top_entropy_quantile ρ < 1: ℓ × [H(q) ≥ the (1 − ρ) quantile of the batch's unmasked entropies]",
    )
    example = (
        "pg: {type: policy_gradient, heads: [next], target: rollouts, epsilon_low: 0.2, epsilon_high: 0.28, "
        "aggregation: token_mean}"
    )
    checks = (
        "The target is a `rollout` source; `positions` stays `targets`.",
        "`epsilon_low` in [0, 1); `epsilon_high` (default `epsilon_low`) and `delta` (≥ 1) only where the "
        "objective uses them: `cispo` needs `epsilon_high` and takes neither `epsilon_low` nor `delta`.",
        "`max_completion_length` with `aggregation: constant` only; `sequence_mean` and `constant` keep "
        "`normalizer: positions` and take no `num_items`.",
        "`top_entropy_quantile` in (0, 1]; with it or a sequence-level `importance_sampling`, no head with "
        "`input: hidden`.",
    )
    note = (
        "The sampled token y is the label; A, old and the sequences come from the rollout (see [rl.md](rl.md) "
        "for TRL's loss types). Subgradients as torch's: the clip passes the gradient at its bounds, a tie "
        "of the two branches splits it."
    )

    def constants(self, loss):
        cispo = loss.objective == "cispo"
        high = loss.epsilon_high if loss.epsilon_high is not None else loss.epsilon_low
        return (
            ("epsilon_low", 0.0 if cispo else loss.epsilon_low),
            ("epsilon_high", high),
            ("delta", loss.delta or 0.0),
            ("cispo", 1.0 if cispo else 0.0),
        ) + across_rows_constants(loss)

    def aggregation(self, loss):
        return rollout_aggregation(loss)

    def details(self, loss):
        found = [loss.objective] if loss.objective != "clip" else []
        given = loss.model_fields_set
        found += [
            f"{field} {getattr(loss, field):g}" for field in ("epsilon_low", "epsilon_high", "delta") if field in given
        ]
        if loss.importance_sampling != "token":
            found.append(f"importance_sampling {loss.importance_sampling}")
        if loss.top_entropy_quantile < 1.0:
            found.append(f"top_entropy_quantile {loss.top_entropy_quantile:g}")
        return found + rollout_details(loss)

    def check_fields(self, loss):
        problems = check_rollout_fields(loss)
        if loss.objective == "cispo":
            if loss.epsilon_high is None:
                problems.append(
                    (
                        "epsilon_high",
                        "objective: cispo bounds the importance weight by epsilon_high (min(r, epsilon_high), TRL's "
                        "convention); set it (e.g. 5.0)",
                    )
                )
            for field in ("epsilon_low", "delta"):
                if field in loss.model_fields_set:
                    problems.append((field, f"objective: cispo has no {field} (only epsilon_high); remove it"))
        return problems

    def check_target(self, target, loss):
        return check_rollout_target(self.name, target)

    def reference_diagnostics(self, row, term):
        import torch

        q = row.log_q.exp()
        entropy = -(q * torch.where(q > 0, row.log_q, 0.0)).sum(-1)
        return entropy, row.at_labels(row.log_q)

    def metrics(self, term, diagnostics, batch):
        return policy_metrics(term, diagnostics, batch)

    def reference(self, row, term):
        import torch

        target, mask = row.term.target, row.batch.mask
        advantages, old, _ = target.rows(row.batch, row.log_q.dtype)
        logprob = row.at_labels(row.log_q)
        log_ratio = logprob - (logprob.detach() if old is None else old)
        if across_rows(term, "sequence") or across_rows(term, "sequence_token"):
            # GSPO: the mean of the sequence's unmasked log-ratios, on each token
            runs = row.batch.sources[target.name].runs
            kept = torch.where(mask, log_ratio, 0.0)
            totals = torch.zeros_like(kept).scatter_add(0, runs, kept)
            counts = torch.zeros_like(kept).scatter_add(0, runs, mask.to(kept.dtype))
            log_ratio = (totals / counts.clamp(min=1.0))[runs]
            if across_rows(term, "sequence_token"):  # its value, and each token's own gradient
                log_ratio = logprob - logprob.detach() + log_ratio.detach()
        ratio = torch.exp(log_ratio)
        high = constant(term, "epsilon_high")
        if constant(term, "cispo"):
            loss = -torch.clamp(ratio, max=high).detach() * advantages * logprob
        else:
            delta = constant(term, "delta")
            unclipped = (torch.clamp(ratio, max=delta) if delta else ratio) * advantages
            clipped = torch.clamp(ratio, 1.0 - constant(term, "epsilon_low"), 1.0 + high) * advantages
            loss = -torch.min(unclipped, clipped)
        rho = across_rows(term, "top_entropy_quantile")
        if rho:  # TRL's mask: the unmasked tokens whose entropy is at least the batch's (1 - rho) quantile
            q = row.log_q.detach().exp()
            entropy = -torch.where(q > 0, q * row.log_q.detach(), 0.0).sum(-1)
            if bool(mask.any()):
                threshold = torch.quantile(entropy[mask], 1.0 - rho)
                loss = torch.where(entropy >= threshold, loss, 0.0)
        return loss


KIND = PolicyGradient()
