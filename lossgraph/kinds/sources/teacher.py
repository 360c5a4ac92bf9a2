"""teacher: dense teacher logits given at run time (a tensor, or a callable such as a frozen model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ...errors import quote
from ...kernels.fragments import TargetFragments
from ...spec.nodes import TeacherNode
from ..math import map_vocab
from ..source import DENSE, SourceKind, Target


class TeacherSource(TeacherNode):
    """Dense teacher logits given at run time (a tensor, or a callable such as a frozen model)."""

    type: Literal["teacher"] = Field(description="Source kind.")


@dataclass(frozen=True)
class KDense(TargetFragments):
    """In a kernel: the softmax of dense teacher `teacher` (an index into KernelSpec.dense) at the slot."""

    teacher: int

    def dense_teachers(self):
        return (self.teacher,)

    def single_teacher(self):
        return self.teacher

    def p(self, k, slot):
        return k.cached(f"p_t{self.teacher}_{slot}", f"tl.exp2({self.log2_p(k, slot)})")

    def log_p(self, k, slot):
        return k.teacher_log_p(self.teacher, slot)

    def log2_p(self, k, slot):
        return k.teacher_log2_p(self.teacher, slot)


@dataclass(frozen=True)
class DenseTarget(Target):
    """Dense teacher logits, mapped onto the head's vocab (`truncate`, `pad` or none)."""

    vocab_size: int = 0
    vocab_map: str | None = None
    form = DENSE

    def kernel_target(self, index):
        return KDense(index.dense[self.name])

    def log_probs(self, batch, vocab, temperature, dtype):
        import torch

        teacher = map_vocab(batch.teachers[self.name].to(dtype), vocab)
        teacher = torch.where(batch.mask[:, None], teacher, 0.0)
        return torch.log_softmax(teacher / temperature, dim=-1)

    def rows_finite(self, batch, vocab):
        import torch

        teacher = map_vocab(batch.teachers[self.name], vocab)
        return torch.logsumexp(teacher.to(torch.float64), dim=-1).isfinite()


class Teacher(SourceKind):
    name = "teacher"
    model = TeacherSource
    example = "teacher: {type: teacher, vocab_size: 32064, vocab_map: truncate}"
    checks = (
        "`offset` must equal the offset of every head the teacher is compared with, also through a mixture.",
        "When the teacher's vocabulary differs from a head's, `vocab_map` is required: `truncate` when the "
        "teacher's is larger, `pad` when it is smaller. The other value is an error.",
    )
    is_teacher = True

    def summary(self, spec, name, source):
        return teacher_summary(spec, name, source, [])

    def zero_mass_reason(self, name, source, member_reasons, spec):
        return f"teacher {quote(name)} pads its vocab with zero mass" if source.vocab_map == "pad" else None

    def resolve(self, spec, name, source, inputs):
        return DenseTarget(name, spec.source_vocab(name), source.vocab_map)


def teacher_summary(spec, name: str, source, first: list[str]) -> str:
    """`teacher (offset 1, vocab 32000)`, with `first` details before the offset."""
    parts = [*first, f"offset {source.offset}", f"vocab {spec.source_vocab(name)}"]
    if source.vocab_map:
        parts.append(f"vocab_map {source.vocab_map}")
    return f"{source.type} ({', '.join(parts)})"


KIND = Teacher()
