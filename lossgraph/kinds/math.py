"""Reference math the loss kinds share: divergences between distributions given as log-probabilities
over the last dimension. Zero probabilities stay exact: wherever one is zero its term is excluded with
`torch.where` on both the value and what feeds it, so that no 0 * inf reaches a value or a gradient.
torch is imported inside each function: the kind modules are imported by the spec, which runs
without torch."""

from __future__ import annotations

import math


def relative_entropy(log_a, log_b):
    """KL(a || b) = sum_j a_j (log a_j - log b_j), with 0 log 0 = 0."""
    import torch

    a = log_a.exp()
    support = a > 0
    difference = torch.where(support, log_a - torch.where(support, log_b, 0.0), 0.0)
    return (a * difference).sum(-1)


def soft_cross_entropy(log_p, log_q):
    """-sum_j p_j log q_j, with 0 log 0 = 0."""
    import torch

    p = log_p.exp()
    return -(p * torch.where(p > 0, log_q, 0.0)).sum(-1)


def log_mixture(log_p, log_q, beta: float):
    """log(beta p + (1 - beta) q), -inf where both are 0 (with a gradient that stays finite)."""
    import torch

    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    weighted_p = torch.where(both_zero, 0.0, log_p + math.log(beta))
    weighted_q = torch.where(both_zero, 0.0, log_q + math.log1p(-beta))
    return torch.where(both_zero, -math.inf, torch.logaddexp(weighted_p, weighted_q))


def map_vocab(teacher, vocab_size: int):
    """Teacher logits [N, Vt] onto a head's vocab: drop extra columns, or pad with -inf."""
    import torch

    extra = vocab_size - teacher.shape[-1]
    if extra < 0:
        return teacher[:, :vocab_size]
    if extra > 0:
        return torch.nn.functional.pad(teacher, (0, extra), value=-math.inf)
    return teacher
