"""topk_teacher: an offline teacher stored as the ids and log-probabilities of its top-k tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple

from pydantic import Field

from ...errors import InputError, quote
from ...kernels.fragments import KTopK
from ...spec.nodes import MAX_TOPK, TeacherNode
from ...spec.schedules import fixed_at_one
from ..form import LeafForm
from ..source import TOPK, SourceKind, Target
from .teacher import Linear, teacher_summary

if TYPE_CHECKING:
    import torch


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
        return KTopK(index.positions[self.name], self.tail)

    def read_bytes(self, head_vocab, vocab_override, logits_bytes):
        return self.k * 12  # an int64 id and a float32 log-prob per stored token

    def rows_finite(self, batch, vocab):
        import torch

        return torch.logsumexp(batch.sources[self.name].logprobs.to(torch.float64), dim=-1).isfinite()

    def vector_log_probs(self, batch, z, mask, temperature):
        """(log p, log q, usable) over the top-k buckets, plus a tail bucket for `tail: bucket`.

        renormalize: p = softmax(teacher log-probs / T) over the k stored tokens (T: the teacher's
        temperature), q = softmax(z) over the same tokens (z: the student's logits at its own).
        bucket (T = 1): p_i and q_i at the k tokens, and one more bucket each holding the remaining mass
        (for the student, the log-sum-exp of the other tokens). Stored tokens outside the head's vocab
        (vocab_map: truncate) are dropped; in bucket mode their teacher mass joins the tail.
        `usable` [N] is False where renormalize finds no stored token inside the head's vocab (the
        position then contributes 0).
        """
        import torch

        topk = batch.sources[self.name]
        dtype = z.dtype
        vocab = z.shape[-1]
        k = topk.indices.shape[-1]
        indices = torch.where(mask[:, None], topk.indices.long(), 0)
        in_vocab = (indices >= 0) & (indices < vocab)  # as the kernel: ids outside the vocab are dropped
        safe = torch.where(in_vocab, indices, 0)
        # masked positions get a harmless uniform placeholder instead of whatever the caller stored there
        teacher = torch.where(mask[:, None], topk.logprobs.to(dtype), -math.log(k + 1))
        gathered = z.gather(1, safe)
        if self.tail == "renormalize":
            usable = in_vocab.any(-1)
            keep = in_vocab | ~usable[:, None]
            log_q = torch.log_softmax(torch.where(keep, gathered, -math.inf), dim=-1)
            log_p = torch.log_softmax(torch.where(keep, teacher / temperature, -math.inf), dim=-1)
            return log_p, log_q, usable
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        log_q_top = torch.where(in_vocab, gathered - log_z, -math.inf)
        stored = torch.zeros_like(z).scatter_add(1, safe, in_vocab.to(dtype)) > 0
        has_tail = ~stored.all(-1, keepdim=True)  # k == V leaves no tail; keep its logsumexp off all -inf
        tail = torch.logsumexp(torch.where(stored & has_tail, -math.inf, z), dim=-1, keepdim=True)
        log_q_tail = torch.where(has_tail, tail - log_z, -math.inf)
        log_p_top = torch.where(in_vocab, teacher, -math.inf)
        # with no token left outside the stored ones there is no tail, whatever the stored mass rounds to
        # in float64, as the kernel: a confident teacher's tail lies below what float32 resolves next to 1
        stored_mass = log_p_top.to(torch.float64).exp().sum(-1, keepdim=True)
        log_p_tail = torch.where(has_tail, (1.0 - stored_mass).clamp(min=0.0), 0.0).log().to(dtype)
        usable = torch.ones_like(mask)
        return torch.cat([log_p_top, log_p_tail], dim=-1), torch.cat([log_q_top, log_q_tail], dim=-1), usable


class TopK(NamedTuple):
    """An offline top-k teacher at run time: token ids `[.., k]` and their log-probs `[.., k]` (T = 1)."""

    indices: torch.Tensor
    logprobs: torch.Tensor


# stored log-probs may sum to a little over probability 1 through rounding of their dtype
_TOPK_MASS_SLACK = {"torch.float64": 1e-6, "torch.float32": 1e-4}


class TopKForm(LeafForm):
    """At run time: `TopK(indices, logprobs)` of `[B, S, k]` global token ids and their log-probs (whole
    on every rank under vocab parallel); the batch keeps `[N, k]` pairs."""

    name = TOPK
    expects = "lossgraph.TopK(indices, logprobs)"
    predicts = True
    tensor_count = 2

    def value(self, name, target, value):
        if not isinstance(value, TopK):
            got = "a Linear" if isinstance(value, Linear) else type(value).__name__
            raise InputError(f"teacher {name!r} is a topk_teacher source: pass {self.expects}, got {got}")
        return value

    def flatten(self, name, target, value, where):
        indices = where.tensor(value.indices, f"TopK indices of teacher {name!r}")
        logprobs = where.tensor(value.logprobs, f"TopK logprobs of teacher {name!r}")
        for what, tensor in (("indices", indices), ("logprobs", logprobs)):
            if tuple(tensor.shape) != (*where.lead, target.k):
                raise InputError(
                    f"TopK {what} of teacher {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {(*where.lead, target.k)} (positions x k)"
                )
            if tensor.device != where.device:
                raise InputError(f"TopK {what} of teacher {name!r} is on {tensor.device}, the logits on {where.device}")
        if not where.integer(indices):
            raise InputError(f"TopK indices of teacher {name!r} must be integers, got {indices.dtype}")
        if not where.floating(logprobs):
            raise InputError(f"TopK logprobs of teacher {name!r} must be floating, got {logprobs.dtype}")
        return TopK(indices.reshape(-1, target.k), logprobs.detach().reshape(-1, target.k))

    def check_values(self, name, target, value, mask, where):
        """Indices inside the teacher's vocab and unique per position; stored log-probs each <= 0, not
        NaN, some finite, and together at most probability 1."""
        import torch

        vocab = target.vocab_size
        indices = value.indices[mask]
        if bool(((indices < 0) | (indices >= vocab)).any()):
            raise InputError(f"TopK indices of teacher {name!r} fall outside [0, {vocab})")
        if indices.numel() and bool((indices.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise InputError(f"TopK indices of teacher {name!r} repeat a token within a position")
        logprobs = value.logprobs[mask]
        if bool((logprobs > 1e-3).any()) or bool(logprobs.isnan().any()):
            raise InputError(f"TopK logprobs of teacher {name!r} must be log-probabilities (<= 0, not NaN)")
        if not logprobs.numel():
            return
        empty = logprobs.isneginf().all(-1)
        if bool(empty.any()):
            row = int(empty.nonzero()[0, 0])
            raise InputError(
                f"TopK logprobs of teacher {name!r} are all -inf at position {where.position(mask, row)} "
                "(flattened): a stored row needs at least one token with probability above 0"
            )
        mass = torch.logsumexp(logprobs.to(torch.float64), dim=-1)
        slack = _TOPK_MASS_SLACK.get(str(logprobs.dtype), 1e-2)
        over = mass > math.log1p(slack)
        if bool(over.any()):
            row = int(over.nonzero()[0, 0])
            raise InputError(
                f"TopK logprobs of teacher {name!r} at position {where.position(mask, row)} (flattened) add up to "
                f"probability {math.exp(float(mass[row])):.4g}: the stored tokens of a position are part of one "
                "distribution, so their probabilities sum to at most 1; store log_softmax of the teacher's "
                "logits (over the whole vocab), not raw logits or per-token scores"
            )

    def kernel_tensors(self, tensors, index):
        indices, logprobs = tensors
        return {
            f"k{index}_index_ptr": indices,
            f"stride_k{index}_index": indices.stride(0),
            f"k{index}_logp_ptr": logprobs,
            f"stride_k{index}_logp": logprobs.stride(0),
        }

    def prediction(self, value, vocab):
        best = value.logprobs.argmax(-1, keepdim=True)
        return value.indices.gather(1, best).squeeze(1).long()


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
FORM = TopKForm()
