"""Reference math: every loss and target kind in plain PyTorch, differentiated by autograd.

This is the ground truth the fused kernels are tested against, so it favours readable, exact
formulas over speed. Everything is computed in float32 (float64 when the logits are float64).
Distributions are handled as log-probabilities so that zero probabilities (banned tokens with -inf
logits, one-hot labels, padded vocab) stay exact; wherever a probability is zero its term is
excluded with `torch.where` on *both* the value and what feeds it, so that no 0 * inf reaches the
forward value or the gradient.

Notation per position: z = student logits / T, log q = log_softmax(z), p = target distribution at T.
"""

from __future__ import annotations

import math

import torch

from .inputs import HeadBatch, TopK
from ..compiler.plan import DenseTarget, LabelsTarget, MixtureTarget, SmoothedTarget, Target, Term, TopKTarget


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Divergences between two distributions given as log-probabilities over the last dimension.
# --------------------------------------------------------------------------------------------------


def relative_entropy(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_j a_j (log a_j - log b_j), with 0 log 0 = 0."""
    a = log_a.exp()
    support = a > 0
    difference = torch.where(support, log_a - torch.where(support, log_b, 0.0), 0.0)
    return (a * difference).sum(-1)


def soft_cross_entropy(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log q_j, with 0 log 0 = 0."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_q, 0.0)).sum(-1)


def jensen_shannon(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """beta KL(p || M) + (1 - beta) KL(q || M) with M = beta p + (1 - beta) q."""
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    weighted_p = torch.where(both_zero, 0.0, log_p + math.log(beta))
    weighted_q = torch.where(both_zero, 0.0, log_q + math.log1p(-beta))
    log_m = torch.where(both_zero, -math.inf, torch.logaddexp(weighted_p, weighted_q))
    return beta * relative_entropy(log_p, log_m) + (1.0 - beta) * relative_entropy(log_q, log_m)


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """1/2 sum_j |p_j - q_j|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def entropy(log_q: torch.Tensor) -> torch.Tensor:
    """-sum_j q_j log q_j, with 0 log 0 = 0."""
    q = log_q.exp()
    return -(q * torch.where(q > 0, log_q, 0.0)).sum(-1)


def divergence(kind: str, log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-position value of a target-based loss kind."""
    if kind == "cross_entropy":
        return soft_cross_entropy(log_p, log_q)
    if kind == "forward_kl":
        return relative_entropy(log_p, log_q)
    if kind == "reverse_kl":
        return relative_entropy(log_q, log_p)
    if kind == "jsd":
        return jensen_shannon(log_p, log_q, beta)
    if kind == "tvd":
        return total_variation(log_p, log_q)
    raise ValueError(f"{kind} takes no target")


# --------------------------------------------------------------------------------------------------
# Targets as log-probabilities over the head's vocabulary.
# --------------------------------------------------------------------------------------------------


def at_labels(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values[i, labels[i]]; NaN for a label outside the vocab (an input nobody checked), as in the kernel."""
    inside = (labels >= 0) & (labels < values.shape[-1])
    picked = values.gather(1, torch.where(inside, labels, 0)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.nan)


def map_vocab(teacher: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Teacher logits [N, Vt] onto the head's vocab: drop extra columns, or pad with -inf."""
    extra = vocab_size - teacher.shape[-1]
    if extra < 0:
        return teacher[:, :vocab_size]
    if extra > 0:
        return torch.nn.functional.pad(teacher, (0, extra), value=-math.inf)
    return teacher


def target_log_probs(
    target: Target, batch: HeadBatch, vocab_size: int, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """log p [N, V] of a dense target at `temperature` (masked rows hold finite placeholder values)."""
    if isinstance(target, LabelsTarget):
        log_p = torch.full((batch.mask.numel(), vocab_size), -math.inf, dtype=dtype, device=batch.mask.device)
        return log_p.scatter(1, batch.labels[:, None], 0.0)
    if isinstance(target, SmoothedTarget):
        eps = target.epsilon
        log_p = torch.full(
            (batch.mask.numel(), vocab_size), math.log(eps / vocab_size), dtype=dtype, device=batch.mask.device
        )
        return log_p.scatter(1, batch.labels[:, None], math.log(1.0 - eps + eps / vocab_size))
    if isinstance(target, DenseTarget):
        teacher = map_vocab(batch.teachers[target.name].to(dtype), vocab_size)
        teacher = torch.where(batch.mask[:, None], teacher, 0.0)
        return torch.log_softmax(teacher / temperature, dim=-1)
    if isinstance(target, MixtureTarget):
        parts = [
            math.log(weight) + target_log_probs(part, batch, vocab_size, temperature, dtype)
            for weight, part in target.parts
            if weight > 0
        ]
        return torch.logsumexp(torch.stack(parts), dim=0)
    raise TypeError(f"{type(target).__name__} is not a dense target")


def topk_log_probs(
    target: TopKTarget, topk: TopK, z: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p, log q, usable) over the top-k buckets, plus a tail bucket for `tail: bucket`.

    renormalize: p = softmax(teacher log-probs / T) over the k stored tokens, q = softmax(z) over the
    same tokens. bucket (T = 1): p_i and q_i at the k tokens, and one more bucket each holding the
    remaining mass (for the student, the log-sum-exp of the other tokens). Stored tokens outside the
    head's vocab (vocab_map: truncate) are dropped; in bucket mode their teacher mass joins the tail.
    `usable` [N] is False where renormalize finds no stored token inside the head's vocab (the
    position then contributes 0).
    """
    dtype = z.dtype
    vocab = z.shape[-1]
    k = topk.indices.shape[-1]
    indices = torch.where(mask[:, None], topk.indices.long(), 0)
    in_vocab = (indices >= 0) & (indices < vocab)  # as the kernel: ids outside the vocab are dropped
    safe = torch.where(in_vocab, indices, 0)
    # masked positions get a harmless uniform placeholder instead of whatever the caller stored there
    teacher = torch.where(mask[:, None], topk.logprobs.to(dtype), -math.log(k + 1))
    gathered = z.gather(1, safe)
    if target.tail == "renormalize":
        usable = in_vocab.any(-1)
        keep = in_vocab | ~usable[:, None]
        log_q = torch.log_softmax(torch.where(keep, gathered, -math.inf), dim=-1)
        log_p = torch.log_softmax(torch.where(keep, teacher / temperature, -math.inf), dim=-1)
        return log_p, log_q, usable
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q_top = torch.where(in_vocab, gathered - log_z, -math.inf)
    stored = torch.zeros_like(z).scatter_add(1, safe, in_vocab.to(dtype)) > 0
    has_tail = ~stored.all(-1, keepdim=True)  # k == V leaves no tail; keep its logsumexp off all -inf
    tail = torch.logsumexp(torch.where(stored & has_tail, -math.inf, z), dim=-1, keepdim=True)
    log_q_tail = torch.where(has_tail, tail - log_z, -math.inf)
    log_p_top = torch.where(in_vocab, teacher, -math.inf)
    # with no token left outside the stored ones there is no tail, whatever the stored mass rounds to
    # in float64, as the kernel: a confident teacher's tail lies below what float32 resolves next to 1
    stored_mass = log_p_top.to(torch.float64).exp().sum(-1, keepdim=True)
    log_p_tail = torch.where(has_tail, (1.0 - stored_mass).clamp(min=0.0), 0.0).log().to(dtype)
    usable = torch.ones_like(mask)
    return torch.cat([log_p_top, log_p_tail], dim=-1), torch.cat([log_q_top, log_q_tail], dim=-1), usable


def teacher_rows_finite(target: Target, batch: HeadBatch, vocab_size: int) -> torch.Tensor | None:
    """[N] True where every teacher behind `target` is a distribution: no NaN or +inf, and something
    finite (its log-sum-exp is finite). None for targets that read no teacher."""
    if isinstance(target, DenseTarget):
        teacher = map_vocab(batch.teachers[target.name], vocab_size)
        return torch.logsumexp(teacher.to(torch.float64), dim=-1).isfinite()
    if isinstance(target, TopKTarget):
        return torch.logsumexp(batch.topk[target.name].logprobs.to(torch.float64), dim=-1).isfinite()
    if isinstance(target, MixtureTarget):
        parts = [teacher_rows_finite(part, batch, vocab_size) for _, part in target.parts]
        parts = [part for part in parts if part is not None]
        return torch.stack(parts).all(0) if parts else None
    return None


# --------------------------------------------------------------------------------------------------
# One term at one head.
# --------------------------------------------------------------------------------------------------


def term_per_position(term: Term, batch: HeadBatch, temperature: float) -> torch.Tensor:
    """The unweighted loss of `term` at every position, [N] (zero where masked)."""
    dtype = compute_dtype(batch.logits)
    mask = batch.mask
    logits = torch.where(mask[:, None], batch.logits.to(dtype), 0.0)
    if term.kind == "z_loss":
        value = torch.logsumexp(logits, dim=-1) ** 2
    else:
        z = logits / temperature
        target = term.target
        finite = teacher_rows_finite(target, batch, logits.shape[-1])
        broken = None if finite is None else mask & ~finite
        if broken is not None:
            # a broken teacher row gives a NaN value and a NaN gradient, never a finite value that hides it
            z = z * torch.where(broken, math.nan, 1.0)[:, None].to(dtype)  # exact on the other rows
        if isinstance(target, TopKTarget):
            log_p, log_q, usable = topk_log_probs(target, batch.topk[target.name], z, mask, temperature)
            value = torch.where(usable, divergence(term.kind, log_p, log_q, term.beta), 0.0)
        else:
            log_q = torch.log_softmax(z, dim=-1)
            if term.kind == "entropy":
                value = entropy(log_q)
            elif term.kind == "cross_entropy" and isinstance(target, LabelsTarget):
                value = -at_labels(log_q, batch.labels)
            else:
                log_p = target_log_probs(target, batch, logits.shape[-1], temperature, dtype)
                value = divergence(term.kind, log_p, log_q, term.beta)
        if broken is not None:
            value = torch.where(broken, z.sum(-1), value)  # NaN, with a NaN gradient through z
    return torch.where(mask, value, 0.0)


def reference_terms(terms: tuple[Term, ...], batch: HeadBatch, temperatures: list[float]) -> list[torch.Tensor]:
    """Each term's normalized sum (a differentiable scalar), before weights and T^2 scaling."""
    return [
        term_per_position(term, batch, temperature).sum() / batch.normalizer.to(compute_dtype(batch.logits))
        for term, temperature in zip(terms, temperatures)
    ]
