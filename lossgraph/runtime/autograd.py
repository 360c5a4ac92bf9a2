"""The autograd Function that connects a loss computed together with its gradient to autograd."""

from __future__ import annotations

import torch


def _scale(buffer: torch.Tensor, scale: torch.Tensor) -> None:
    """buffer *= scale, computed in float32 whatever the buffer's dtype; no host synchronization.

    On a GPU a Triton kernel reads the scale on the device (and skips the work when it is 1); on the
    CPU the scale is read directly, which costs nothing there.
    """
    if buffer.device.type == "cuda" and buffer.is_contiguous():
        from ..kernels.scale import scale_in_place

        scale_in_place(buffer, scale.to(device=buffer.device, dtype=torch.float32).reshape(()))
    else:
        factor = float(scale)
        if factor != 1.0:
            buffer.copy_(buffer.to(torch.float32).mul_(factor))


# opaque to torch.compile; eager calls skip the custom op's dispatch, which costs more host time than
# the launch it wraps
_scale_op = torch.library.custom_op("lossgraph::scale_", _scale, mutates_args=("buffer",))


@_scale_op.register_fake
def _scale_fake(buffer, scale):
    return None


def scale_(buffer: torch.Tensor, scale: torch.Tensor) -> None:
    """buffer *= scale (see `_scale`): the custom op inside torch.compile, the function itself in eager."""
    if torch.compiler.is_compiling():
        _scale_op(buffer, scale)
    else:
        _scale(buffer, scale)


class PrecomputedGradient(torch.autograd.Function):
    """`loss` whose gradient with respect to `logits` is already known (`grad`, same shape).

    forward returns the loss and keeps the gradient; backward multiplies the kept gradient by the
    incoming scalar (and by `grad_scale`, a factor left out of the buffer), in place: the buffer serves
    one backward. The fused kernel computes loss and gradient in one launch, so backward never reads
    the logits again.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        loss: torch.Tensor,
        grad: torch.Tensor,
        in_place: bool,
        grad_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if in_place:
            # `grad` is the logits' own storage: saved tensors would check its version counter, which
            # the in-place kernel of a later head (logits that are views of one tensor) bumps
            ctx.grad = grad
            ctx.save_for_backward(grad_scale)
        else:
            ctx.save_for_backward(grad_scale, grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = ctx.saved_tensors
        grad = ctx.grad if hasattr(ctx, "grad") else saved[1]
        scale = grad_output.to(torch.float32)
        if saved[0] is not None:
            scale = scale * saved[0]
        scale_(grad, scale)
        return grad, None, None, None, None
