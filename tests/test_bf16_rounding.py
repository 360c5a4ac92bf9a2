"""A bfloat16 gradient is rounded once, to nearest with ties to even, on both backends.

- The fused kernels write every value below float32 through `round_to` (kernels/primitives.py): a GPU
  converts with cvt.rn, and Triton's interpreter, which truncates whatever rounding is named, rounds on
  the bits. So the interpreter and a GPU write the same bits.
- The reference backend converts a head's logits to float32 once: autograd sums the terms' gradients in
  float32 and rounds the sum once, where rounding each term and adding in bfloat16 was a step off.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from fused_cases import DEVICE, EXAMPLES, HAS_TRITON, interpreter_warnings, requires_fused
from helpers import random_labels, random_logits
from lossgraph.kernels import codegen, names
from lossgraph.kernels.codegen import PHASES, KernelGenerator

import lossgraph

pytestmark = interpreter_warnings

if HAS_TRITON:
    import triton
    import triton.language as tl
    from lossgraph.kernels.primitives import round_to

CE = """
version: 1
vocab_size: {vocab}
heads: {{next: {{offset: 1}}}}
sources: {{labels: {{type: labels}}}}
losses:
  lm: {{type: cross_entropy, heads: [next], target: labels}}
"""
CE_Z = CE + "  z: {{type: z_loss, heads: [next], weight: 1.0}}\n"
BACKENDS = ["torch", pytest.param("triton", marks=requires_fused)]


def gradient(text: str, backend: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    graph = lossgraph.compile(lossgraph.loads(text), backend=backend)
    logits = logits.detach().to(DEVICE).requires_grad_()
    graph({"next": logits}, labels=labels.to(DEVICE)).loss.backward()
    return logits.grad.cpu()


def bits(tensor: torch.Tensor) -> list[int]:
    return tensor.view(torch.int16).flatten().tolist()


# The two smallest cases that were a step off: the fused backend truncated CE's ±0.952574 to
# ±0.94921875, and the reference rounded CE's and z-loss's gradients one by one and added them in bf16
# (0.1806640625 where the exact 0.180084... rounds to 0.1796875).
SMALLEST = {
    "cross-entropy": (CE, [[0.0, 3.0]]),
    "cross-entropy-and-z-loss": (CE_Z, [[3.078125, -0.5859375]]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SMALLEST)
def test_the_smallest_cases_round_to_nearest(case: str, backend: str):
    text, rows = SMALLEST[case]
    logits = torch.tensor([rows], dtype=torch.bfloat16)  # [1, 1, 2]
    labels = torch.tensor([[0]])
    exact = gradient(text.format(vocab=2), "torch", logits.double(), labels)
    got = gradient(text.format(vocab=2), backend, logits, labels)
    assert bits(got) == bits(exact.to(torch.bfloat16)), (got.tolist(), exact.tolist())


@requires_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_round_to_gives_the_bits_of_torchs_conversion(dtype: torch.dtype):
    """Every float32 bit pattern class: halfway ties both ways, carries into the exponent, the largest
    finite values (some round to inf), subnormals, signed zeros, infinities, NaNs with any payload."""

    @triton.jit
    def write(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n)
        tl.store(y_ptr + offsets, round_to(x, y_ptr.dtype.element_ty), mask=offsets < n)

    generator = torch.Generator().manual_seed(0)
    special = [1.00390625, 1.01171875, 1.0078125 + 2**-8, 0.952574, 65519.0, 65520.0, 3.3961776e38, 3.4e38]
    special += [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40, -3e-39, 2**-149]
    x = torch.cat(
        [
            torch.tensor(special),
            torch.randn(4000, generator=generator) * torch.exp(torch.randn(4000, generator=generator) * 20),
            torch.randint(-(2**31), 2**31 - 1, (4000,), generator=generator, dtype=torch.int32).view(torch.float32),
        ]
    ).to(DEVICE)
    y = torch.empty(x.numel(), dtype=dtype, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy casts of inf and NaN
        write[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(dtype)
    integer = torch.int32 if dtype == torch.float32 else torch.int16
    same = (y.view(integer) == expected.view(integer)) | (y.isnan() & expected.isnan())
    assert bool(same.all()), x[~same][:8].tolist()


MULTI_TERM = """
version: 1
vocab_size: 1271
heads: {next: {offset: 1}}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
  smooth: {type: label_smoothing, source: labels, epsilon: 0.1}
losses:
  lm: {type: cross_entropy, heads: [next], target: smooth}
  kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}
  rkl: {type: reverse_kl, heads: [next], target: teacher, weight: 0.25}
  z: {type: z_loss, heads: [next], weight: 0.01}
"""


def test_the_reference_rounds_a_heads_gradient_once():
    """The reference's bf16 gradient of a four-term head is its float32 gradient (same values) rounded
    once to nearest, bit for bit."""
    logits = random_logits(2, 5, 1271, scale=3.0, dtype=torch.bfloat16, seed=3)
    teacher = random_logits(2, 5, 1271, scale=2.0, dtype=torch.bfloat16, seed=4)
    labels = random_labels(2, 5, vocab=1271)
    graph = lossgraph.compile(lossgraph.loads(MULTI_TERM), backend="torch")
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        student = logits.detach().to(dtype).requires_grad_()
        graph({"next": student}, labels=labels, teachers={"teacher": teacher.to(dtype)}).loss.backward()
        grads[dtype] = student.grad
    assert bits(grads[torch.bfloat16]) == bits(grads[torch.float32].to(torch.bfloat16))


def example_kernel_sources() -> list[str]:
    """The generated source of every launch of every example graph, in every phase."""
    sources = []
    for path in EXAMPLES:
        graph = lossgraph.compile(lossgraph.load(path), backend="torch")
        for launch in graph.fusion.launches:
            for phase in PHASES:
                sources.append(KernelGenerator(launch.kernel_spec(), phase).source())
    return sources


def test_every_downcast_a_kernel_writes_names_its_rounding():
    """No kernel converts to the gradient's dtype (or to bf16 / fp16) but through round_to."""
    sources = example_kernel_sources()
    sources.append(Path(codegen.__file__).with_name("scale.py").read_text(encoding="utf-8"))
    assert sources
    downcast = re.compile(r"\.to\((?:[a-z_]+\.dtype\.element_ty|tl\.bfloat16|tl\.float16)\)")
    for source in sources:
        assert not downcast.findall(source), downcast.findall(source)
    assert any(f"round_to({names.GRAD}, grad_ptr.dtype.element_ty)" in source for source in sources)
    assert "round_to" in codegen.PRIMITIVES
