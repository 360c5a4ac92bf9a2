"""Small Triton building blocks the generated fused kernels call."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def fast_exp(x):
    """exp(x) as one MUFU.EX2 of x log2(e) (plus one multiply, often folded into a neighbour).

    tl.exp lowers to the same ex2.approx but wraps it in four more instructions that produce results
    below 2^-126 as subnormals; here they flush to 0 (ex2.approx.ftz), which no sum, probability or
    gradient in these kernels can tell from a subnormal. The error elsewhere is tl.exp's own.
    """
    return tl.exp2(x * LOG2E)


# Pass 1 keeps every running statistic per lane. A tile of BLOCK_V columns is seen as BLOCK_V // VEC
# lanes of VEC contiguous columns, VEC being one 16-byte load of the logits: each lane lives in one
# thread, so reducing within a lane costs VEC - 1 register operations and no shuffle or barrier. The
# lanes are combined once per row, after the loop.


@triton.jit
def lanes_of(x, VEC: tl.constexpr):
    """A tile [BLOCK_V] as [lanes, VEC]: row l holds columns l * VEC ... l * VEC + VEC - 1."""
    return tl.reshape(x, (x.shape[0] // VEC, VEC))


@triton.jit
def lane_max(x, VEC: tl.constexpr):
    """Each lane's max of a tile (NaN is passed over, as tl.max does)."""
    return tl.max(lanes_of(x, VEC), 1)


@triton.jit
def lane_sum(x, VEC: tl.constexpr):
    """Each lane's sum of a tile, for row sums that are accumulated per lane and reduced once."""
    return tl.sum(lanes_of(x, VEC), 1)


