"""Reference math: every target in plain PyTorch (its own `Target.log_probs` or `vector_log_probs`), and
each term through its kind's own reference (`LossKind.reference` / `divergence`, in the kind's module),
differentiated by autograd.

This is the ground truth the fused kernels are tested against, so it favours readable, exact
formulas over speed. Everything is computed in float32 (float64 when the logits are float64).
Distributions are handled as log-probabilities so that zero probabilities (banned tokens with -inf
logits, one-hot labels, padded vocab) stay exact; wherever a probability is zero its term is
excluded with `torch.where` on *both* the value and what feeds it, so that no 0 * inf reaches the
forward value or the gradient.

Notation per position: z = student logits / T, log q = log_softmax(z), p = target distribution at T,
or at the loss node's teacher_temperature where it gives one (the teachers' logits / T_teacher).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..compiler.plan import Term
from ..kinds import loss_kind
from .inputs import HeadBatch


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Targets as log-probabilities over the head's vocabulary.
# --------------------------------------------------------------------------------------------------


def at_labels(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values[i, labels[i]]; NaN for a label outside the vocab (an input nobody checked), as in the kernel."""
    inside = (labels >= 0) & (labels < values.shape[-1])
    picked = values.gather(1, torch.where(inside, labels, 0)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.nan)


# --------------------------------------------------------------------------------------------------
# One term at one head.
# --------------------------------------------------------------------------------------------------


class TermRows:
    """What a kind's reference reads for one term at every position of a head (`kinds.loss.ReferenceRow`):
    the masked logits, the student's log q at the term's temperature, and the target's log p (on demand)."""

    def __init__(
        self,
        term: Term,
        batch: HeadBatch,
        logits: torch.Tensor,
        z: torch.Tensor,
        temperature: float,
        teacher_temperature: float | None = None,
    ):
        self.term = term
        self.batch = batch
        self.logits = logits  # [N, V] at temperature 1, zero on masked rows
        self.z = z  # logits / T
        self.temperature = temperature
        # the target's teachers are read at this one (the loss node's teacher_temperature, else T)
        self.teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
        self.log_q = torch.log_softmax(z, dim=-1)
        self.labels = batch.labels
        self.hard_labels = term.target is not None and term.target.hard_labels
        weights = None if term.class_weights is None else batch.class_weights[term.class_weights].vector
        self.class_weights = None if weights is None else weights.to(z.dtype)  # [V] (cross_entropy's)

    def log_p(self) -> torch.Tensor:
        """log p [N, V] of the term's dense target at the teacher temperature (the target kind's own math;
        labels and smoothed labels have no temperature)."""
        return self.term.target.log_probs(self.batch, self.logits.shape[-1], self.teacher_temperature, self.z.dtype)

    def at_labels(self, values: torch.Tensor) -> torch.Tensor:
        return at_labels(values, self.labels)


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(logits / softcap), the logits a soft-capped head's losses see (as they are)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def scale_logits(logits: torch.Tensor, logits_scale: float | None) -> torch.Tensor:
    """a * logits, the logits a scaled head's losses see (before any cap); the gradient flows through."""
    return logits if logits_scale is None else logits * logits_scale


def masked_logits(
    batch: HeadBatch, dtype: torch.dtype, softcap: float | None, logits_scale: float | None
) -> torch.Tensor:
    """[N, V] the logits the terms see (scaled, then capped) in `dtype`, zero on masked rows."""
    return torch.where(batch.mask[:, None], soft_cap(scale_logits(batch.logits.to(dtype), logits_scale), softcap), 0.0)


def term_per_position(
    term: Term,
    batch: HeadBatch,
    temperature: float,
    softcap: float | None = None,
    logits_scale: float | None = None,
    teacher_temperature: float | None = None,
) -> torch.Tensor:
    """The unweighted loss of `term` at every position, [N] (zero where masked), on the head's logits
    times `logits_scale`, then soft-capped at `softcap` (when the head scales or caps them), in the
    compute dtype; the student read at `temperature`, the target's teachers at `teacher_temperature`
    (None: at `temperature`)."""
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    kind = loss_kind(term.kind)
    dtype = compute_dtype(batch.logits)
    mask = batch.mask
    logits = masked_logits(batch, dtype, softcap, logits_scale)
    z = logits / temperature
    target = term.target
    finite = None if target is None else target.rows_finite(batch, logits.shape[-1])
    broken = None if finite is None else mask & ~finite
    if broken is not None:
        # a broken teacher row gives a NaN value and a NaN gradient, never a finite value that hides it
        z = z * torch.where(broken, math.nan, 1.0)[:, None].to(dtype)  # exact on the other rows
    vectors = None if target is None else target.vector_log_probs(batch, z, mask, teacher_temperature)
    if vectors is not None:  # a target known on a few tokens per row: the kind's divergence on its vectors
        log_p, log_q, usable = vectors
        value = torch.where(usable, kind.divergence(log_p, log_q, term), 0.0)
    else:
        value = kind.reference(TermRows(term, batch, logits, z, temperature, teacher_temperature), term)
    if broken is not None:
        value = torch.where(broken, z.sum(-1), value)  # NaN, with a NaN gradient through z
    return torch.where(mask, value, 0.0)


def reference_terms(
    terms: tuple[Term, ...],
    batch: HeadBatch,
    temperatures: list[float],
    softcap: float | None = None,
    logits_scale: float | None = None,
    teacher_temperatures: list[float | None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each term's normalized sum (a differentiable scalar) and its value at every position ([N], 0
    where masked), before weights and T^2 scaling. Positions count with their weight (a float loss_mask).
    Each term takes the positions and normalizer of its group (`Term.group`, `HeadBatch.group`).
    `teacher_temperatures`: each term's teacher temperature (None: its temperature)."""
    dtype = compute_dtype(batch.logits)
    teacher_temperatures = teacher_temperatures or [None] * len(terms)
    # the logits in the compute dtype once for all terms: autograd sums the terms' gradients there and
    # rounds the head's gradient to the logits' dtype once (bfloat16 terms rounded one by one and added
    # in bfloat16 would be a step or more off)
    batch = replace(batch, logits=batch.logits.to(dtype))
    sums, per_position = [], []
    for term, temperature, teacher in zip(terms, temperatures, teacher_temperatures):
        own = batch.group(term.group)  # the term's mask (the unmasked rows of `positions: all`) and normalizer
        value = term_per_position(term, own, temperature, softcap, logits_scale, teacher)
        per_position.append(value)
        sums.append((value * own.row_weight().to(dtype)).sum() / own.normalizer.to(dtype))
    return sums, per_position


def reference_diagnostics(
    terms: tuple[Term, ...],
    batch: HeadBatch,
    temperatures: list[float],
    softcap: float | None = None,
    logits_scale: float | None = None,
) -> torch.Tensor | None:
    """[N, diagnostic columns] float32: each term's row diagnostics (`LossKind.reference_diagnostics`) on
    its group's positions, 0 elsewhere, in `backend.diagnostic_columns` order; None when no term has any."""
    columns = []
    with torch.no_grad():
        for term, temperature in zip(terms, temperatures):
            kind = loss_kind(term.kind)
            if not kind.diagnostics(term):
                continue
            own = batch.group(term.group)
            logits = masked_logits(own, compute_dtype(own.logits), softcap, logits_scale)
            row = TermRows(term, own, logits, logits / temperature, temperature)
            columns += [torch.where(own.mask, value, 0.0) for value in kind.reference_diagnostics(row, term)]
    return torch.stack(columns, 1).to(torch.float32) if columns else None
