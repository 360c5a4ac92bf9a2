"""labels: the dataset's next-token labels, a one-hot target; they also define the token mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ...errors import quote
from ...kernels.fragments import TargetFragments
from ...spec.nodes import MAX_INDEX, MIN_INDEX, SourceNode
from ..class_weights import KWeighted
from ..form import LeafForm
from ..source import LABELS, SourceKind, Target


class LabelsSource(SourceNode):
    """The dataset's next-token labels (hard targets). Also defines which positions count (the mask)."""

    type: Literal["labels"] = Field(description="Source kind.")
    ignore_index: Annotated[int, Field(ge=MIN_INDEX, le=MAX_INDEX)] = Field(
        -100, description="Label value of positions that take no loss (a 32-bit integer)."
    )


@dataclass(frozen=True)
class KLabels(TargetFragments):
    """In a kernel: one-hot of the row's label."""

    reads_labels = True

    def label_smoothing(self):
        return 0.0

    def p(self, k, slot):
        return k.cached("p_labels", f"tl.where({k.onehot()}, 1.0, 0.0)")

    def log_p(self, k, slot):
        return k.cached("logp_labels", f'tl.where({k.onehot()}, 0.0, float("-inf"))')


@dataclass(frozen=True)
class LabelsTarget(Target):
    """Hard next-token labels (a one-hot distribution)."""

    ignore_index: int = -100
    form = LABELS
    hard_labels = True

    def kernel_target(self, index):
        return KLabels()

    def class_weighted(self, vector):
        return KWeighted(0.0, vector)

    def log_probs(self, batch, vocab, temperature, dtype):
        import torch

        log_p = torch.full((batch.mask.numel(), vocab), -math.inf, dtype=dtype, device=batch.mask.device)
        return log_p.scatter(1, batch.labels[:, None], 0.0)


class LabelsForm(LeafForm):
    """At run time: the call's `labels=` (checked, shifted per head and masked by `runtime.inputs`, since
    they also define the token mask); no value of its own in `teachers=`."""

    name = LABELS
    takes_value = False


class Labels(SourceKind):
    name = "labels"
    model = LabelsSource
    example = "labels: {type: labels, ignore_index: -100}"
    checks = (
        "A graph has at most one `labels` source: it reads one labels tensor.",
        "The labels also define the token mask: positions whose label is `ignore_index` take no loss, on every head.",
    )
    note = (
        "One `labels` source serves every head: the head of offset d at position s reads label y[s + d − 1]. "
        "Positions past the end of the sequence, or across a document boundary, take no loss."
    )
    provides_labels = True
    label_distribution = True

    def summary(self, spec, name, source):
        return f"labels (ignore_index {source.ignore_index})"

    def zero_mass_reason(self, name, source, member_reasons, spec):
        return f"{quote(name)} holds hard labels"

    def resolve(self, spec, name, source, inputs):
        return LabelsTarget(name, source.ignore_index)


KIND = Labels()
FORM = LabelsForm()
