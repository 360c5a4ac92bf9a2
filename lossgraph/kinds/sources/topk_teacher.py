"""topk_teacher: an offline teacher stored as the ids and log-probabilities of its top-k tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ...errors import quote
from ...kernels.signature import KTopK
from ...spec.nodes import MAX_TOPK, TeacherNode
from ...spec.schedules import fixed_at_one
from ..source import TOPK, SourceKind, Target
from .teacher import teacher_summary


class TopKTeacherSource(TeacherNode):
    """Offline teacher: the indices and log-probabilities (at temperature 1) of its top-k tokens."""

    type: Literal["topk_teacher"] = Field(description="Source kind.")
    k: Annotated[int, Field(ge=1, le=MAX_TOPK)] = Field(
        description="Number of tokens stored per position (at most the teacher's vocab size)."
    )
    tail: Literal["renormalize", "bucket"] = Field(
        "renormalize",
        description=(
            "`renormalize`: compare teacher and student renormalized over the k stored tokens; "
            "`bucket`: add one bucket holding the remaining mass of each."
        ),
    )


@dataclass(frozen=True)
class TopKTarget(Target):
    """A teacher known on k tokens per position: indices and log-probs at temperature 1."""

    k: int = 1
    tail: str = "renormalize"
    vocab_size: int = 0
    form = TOPK

    def kernel_target(self, index):
        return KTopK(index.topk[self.name], self.tail)

    def rows_finite(self, batch, vocab):
        import torch

        return torch.logsumexp(batch.topk[self.name].logprobs.to(torch.float64), dim=-1).isfinite()


class TopKTeacher(SourceKind):
    name = "topk_teacher"
    model = TopKTeacherSource
    example = "cached: {type: topk_teacher, k: 64, tail: bucket}"
    checks = (
        "`k` may not exceed the teacher's vocabulary size.",
        "`offset` and `vocab_map` follow the same rules as for `teacher`.",
        "With `tail: bucket`, a loss that targets it must use temperature 1 (and teacher_temperature 1, if "
        "given): the tail mass cannot be re-tempered.",
        "A top-k teacher cannot be part of a `mixture` (its distribution is known on k tokens only); give it "
        "a loss node of its own.",
    )
    note = (
        "With `tail: renormalize`, the teacher's and the student's probabilities are both renormalized over "
        "the k stored tokens and compared there. With `tail: bucket`, each side gets one extra bucket that "
        "holds its mass outside the k tokens, and the k + 1 values are compared."
    )
    is_teacher = True

    def summary(self, spec, name, source):
        return teacher_summary(spec, name, source, [f"k {source.k}, tail {source.tail}"])

    def diagram_label(self, source):
        return f"k {source.k}, {source.tail}"

    def check(self, name, source, spec):
        vocab = spec.source_vocab(name)
        if vocab is not None and source.k > vocab:
            return [(("k",), f"k = {source.k} exceeds the teacher's vocab size {vocab}")]
        return []

    def mixture_member_problem(self, name):
        return (
            f"a mixture cannot contain the top-k teacher {quote(name)}: its distribution is known on k tokens only; "
            "give it a loss node of its own"
        )

    def check_loss(self, name, source, loss):
        if source.tail != "bucket":
            return []
        problems = []
        for field in ("temperature", "teacher_temperature"):
            value = getattr(loss, field, None)
            if value is not None and not fixed_at_one(value):
                problems.append(
                    (
                        field,
                        f"top-k teacher {quote(name)} uses tail: bucket, whose tail mass cannot be re-tempered; "
                        f"use {field} 1, or tail: renormalize",
                    )
                )
        return problems

    def resolve(self, spec, name, source, inputs):
        return TopKTarget(name, source.k, source.tail, spec.source_vocab(name))


KIND = TopKTeacher()
