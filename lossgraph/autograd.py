"""The autograd Function that connects a loss computed together with its gradient to autograd."""

from __future__ import annotations

import torch


class PrecomputedGradient(torch.autograd.Function):
    """`loss` whose gradient with respect to `logits` is already known (`grad`, same shape).

    forward returns the loss and keeps the gradient; backward multiplies the kept gradient by the
    incoming scalar, in place (the buffer serves one backward), and hands it to the logits. The fused
    kernel computes loss and gradient in one launch, so backward never reads the logits again.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, in_place: bool) -> torch.Tensor:
        if in_place:
            # `grad` is the logits' own storage: saved tensors would check its version counter, which
            # the in-place kernel of a later head (logits that are views of one tensor) bumps
            ctx.grad = grad
        else:
            ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = ctx.grad if hasattr(ctx, "grad") else ctx.saved_tensors[0]
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None
