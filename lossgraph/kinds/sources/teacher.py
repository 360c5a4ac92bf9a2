"""teacher: dense teacher logits given at run time (a tensor, or a callable such as a frozen model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import Field

from ...errors import InputError, quote
from ...kernels.fragments import TargetFragments
from ...spec.nodes import TeacherNode
from ..form import LeafForm
from ..math import map_vocab
from ..source import DENSE, SourceKind, Target

if TYPE_CHECKING:
    import torch


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
    vocab_columns = True

    def kernel_target(self, index):
        return KDense(index.positions[self.name])

    def read_bytes(self, head_vocab, vocab_override, logits_bytes):
        return min(head_vocab, vocab_override or self.vocab_size) * logits_bytes

    def log_probs(self, batch, vocab, temperature, dtype):
        import torch

        teacher = map_vocab(batch.sources[self.name].to(dtype), vocab)
        teacher = torch.where(batch.mask[:, None], teacher, 0.0)
        return torch.log_softmax(teacher / temperature, dim=-1)

    def rows_finite(self, batch, vocab):
        import torch

        teacher = map_vocab(batch.sources[self.name], vocab)
        return torch.logsumexp(teacher.to(torch.float64), dim=-1).isfinite()


class Linear(NamedTuple):
    """Hidden states `[.., H]` and an output layer (`weight [V, H]`, optional `bias [V]`).

    Given for a head declared `input: hidden`, the loss is computed chunk by chunk without holding all
    logits; given as a teacher, it stands for the teacher's logits `hidden @ weight.T + bias`.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def teacher_logits(value: torch.Tensor | Linear, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of a dense teacher's logits (computed, without gradient, for a Linear)."""
    import torch

    if isinstance(value, Linear):
        with torch.no_grad():
            return torch.nn.functional.linear(value.hidden[start:stop], value.weight, value.bias)
    return value[start:stop]


class DenseForm(LeafForm):
    """At run time: the teacher's logits `[B, S, V_teacher]` (this rank's columns under vocab parallel),
    or a `Linear` that computes them; the batch keeps `[N, columns]` logits, or a Linear of `[N, H]`
    hidden states for a hidden-input head (its logits then exist chunk by chunk)."""

    name = DENSE
    expects = "a logits tensor or a lossgraph.Linear (or a callable returning one)"
    predicts = True

    def value(self, name, target, value):
        import torch

        if not isinstance(value, (torch.Tensor, Linear)):
            raise InputError(f"teacher {name!r} must be {self.expects}")
        return value

    def flatten(self, name, target, value, where):
        value = where.local(value, name, target.vocab_size)
        if isinstance(value, Linear):
            linear = where.linear(value, f"teacher {name!r}", target.vocab_size)
            return linear if where.hidden_input else teacher_logits(linear)  # a logits head gets logits
        shard = where.shard
        columns = target.vocab_size if shard is None else shard.size
        if shard is not None and tuple(value.shape) == (*where.lead, target.vocab_size):
            value = value[..., shard.start : shard.start + shard.size]  # given whole: this rank's columns
        if tuple(value.shape) != (*where.lead, columns):
            split = ""
            if shard is not None:
                split = (
                    f"; under vocab parallel over {shard.ranks} ranks each rank passes its {columns} columns of the "
                    f"teacher's vocab {target.vocab_size}, or all {target.vocab_size} (lossgraph takes this rank's)"
                )
            raise InputError(
                f"teacher {name!r} has shape {tuple(value.shape)}, expected {(*where.lead, columns)} "
                f"(the student's positions x the teacher's vocab_size){split}"
            )
        if not where.floating(value):
            raise InputError(f"teacher {name!r} must be a floating tensor, got {value.dtype}")
        if value.device != where.device:
            raise InputError(f"teacher {name!r} is on {value.device}, the logits on {where.device}")
        return value.detach().reshape(-1, columns)

    def check_values(self, name, target, value, mask, where):
        """-inf bans a token, but NaN, +inf or a row without a finite logit is no distribution (the loss
        would be NaN, or, worse, quietly drop the row). A vocab slice may hold only banned tokens. A
        Linear teacher's logits only exist chunk by chunk: they are not checked."""
        if isinstance(value, Linear):
            return
        logits = value[mask]
        broken = logits.isnan().any(-1) | logits.isposinf().any(-1)
        if where.shard is None:
            broken |= logits.isneginf().all(-1)
        if bool(broken.any()):
            row = int(broken.nonzero()[0, 0])
            values = logits[row]
            what = "NaN" if bool(values.isnan().any()) else "+inf" if bool(values.isposinf().any()) else "only -inf"
            raise InputError(
                f"teacher {name!r} holds {what} at position {where.position(mask, row)} (flattened); teacher "
                "logits must be finite, with -inf only for banned tokens; check the teacher's forward pass and dtype"
            )

    def rows(self, value, start, stop):
        return teacher_logits(value, start, stop)

    def kernel_tensors(self, tensors, index):
        (logits,) = tensors
        return {f"t{index}_ptr": logits, f"stride_t{index}": logits.stride(0), f"vocab_t{index}": logits.shape[1]}

    def whole_vocab(self, value, gather):
        return gather(value)

    def prediction(self, value, vocab):
        return map_vocab(value, vocab).argmax(-1)


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
FORM = DenseForm()
