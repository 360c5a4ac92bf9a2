"""label_smoothing: the labels smoothed into a distribution, (1 - epsilon) one-hot + epsilon / V."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ...errors import quote
from ...kernels.fragments import TargetFragments
from ...spec.nodes import Name, SourceNode
from ..class_weights import KWeighted
from ..registry import source_kind
from ..source import Member, SourceKind, Target


class LabelSmoothingSource(SourceNode):
    """A labels source smoothed into a distribution: (1 - epsilon) one-hot + epsilon / V everywhere."""

    type: Literal["label_smoothing"] = Field(description="Source kind.")
    source: Name = Field(description="The `labels` source to smooth.")
    epsilon: float = Field(gt=0.0, lt=1.0, description="Mass spread uniformly over the vocabulary, in (0, 1).")


@dataclass(frozen=True)
class KSmoothed(TargetFragments):
    """In a kernel: (1 - epsilon) one-hot of the row's label + epsilon / V."""

    epsilon: float
    reads_labels = True

    def label_smoothing(self):
        return self.epsilon

    def p(self, k, slot):
        eps = repr(self.epsilon)
        return k.cached(
            f"p_smooth{k.constant_id(self.epsilon)}",
            f"tl.where({k.onehot()}, 1.0 - {eps} + {eps} / Vf, tl.where(in_v, {eps} / Vf, 0.0))",
        )

    def log_p(self, k, slot):
        eps = repr(self.epsilon)
        return k.cached(
            f"logp_smooth{k.constant_id(self.epsilon)}",
            f"tl.where({k.onehot()}, tl.log(1.0 - {eps} + {eps} / Vf), "
            f'tl.where(in_v, tl.log({eps} / Vf), float("-inf")))',
        )


@dataclass(frozen=True)
class SmoothedTarget(Target):
    """(1 - epsilon) one-hot(labels) + epsilon / V."""

    epsilon: float = 0.0
    labels: Target | None = None

    def leaves(self):
        return self.labels.leaves()

    def kernel_target(self, index):
        return KSmoothed(self.epsilon)

    def class_weighted(self, vector):
        return KWeighted(self.epsilon, vector)

    def log_probs(self, batch, vocab, temperature, dtype):
        import torch

        eps = self.epsilon
        log_p = torch.full((batch.mask.numel(), vocab), math.log(eps / vocab), dtype=dtype, device=batch.mask.device)
        return log_p.scatter(1, batch.labels[:, None], math.log(1.0 - eps + eps / vocab))


class LabelSmoothing(SourceKind):
    name = "label_smoothing"
    model = LabelSmoothingSource
    example = "smooth: {type: label_smoothing, source: labels, epsilon: 0.1}"
    checks = ("`source` must name the `labels` source.",)
    label_distribution = True

    def members(self, source):
        return [Member(source.source, ("source",), None)]

    def summary(self, spec, name, source):
        return f"label_smoothing of {source.source} (epsilon {source.epsilon:g})"

    def diagram_label(self, source):
        return f"eps {source.epsilon:g}"

    def check(self, name, source, spec):
        inner = spec.sources.get(source.source)
        if inner is not None and not source_kind(inner.type).provides_labels:
            message = f"label_smoothing smooths a labels source, but {quote(source.source)} is a {inner.type} source"
            return [(("source",), message)]
        return []

    def resolve(self, spec, name, source, inputs):
        ((_, labels),) = inputs
        return SmoothedTarget(name, source.epsilon, labels)


KIND = LabelSmoothing()
