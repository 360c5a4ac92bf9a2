"""The backward's in-place scale kernel against float64 math, through the interpreter (or on the GPU)."""

from __future__ import annotations

import pytest
import torch
from fused_cases import DEVICE, interpreter_warnings, requires_fused

pytestmark = [*interpreter_warnings, requires_fused]

BLOCK = 4096


def scale_in_place(buffer, scale, programs=None):
    from lossgraph.kernels.scale import scale_in_place

    return scale_in_place(buffer, torch.tensor(scale, dtype=torch.float32, device=buffer.device), programs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("programs", [None, 2], ids=["default-grid", "two-programs"])
def test_scale_matches_float64(dtype, programs):
    """5 blocks and a ragged tail: with two programs each strides over several blocks."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(5 * BLOCK + 123, generator=generator, dtype=torch.float64)
    buffer = values.to(dtype).to(DEVICE)
    expected = buffer.double().cpu() * 0.375
    scale_in_place(buffer, 0.375, programs)
    # one unit of the dtype: Triton's interpreter rounds float32 to bfloat16 by truncation
    torch.testing.assert_close(buffer.cpu().double(), expected, rtol=torch.finfo(dtype).eps, atol=0)


def test_scale_one_leaves_the_buffer_untouched():
    buffer = torch.full((3 * BLOCK + 7,), float("nan"), dtype=torch.float16, device=DEVICE)
    buffer[::2] = 1.5
    before = buffer.clone()
    scale_in_place(buffer, 1.0, programs=2)
    assert torch.equal(buffer.isnan(), before.isnan()) and torch.equal(buffer[::2], before[::2])


def test_a_large_scale_is_applied_in_float32():
    """65536 x 2^-20 fits float16; 65536 alone would not have been representable after a float16 product."""
    buffer = torch.full((BLOCK + 1,), 2.0**-20, dtype=torch.float16, device=DEVICE)
    scale_in_place(buffer, 65536.0)
    assert torch.equal(buffer.cpu(), torch.full((BLOCK + 1,), 2.0**-4, dtype=torch.float16))
