"""Small Triton building blocks the generated fused kernels call."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)


@triton.jit
def fast_exp(x):
    """exp(x) as one MUFU.EX2 of x log2(e) (plus one multiply, often folded into a neighbour).

    tl.exp lowers to the same ex2.approx but wraps it in four more instructions that produce results
    below 2^-126 as subnormals; here they flush to 0 (ex2.approx.ftz), which no sum, probability or
    gradient in these kernels can tell from a subnormal. The error elsewhere is tl.exp's own.
    """
    return tl.exp2(x * LOG2E)



@triton.jit
def lane_softmax_update(m, lanes, x):
    """Fold tile `x` into a running max `m` (a scalar) and per-lane sums `lanes` of exp(x - m); also
    return the rescale factor exp(m_old - m_new) and the tile's exp terms.

    One block reduction per tile (the max); the lanes are summed once the row is read. A running max of
    -inf (nothing finite seen yet) is replaced by 0 before subtracting, so that an all -inf tile gives
    exp(-inf) = 0 instead of exp(nan).
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = fast_exp(m - m_safe)
    e = fast_exp(x - m_safe)
    return m_new, lanes * rescale + e, rescale, e


@triton.jit
def lane_centered_moment(lanes, m_old, m_new, sum_old, rescale, e, x):
    """Fold tile `x` into per-lane sums of exp(x_j - m) (x_j - m), centered on the running max m.

    Centering keeps the entropy exact for huge logits (H = log S - moment / S, no m - m cancels).
    When the max grows from m_old to m_new, the old sums re-center: each unit of old mass (`sum_old`,
    the lanes' sum-exp before this tile) moves by (m_old - m_new) before the usual rescale.
    """
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(m_old == float("-inf"), 0.0, m_old - m_safe)
    return (lanes + shift * sum_old) * rescale + tl.where(e > 0, e * (x - m_safe), 0.0)


@triton.jit
def tile_argmax_update(best_value, best_index, x, index):
    """Running argmax over tiles: the tile's max (the same reduction the softmax state takes of an
    unscaled tile) and the first index holding it; an earlier tile wins ties, as in torch.argmax."""
    tile_max = tl.max(x, 0)
    tile_index = tl.min(tl.where(x == tile_max, index, 2147483647), 0)
    better = tile_max > best_value
    return tl.where(better, tile_max, best_value), tl.where(better, tile_index, best_index)


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