@triton.jit
def lane_softmax_update(m, lanes, x, x_max, VEC: tl.constexpr):
    """Fold tile `x` (with its lane maxima `x_max`) into per-lane running maxima `m` and sums `lanes`
    of exp(x - m); also return the rescale factors exp(m_old - m_new) and the tile's exp terms, as
    [lanes, VEC].

    A running max of -inf (nothing finite seen yet) is replaced by 0 before subtracting, so that an
    all -inf lane gives exp(-inf) = 0 instead of exp(nan).
    """
    m_new = tl.maximum(m, x_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = fast_exp(m - m_safe)
    e = fast_exp(lanes_of(x, VEC) - m_safe[:, None])
    return m_new, lanes * rescale + tl.sum(e, 1), rescale, e


@triton.jit
def lane_centered_moment(lanes, m_old, m_new, sum_old, rescale, e, x, VEC: tl.constexpr):
    """Fold tile `x` into per-lane sums of exp(x_j - m) (x_j - m), centered on the lane's running max.

    Centering keeps the entropy exact for huge logits (H = log S - moment / S, no m - m cancels).
    When a lane's max grows from m_old to m_new, its old sum re-centers: each unit of old mass
    (`sum_old`, the lane's sum-exp before this tile) moves by (m_old - m_new) before the usual rescale.
    """
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(m_old == float("-inf"), 0.0, m_old - m_safe)
    centered = tl.where(e > 0, e * (lanes_of(x, VEC) - m_safe[:, None]), 0.0)
    return (lanes + shift * sum_old) * rescale + tl.sum(centered, 1)


@triton.jit
def lane_weights(m_lanes):
    """The row's max of per-lane maxima, and each lane's factor exp(m_lane - m) that brings its sums
    to the row's max (0 for a lane that saw only -inf)."""
    m = tl.max(m_lanes, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, fast_exp(m_lanes - m_safe)


@triton.jit
def row_centered_moment(moment_lanes, sum_lanes, m_lanes, m, weights):
    """The row's sum of exp(x_j - m) (x_j - m) from the lanes' moments centered on their own maxima:
    lane l's moves by (m_l - m) per unit of its mass before it is scaled to the row's max."""
    shift = tl.where(m_lanes == float("-inf"), 0.0, m_lanes - m)
    return tl.sum(tl.where(weights > 0, (moment_lanes + shift * sum_lanes) * weights, 0.0), 0)


@triton.jit
def lane_argmax_update(best_value, best_start, x_max, start):
    """Per lane, the largest value seen and the start of the first tile that holds it (strictly
    larger values move it, so an earlier tile wins ties, as in torch.argmax)."""
    better = x_max > best_value
    return tl.where(better, x_max, best_value), tl.where(better, start, best_start)


@triton.jit
def row_argmax(best_value, best_start, row_ptr, limit, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """The row's max and the first column holding it, from per-lane bests.

    Each lane whose best equals the row's max reads its VEC columns of the tile that holds it once
    more (one 16-byte load per thread, once per row) to find the column; the smallest such column
    wins. A row without any number (all NaN) gives column 0.
    """
    value = tl.max(best_value, 0)
    cols = best_start[:, None] + (tl.arange(0, BLOCK_V // VEC) * VEC)[:, None] + tl.arange(0, VEC)[None, :]
    holds = (best_value == value)[:, None] & (cols < limit)
    x = tl.load(row_ptr + cols, mask=holds, other=float("-inf")).to(tl.float32)
    found = tl.min(tl.min(tl.where(holds & (x == value), cols, 2147483647), 1), 0)
    return value, tl.where(found == 2147483647, 0, found)


@triton.jit
def log_sum_exp(x):
    """log(sum(exp(x))) of a vector; -inf when every entry is -inf."""
    m = tl.max(x, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.sum(fast_exp(x - m_safe), 0))


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)) elementwise, as max + log(1 + exp(min - max)): one exponential and one
    logarithm; -inf where both are -inf."""
    high = tl.maximum(a, b)
    low = tl.minimum(a, b)
    empty = high == float("-inf")
    return tl.where(empty, float("-inf"), high + tl.log(1.0 + fast_exp(tl.where(empty, 0.0, low - high))))


@triton.jit
def sign_of_difference(a, b):
    """sign(a - b) with sign(0) = 0 (the subgradient autograd uses for |x| at 0)."""
    return tl.where(a > b, 1.0, tl.where(a < b, -1.0, 0.0))


@triton.jit
def soft_cap(x, cap):
    """cap * tanh(x / cap) (logit soft-capping); -inf maps to -cap, as torch.tanh gives.

    tanh(u) = (1 - e^(-2|u|)) / (1 + e^(-2|u|)) with the sign of u, which cannot overflow; below
    |u| = 1/16, where that difference would cancel, the Taylor series to u^5 (error below 1e-9)."""
    u = x / cap
    a = tl.abs(u)
    e = tl.exp2(a * (-2.0 * LOG2E))
    large = (1.0 - e) / (1.0 + e)
    small = a * (1.0 - a * a * (0.3333333333333333 - a * a * 0.13333333333333333))
    t = tl.where(a < 0.0625, small, large)
    return cap * tl.where(u < 0, -t, t)


# Whether this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 when triton.jit decorated
# them): the interpreter has no rounding conversion to bfloat16 (below).
INTERPRETED = tl.constexpr(not isinstance(fast_exp, triton.runtime.jit.JITFunction))


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 x in `dtype`, rounded to nearest with ties to even: every value a kernel writes below
    float32 (a gradient in bfloat16 or float16) is rounded once, by this.

    A GPU converts with the rounding named (cvt.rn). Triton's interpreter truncates to bfloat16 whatever
    rounding is named, so there it is written out on the bits: add half a bfloat16 step minus one, plus
    the kept bit (ties go to even), and keep the upper 16 bits; a NaN stays a NaN, where a payload in its
    low bits alone would round into infinity. The interpreter's float16 conversion rounds to nearest even.
    """
    if dtype == tl.float32:
        return x
    elif INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, 0x7FC00000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype, fp_downcast_rounding="rtne")
