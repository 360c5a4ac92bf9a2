"""Scaling a gradient buffer in place by a scalar that lives on the device (backward of a fused loss).

The scale (the incoming gradient of the loss: 1, or a gradient scaler's factor) is read by the kernel
itself, so the host never synchronizes to look at it, and the multiplication happens in float32, so a
scale such as 65536 does not overflow a float16 buffer before it is applied.

The grid is persistent: a few programs per multiprocessor, each striding over the buffer's blocks. When
the scale is exactly 1 (the common backward) each program returns after reading it, so the launch costs
a few hundred tiny programs instead of one per block of an N x V buffer.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .interpreter_lock import launch_guard
from .primitives import round_to

BLOCK = 4096
PROGRAMS_PER_MULTIPROCESSOR = 4


@triton.jit
def scale_in_place_kernel(buffer_ptr, scale_ptr, elements, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        # int64 offsets: N x V buffers pass 2^31 elements
        first = tl.program_id(0).to(tl.int64) * BLOCK
        stride = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(first, elements, stride):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < elements
            values = tl.load(buffer_ptr + offsets, mask=inside).to(tl.float32)
            tl.store(buffer_ptr + offsets, round_to(values * scale, buffer_ptr.dtype.element_ty), mask=inside)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count (asked once per device, on first use)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def scale_in_place(buffer: torch.Tensor, scale: torch.Tensor, programs: int | None = None) -> torch.Tensor:
    """buffer *= scale (a 0-d float32 tensor on the buffer's device); `buffer` must be contiguous.

    `programs` caps the grid (default: PROGRAMS_PER_MULTIPROCESSOR per multiprocessor)."""
    elements = buffer.numel()
    if elements:
        cap = programs or PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(buffer.device)
        grid = (min(triton.cdiv(elements, BLOCK), cap),)
        with launch_guard(scale_in_place_kernel):
            scale_in_place_kernel[grid](buffer, scale, elements, BLOCK=BLOCK)
    return buffer
