"""Scaling a gradient buffer in place by a scalar that lives on the device (backward of a fused loss).

The scale (the incoming gradient of the loss: 1, or a gradient scaler's factor) is read by the kernel
itself, so the host never synchronizes to look at it, and the multiplication happens in float32, so a
scale such as 65536 does not overflow a float16 buffer before it is applied. When the scale is exactly
1, every program returns after reading it: the common backward costs no pass over the buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def scale_in_place_kernel(buffer_ptr, scale_ptr, elements, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < elements
        values = tl.load(buffer_ptr + offsets, mask=inside).to(tl.float32)
        tl.store(buffer_ptr + offsets, (values * scale).to(buffer_ptr.dtype.element_ty), mask=inside)


def scale_in_place(buffer: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """buffer *= scale (a 0-d float32 tensor on the buffer's device); `buffer` must be contiguous."""
    elements = buffer.numel()
    if elements:
        scale_in_place_kernel[(triton.cdiv(elements, BLOCK),)](buffer, scale, elements, BLOCK=BLOCK)
    return buffer
