"""The per-lane building blocks of pass 1 (kernels/primitives.py), through Triton's interpreter, against
torch in float64: a row streamed tile by tile in lanes of VEC columns gives the row's max, sum-exp and
first argmax, whatever the tiles and lanes the extremes fall in."""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the primitives run through Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton.language as tl  # noqa: E402
from fused_cases import interpreter_warnings  # noqa: E402
from lossgraph.kernels.primitives import (  # noqa: E402
    lane_argmax_update,
    lane_max,
    lane_softmax_update,
    lane_weights,
    row_argmax,
)

pytestmark = interpreter_warnings


@triton.jit
def row_statistics_kernel(x_ptr, out_ptr, index_ptr, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """One row: its max, its sum of exp(x - max) and its first argmax, by the per-lane primitives."""
    cols = tl.arange(0, BLOCK_V)
    m_lanes = tl.full([BLOCK_V // VEC], float("-inf"), tl.float32)
    sum_lanes = tl.zeros([BLOCK_V // VEC], dtype=tl.float32)
    best_lanes = tl.full([BLOCK_V // VEC], float("-inf"), tl.float32)
    start_lanes = tl.zeros([BLOCK_V // VEC], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(x_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x_max = lane_max(x, VEC)
        best_lanes, start_lanes = lane_argmax_update(best_lanes, start_lanes, x_max, start)
        m_lanes, sum_lanes, _, _ = lane_softmax_update(m_lanes, sum_lanes, x, x_max, VEC)
    m, weights = lane_weights(m_lanes)
    best, index = row_argmax(best_lanes, start_lanes, x_ptr, V, BLOCK_V, VEC)
    tl.store(out_ptr, m)
    tl.store(out_ptr + 1, tl.sum(sum_lanes * weights, 0))
    tl.store(out_ptr + 2, best)
    tl.store(index_ptr, index)


def statistics(row: torch.Tensor, block: int = 64, vec: int = 8) -> tuple[float, float, float, int]:
    out = torch.empty(3, dtype=torch.float32)
    index = torch.empty(1, dtype=torch.int64)
    row_statistics_kernel[(1,)](row, out, index, row.numel(), BLOCK_V=block, VEC=vec)
    return float(out[0]), float(out[1]), float(out[2]), int(index[0])


def expected(row: torch.Tensor) -> tuple[float, float, int]:
    wide = row.double()
    m = float(wide.max())
    total = float(torch.exp(wide - m).sum()) if math.isfinite(m) else 0.0
    return m, total, int(row.argmax())


@pytest.mark.parametrize("vocab", [1, 7, 64, 100, 1000, 1271])
@pytest.mark.parametrize("vec", [4, 8])
def test_max_sum_and_argmax_of_a_row(vocab, vec):
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    m, total, best, index = statistics(row, vec=vec)
    want_m, want_total, want_index = expected(row)
    assert m == want_m and best == want_m
    assert total == pytest.approx(want_total, rel=1e-6)
    assert index == want_index


@pytest.mark.parametrize(
    "places",
    [
        [3, 900],  # same lane position, different tiles: the earlier tile wins
        [900, 3],
        [130, 131],  # neighbours in one lane
        [131, 137],  # two lanes of one tile
        [999, 64, 512],  # several tiles and lanes
    ],
)
def test_ties_go_to_the_first_column_as_in_torch(places):
    row = torch.randn(1000, generator=torch.Generator().manual_seed(1)).clamp(max=5.0)
    row[places] = 7.5
    _, _, best, index = statistics(row)
    assert best == 7.5 and index == min(places) == int(row.argmax())


def test_a_row_of_minus_infinity_has_no_mass_and_argmax_zero():
    row = torch.full((100,), float("-inf"))
    m, total, best, index = statistics(row)
    assert m == float("-inf") and total == 0.0 and best == float("-inf") and index == 0


def test_minus_infinity_lanes_and_huge_logits():
    row = torch.full((300,), float("-inf"))
    row[250] = 1e4
    row[251] = 1e4 - 1.0
    m, total, _, index = statistics(row)
    assert m == 1e4 and index == 250
    assert total == pytest.approx(1 + math.exp(-1.0), rel=1e-6)
