"""Small Triton building blocks the generated fused kernels call."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_update(m, s, x):
    """Fold tile `x` into the running (max m, sum s of exp(x - m)); also return the tile's exp terms.

    A running max of -inf (nothing finite seen yet) is replaced by 0 before subtracting, so that an
    all -inf tile gives exp(-inf) = 0 instead of exp(nan).
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    return m_new, s * rescale + tl.sum(e, 0), rescale, e


@triton.jit
def online_centered_moment(moment, m_old, m_new, sum_old, rescale, e, x):
    """Fold tile `x` into moment = sum_j exp(x_j - m) (x_j - m), centered on the running max m.

    Centering keeps the entropy exact for huge logits (H = log S - moment / S, no m - m cancels).
    When the max grows from m_old to m_new, the old sum re-centers: each unit of old mass moves by
    (m_old - m_new) before the usual rescale by exp(m_old - m_new).
    """
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(m_old == float("-inf"), 0.0, m_old - m_safe)
    return (moment + shift * sum_old) * rescale + tl.sum(tl.where(e > 0, e * (x - m_safe), 0.0), 0)


@triton.jit
def online_argmax_update(best_value, best_index, x, start):
    """Running argmax over tiles; the first index wins ties, as in torch.argmax."""
    tile_max = tl.max(x, 0)
    tile_index = tl.argmax(x, 0) + start
    better = tile_max > best_value
    return tl.where(better, tile_max, best_value), tl.where(better, tile_index, best_index)


@triton.jit
def log_sum_exp(x):
    """log(sum(exp(x))) of a vector; -inf when every entry is -inf."""
    m = tl.max(x, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.sum(tl.exp(x - m_safe), 0))


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)) elementwise, as max + log(1 + exp(min - max)): one exponential and one
    logarithm; -inf where both are -inf."""
    high = tl.maximum(a, b)
    low = tl.minimum(a, b)
    empty = high == float("-inf")
    return tl.where(empty, float("-inf"), high + tl.log(1.0 + tl.exp(tl.where(empty, 0.0, low - high))))


@triton.jit
def sign_of_difference(a, b):
    """sign(a - b) with sign(0) = 0 (the subgradient autograd uses for |x| at 0)."""
    return tl.where(a > b, 1.0, tl.where(a < b, -1.0, 0.0))
