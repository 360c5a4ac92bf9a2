"""The reference backend: each head's terms by the reference math in plain PyTorch, gradients by autograd.

Any device, any floating dtype (float64 included). A hidden-input head runs chunk by chunk
(lossgraph.runtime.linear); under vocab parallel, each rank's slice is gathered into full rows first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..compiler.plan import HeadPlan
from .autograd import PrecomputedGradient
from .backend import BackendOptions, ChunkResult, HeadResult, TermStep, weighted_sum
from .inputs import HeadBatch
from .linear import linear_head
from .parallel import GatherVocab
from .reference import compute_dtype, reference_diagnostics, reference_terms


def predictions(head: HeadPlan, batch: HeadBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student argmax and each teacher's argmax over the head's vocab (for the metrics)."""
    with torch.no_grad():
        student = batch.logits.argmax(-1)  # a positive scale and soft-capping keep the order (saturated caps would tie)
        teachers = {}
        for name, value in batch.sources.items():
            predicted = batch.forms[name].prediction(value, head.vocab_size)
            if predicted is not None:
                teachers[name] = predicted
    return student, teachers


def reference_head(
    head: HeadPlan, batch: HeadBatch, steps: Sequence[TermStep], row_diagnostics: bool = True
) -> HeadResult:
    """The reference math on full logits rows (with the terms' row diagnostics where asked)."""
    raw, per_position = reference_terms(
        head.terms,
        batch,
        [s.temperature for s in steps],
        head.softcap,
        head.logits_scale,
        [s.teacher_temperature for s in steps],
    )
    # a weight-0 term is reported but takes no part in the gradient: detached, so that a value it
    # cannot define (a broken teacher) does not reach the gradient as 0 x NaN
    values = torch.stack([(value if s.weight != 0.0 else value.detach()) * s.scale for value, s in zip(raw, steps)])
    if any(s.weight != 0.0 for s in steps):
        loss = weighted_sum(values, steps)
    else:  # every weight is 0 at this step: a zero loss that still backpropagates (zeros)
        loss = torch.zeros((), dtype=compute_dtype(batch.logits), device=batch.logits.device)
        if torch.is_grad_enabled() and batch.logits.requires_grad:  # no N x V zeros when none is asked for
            loss = PrecomputedGradient.apply(batch.logits, loss, torch.zeros_like(batch.logits), False, None)
    student, teachers = predictions(head, batch)
    per_token = torch.stack([value.detach() * s.scale for value, s in zip(per_position, steps)], dim=1)
    diagnostics = None
    if row_diagnostics:
        temperatures = [s.temperature for s in steps]
        diagnostics = reference_diagnostics(head.terms, batch, temperatures, head.softcap, head.logits_scale)
    return HeadResult(loss, values.detach(), student, teachers, per_token, diagnostics)


def reference_rows(
    head: HeadPlan, chunk: HeadBatch, steps: Sequence[TermStep], gradient: bool = True, row_diagnostics: bool = True
) -> ChunkResult:
    """The reference math on a block of rows, with the logits gradient from autograd when `gradient`."""
    if not gradient:
        with torch.no_grad():
            result = reference_head(head, chunk, steps, row_diagnostics)
        return ChunkResult(
            None,
            result.values,
            result.prediction,
            result.teacher_predictions,
            per_token=result.per_token,
            diagnostics=result.diagnostics,
        )
    logits = chunk.logits.detach().requires_grad_()
    chunk.logits = logits
    with torch.enable_grad():
        result = reference_head(head, chunk, steps, row_diagnostics)
        (grad,) = torch.autograd.grad(result.loss, logits)
    return ChunkResult(
        grad,
        result.values,
        result.prediction,
        result.teacher_predictions,
        per_token=result.per_token,
        diagnostics=result.diagnostics,
    )


class ReferenceBackend:
    """`HeadBackend` by the reference math: chunked over rows for a hidden-input head; on full rows
    (gathered from every rank's slice) under vocab parallel."""

    name = "torch"

    def __init__(self, options: BackendOptions):
        self.options = options

    def evaluate(self, head: HeadPlan, batch: HeadBatch, steps: Sequence[TermStep]) -> HeadResult:
        diagnostics = self.options.row_diagnostics
        if batch.linear is not None:

            def rows(chunk: HeadBatch, gradient: bool) -> ChunkResult:
                return reference_rows(head, chunk, steps, gradient, diagnostics)

            return linear_head(self.options, head, batch, steps, rows)
        if batch.shard is not None:
            full = replace(
                batch,
                logits=GatherVocab.apply(batch.logits, batch.shard),
                sources={
                    name: batch.forms[name].whole_vocab(value, lambda part: GatherVocab.apply(part, batch.shard))
                    for name, value in batch.sources.items()
                },
                shard=None,
            )
            return reference_head(head, full, steps, diagnostics)
        return reference_head(head, batch, steps, diagnostics)

    def __repr__(self) -> str:
        return "ReferenceBackend()"
