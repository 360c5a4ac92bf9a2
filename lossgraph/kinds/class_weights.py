"""Per-class weights of the labels' distribution (cross_entropy's `class_weights`), as torch's
`F.cross_entropy(weight=w, label_smoothing=eps)` defines them.

With class weights w [V] (W = sum_j w_j), label y and smoothing eps (0 for a plain `labels` target), the
labels' distribution p (one-hot, or (1 - eps) one-hot + eps / V) becomes the unnormalized target

    p~_j = w_j p_j,  of mass  M = sum_j p~_j = (1 - eps) w_y + (eps / V) W

and cross-entropy against it is l = -sum_j p~_j log q_j, with dl/ds_j = M q_j - p~_j. The kernel form
below is that target: `KWeighted` wraps the labels' own forms (`KLabels` at eps 0, `KSmoothed`) with the
index of a class-weight vector of the launch (`cw{c}_ptr` [V_total] float32 by global token id, and its
sum W at `cw_sum{c}_ptr`). Only cross_entropy reads it (`CrossEntropyFragments`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels.fragments import TargetFragments


@dataclass(frozen=True)
class KWeighted(TargetFragments):
    """In a kernel: the labels' distribution (one-hot at epsilon 0, else smoothed) weighted per class by
    class-weight vector `vector` of the launch: p~_j = w_j p_j, unnormalized."""

    epsilon: float
    vector: int
    reads_labels = True

    def class_weight_vectors(self) -> tuple[int, ...]:
        return (self.vector,)

    def p(self, k, slot):
        """p~_j = (1 - eps) w_y [j = y] + (eps / V) w_j."""
        w_y = k.label_class_weight(self.vector)
        if self.epsilon == 0.0:
            return k.cached(f"pw{self.vector}", f"tl.where({k.onehot()}, {w_y}, 0.0)")
        eps = repr(self.epsilon)
        w = k.class_weight_tile(self.vector)
        return k.cached(
            f"pw{self.vector}_{k.constant_id(self.epsilon)}",
            f"tl.where({k.onehot()}, (1.0 - {eps}) * {w_y}, 0.0) + ({eps} / Vf) * {w}",
        )

    def log_p(self, k, slot):
        raise NotImplementedError("class-weighted labels are an unnormalized target: only cross_entropy reads them")

    def mass(self, k) -> str:
        """M = sum_j p~_j = (1 - eps) w_y + (eps / V) W, per row."""
        w_y = k.label_class_weight(self.vector)
        if self.epsilon == 0.0:
            return w_y
        eps = repr(self.epsilon)
        return f"((1.0 - {eps}) * {w_y} + ({eps} / Vf) * {k.class_weight_sum(self.vector)})"

    def label_part(self, k) -> str:
        """(1 - eps) w_y: the part of p~ at the label's column only."""
        w_y = k.label_class_weight(self.vector)
        return w_y if self.epsilon == 0.0 else f"(1.0 - {self.epsilon!r}) * {w_y}"

    def spread(self) -> str:
        """eps / V: p~_j's coefficient of w_j at every column (the smoothing part)."""
        return f"({self.epsilon!r} / Vf)"
