"""Fused-linear heads: losses from hidden states and the head's weight, chunk by chunk.

For a head declared `input: hidden`, the logits of all positions are never held at once. Per chunk
of rows, `logits = hidden @ weight.T + bias` is computed, the head's terms are evaluated on it (by the
fused kernel in place, or by the reference math), and the chunk's logits gradient is folded into
`grad_hidden` and `grad_weight` right away:

    grad_hidden[rows] = grad_logits @ weight        grad_weight += grad_logits.T @ hidden[rows]
    grad_bias += grad_logits.sum(0)

so the extra memory is one chunk of logits (and of each teacher given as hidden states), plus the
gradients themselves. Backward only scales the gradients by the incoming scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..compiler.fusion import chunk_rows
from ..compiler.plan import HeadPlan
from .autograd import scale_
from .backend import BackendOptions, HeadResult, RowsEvaluator, TermStep, weighted_sum
from .inputs import HeadBatch, Linear


class LinearHeadLoss(torch.autograd.Function):
    """A loss whose gradients with respect to hidden, weight and bias are computed in forward.

    `compute()` runs the chunked evaluation and returns (loss, grad_hidden, grad_weight, grad_bias), each
    gradient None when its input needs none; backward scales the kept gradients by the incoming scalar,
    in place.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, compute):
        loss, grad_hidden, grad_weight, grad_bias = compute()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                scale_(grad, scale)
        return grad_hidden, grad_weight, grad_bias, None


def _needs_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and torch.is_grad_enabled() and tensor.requires_grad


def linear_head(
    options: BackendOptions,
    head: HeadPlan,
    batch: HeadBatch,
    steps: Sequence[TermStep],
    evaluate_rows: RowsEvaluator,
) -> HeadResult:
    """Evaluate a hidden-input head chunk by chunk (`options.chunk_size` rows, `options.accumulate_fp32`).

    `evaluate_rows(chunk, gradient)` evaluates a chunk's logits, with their gradient when `gradient`.
    Only the gradients that autograd will ask for are computed: a frozen weight (requires_grad=False)
    costs no grad_weight product, hidden states that need no gradient no grad_hidden product, and under
    torch.no_grad no chunk writes a logits gradient at all.
    """
    hidden, weight, bias = batch.linear
    # read here: autograd runs Function.forward (and so `compute`) with gradients disabled
    need_hidden, need_weight, need_bias = _needs_grad(hidden), _needs_grad(weight), _needs_grad(bias)
    gradient = need_hidden or need_weight or need_bias
    rows = hidden.shape[0]
    linear_teachers = [value.weight.shape[0] for value in batch.sources.values() if isinstance(value, Linear)]
    size = options.chunk_size or chunk_rows(head.vocab_size, linear_teachers, hidden.element_size())
    fp32 = options.accumulate_fp32
    outputs: dict[str, object] = {}

    def compute():
        wide = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for float64 weights
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=wide if fp32 else weight.dtype, device=weight.device)
        grad_bias = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_bias else None
        values, predictions, teachers, per_token, diagnostics = None, [], {}, [], []
        for start in range(0, rows, size):
            stop = min(rows, start + size)
            block = hidden[start:stop].detach()
            with torch.no_grad():
                logits = torch.nn.functional.linear(block, weight.detach(), None if bias is None else bias.detach())
            result = evaluate_rows(batch.rows(start, stop, logits), gradient)
            if gradient:
                grad = result.grad.to(hidden.dtype)
                if grad_hidden is not None:
                    torch.mm(grad, weight.detach(), out=grad_hidden[start:stop])
                if grad_weight is not None and fp32:
                    grad_weight.addmm_(grad.t().to(wide), block.to(wide))
                elif grad_weight is not None:
                    grad_weight.addmm_(grad.t(), block)
                if grad_bias is not None:
                    grad_bias += grad.sum(0, dtype=wide)
            values = result.values.detach() if values is None else values + result.values.detach()
            predictions.append(result.prediction)
            per_token.append(result.per_token)
            if result.diagnostics is not None:
                diagnostics.append(result.diagnostics)
            for name, predicted in result.teacher_predictions.items():
                teachers.setdefault(name, []).append(predicted)
        if values is None:  # no rows at all
            values = torch.zeros(len(head.terms), dtype=torch.float32, device=hidden.device)
            empty = torch.zeros(0, dtype=torch.int64, device=hidden.device)
            predictions, teachers = [empty], {name: [empty] for name, form in batch.forms.items() if form.predicts}
            per_token = [torch.zeros(0, len(head.terms), dtype=torch.float32, device=hidden.device)]
        outputs["values"] = values
        outputs["prediction"] = torch.cat(predictions)
        outputs["per_token"] = torch.cat(per_token)
        outputs["diagnostics"] = torch.cat(diagnostics) if diagnostics else None
        outputs["teachers"] = {name: torch.cat(parts) for name, parts in teachers.items()}
        return weighted_sum(values, steps), grad_hidden, grad_weight, grad_bias

    if gradient:
        loss = LinearHeadLoss.apply(hidden, weight, bias, compute)
    else:
        loss = compute()[0]
    return HeadResult(
        loss,
        outputs["values"],
        outputs["prediction"],
        outputs["teachers"],
        outputs["per_token"],
        outputs["diagnostics"],
    )
