"""Run-time inputs of a compiled graph: checking them and laying them out per head.

Every backend receives, for each head, the same `HeadBatch`: logits as `[N, V]`, the head's shifted
labels and token mask, the run-time value of each leaf source it reads (teachers as `[N, V_teacher]`,
top-k pairs, a plugin form's own), each checked by its leaf form (`kinds.form.LeafForm`), and the
normalizer. Checks that only read shapes, dtypes and devices always run; checks that read tensor values
(labels in range, top-k indices unique, labels given in the wrong `label_alignment`) cost a device
synchronization on a GPU and run when `check_values`.

Labels come in one of two alignments (`LabelAlignment`), and `loss_mask` always shares theirs:
- "next_token" (the default): `labels[b, s]` is the token after position s (`input_ids[b, s + 1]`);
  a head of offset d reads `labels[b, s + d - 1]`.
- "input": `labels[b, s]` is the token at position s, aligned with `input_ids` as Hugging Face gives
  them; a head of offset d reads `labels[b, s + d]`. They are turned into the first form here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, Union

import torch

from ..compiler.plan import HeadPlan, Plan
from ..errors import InputError
from ..kinds import LeafForm, leaf_form
from ..kinds.sources.teacher import Linear
from ..kinds.sources.topk_teacher import TopK
from ..spec.suggest import did_you_mean
from .parallel import VocabShard, dtensor_vocab_group, group_size, is_dtensor, same_ranks

__all__ = ["HeadBatch", "Linear", "TopK", "prepare_batches"]


LabelAlignment = Literal["next_token", "input"]
LABEL_ALIGNMENTS: tuple[LabelAlignment, ...] = ("next_token", "input")

TeacherValue = Union[torch.Tensor, TopK, Linear, Callable[[], Union[torch.Tensor, TopK, Linear]]]
NumItems = Union[int, float, torch.Tensor, Mapping[str, Union[int, float, torch.Tensor]], None]


class ClassWeights(NamedTuple):
    """A run-time class-weight vector (cross_entropy's `class_weights`), checked."""

    vector: torch.Tensor  # [V] float32, contiguous, by global token id (the whole vocab on every rank)
    total: torch.Tensor  # 0-d float32: W = sum_j w_j, on the vector's device (no host sync)

    def at(self, labels: torch.Tensor) -> torch.Tensor:
        """[N] float32 w_{labels_i}; NaN for a label outside the vocab (an input nobody checked)."""
        inside = (labels >= 0) & (labels < self.vector.shape[0])
        return torch.where(inside, self.vector[torch.where(inside, labels, 0)], torch.nan)


@dataclass
class TermPositions:
    """The positions of a term group other than the head's targets (`HeadPlan.groups[1:]`)."""

    mask: torch.Tensor  # [N] bool: the position takes the group's terms
    weight: torch.Tensor | None  # [N] float32 per-position weights (a float named mask); None: 1
    count: torch.Tensor  # int64 scalar: positions in the mask
    normalizer: torch.Tensor  # float32 scalar > 0 that each of the group's terms' sums is divided by
    # [N] float32 w_{y_i}, the labels' class weights, for a class-weighted cross-entropy group (its
    # normalizer is sum_i m_i w_{y_i}); None for other groups
    label_weight: torch.Tensor | None = None
    # 0-d float32: the total of a group that aggregates over a leaf's value (its form's `group_weights`)
    aggregated_total: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        """The float32 total that `tokens` normalization divides the group's terms by (normalizer: positions)."""
        if self.aggregated_total is not None:
            return self.aggregated_total
        if self.label_weight is not None:
            return _weighted_label_total(self.mask, self.weight, self.label_weight)
        return _target_total(self.mask, self.weight).to(torch.float32)

    def rows(self, start: int, stop: int) -> TermPositions:
        weight = None if self.weight is None else self.weight[start:stop]
        label_weight = None if self.label_weight is None else self.label_weight[start:stop]
        return TermPositions(
            self.mask[start:stop], weight, self.count, self.normalizer, label_weight, self.aggregated_total
        )


@dataclass
class HeadBatch:
    """One head's inputs, flattened over positions."""

    logits: torch.Tensor | None  # [N, V], the caller's tensor (a view); None for a hidden-input head
    mask: torch.Tensor  # [N] bool: the position takes loss
    labels: torch.Tensor | None  # [N] int64 label per position (0 where masked), None without labels
    # each leaf source's run-time value as its form lays it out (dense teachers [N, V_teacher] or a Linear
    # of [N, H_teacher], TopK of [N, k] pairs, ...), and its form, by source name
    sources: dict[str, Any]
    forms: dict[str, LeafForm]
    count: torch.Tensor  # int64 scalar: unmasked positions
    normalizer: torch.Tensor  # float32 scalar > 0 that each term's sum is divided by
    linear: Linear | None = None  # hidden [N, H] and the head's weight, for a hidden-input head
    shard: VocabShard | None = None  # under vocab parallel: which columns of the vocab this rank holds
    weight: torch.Tensor | None = None  # [N] float32 per-position weights (a float loss_mask); None: 1
    # the positions of the head's other term groups (HeadPlan.groups[1:]); the fields above are group 0's
    groups: tuple[TermPositions, ...] = ()
    # the run-time class-weight vectors the head's terms read (cross_entropy's `class_weights`), by name
    class_weights: dict[str, ClassWeights] = field(default_factory=dict)

    def group(self, index: int) -> HeadBatch:
        """The batch as the terms of group `index` see it: its mask, weights, count and normalizer."""
        if index == 0:
            return self
        own = self.groups[index - 1]
        return replace(self, mask=own.mask, weight=own.weight, count=own.count, normalizer=own.normalizer, groups=())

    def row_scales(self, fold: bool = False) -> torch.Tensor:
        """[N, groups] float32: each group's row weight over its normalizer; with `fold`, over group 0's
        normalizer only (the fused backend then applies 1 / group 0's normalizer after the kernel)."""
        scales = []
        for index in range(len(self.groups) + 1):
            own = self.group(index)
            if fold:
                scales.append(own.row_weight() * (self.normalizer / own.normalizer))
            else:
                scales.append(own.row_weight() * own.normalizer.reciprocal())
        return torch.stack(scales, 1)

    def row_weight(self) -> torch.Tensor:
        """[N] float32: what each position's term values count for (0 where masked)."""
        if self.weight is None:
            return self.mask.to(torch.float32)
        return torch.where(self.mask, self.weight, 0.0)

    def total(self) -> torch.Tensor:
        """The float32 token total that `tokens` normalization divides by: the unmasked count, or the
        sum of the weights of a float loss_mask."""
        if self.weight is None:
            return self.count.to(torch.float32)
        return self.row_weight().sum()

    def rows(self, start: int, stop: int, logits: torch.Tensor) -> HeadBatch:
        """Positions [start, stop) with `logits` for them; Linear teachers become logits. Keeps the
        whole batch's count and normalizer, so chunk values add up to the batch's."""
        return HeadBatch(
            logits=logits,
            mask=self.mask[start:stop],
            labels=None if self.labels is None else self.labels[start:stop],
            sources={name: self.forms[name].rows(value, start, stop) for name, value in self.sources.items()},
            forms=self.forms,
            count=self.count,
            normalizer=self.normalizer,
            weight=None if self.weight is None else self.weight[start:stop],
            groups=tuple(group.rows(start, stop) for group in self.groups),
            class_weights=self.class_weights,
        )


def _is_float(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _tensor(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_names(given: Mapping[str, Any], expected: list[str], optional: list[str], what: str, how: str) -> None:
    unknown = [name for name in given if name not in expected and name not in optional]
    for name in unknown:
        hint = did_you_mean(str(name), [*expected, *optional])
        raise InputError(f"unknown {what} {name!r}{hint}; the graph has {', '.join(expected + optional) or 'none'}")
    missing = [name for name in expected if name not in given]
    if missing:
        raise InputError(f"missing {what} {', '.join(repr(m) for m in missing)}: {how}")


def resolve_teachers(plan: Plan, teachers: Mapping[str, TeacherValue] | None) -> dict[str, Any]:
    """Check teacher names, call each callable teacher once, under no_grad, and check the Python type
    of each value (by its leaf form)."""
    teachers = dict(teachers or {})
    _check_names(
        teachers,
        list(plan.teachers),
        [],
        "teacher",
        "pass teachers={name: logits tensor, TopK(indices, logprobs) or a callable returning one}",
    )
    resolved: dict[str, Any] = {}
    for name, value in teachers.items():
        if callable(value) and not isinstance(value, (torch.Tensor, tuple)):  # a NamedTuple value is not called
            with torch.no_grad():
                value = value()
        target = plan.teachers[name]
        resolved[name] = leaf_form(target.form).value(name, target, value)
    return resolved


def _shift(values: torch.Tensor, offset: int, fill: float | int | bool) -> torch.Tensor:
    """values[:, s + offset - 1] at position s, `fill` past the end. [B, S] -> [B, S]."""
    if offset == 1:
        return values
    shifted = torch.full_like(values, fill)
    if offset - 1 < values.shape[1]:
        shifted[:, : values.shape[1] - offset + 1] = values[:, offset - 1 :]
    return shifted


class _Layout(NamedTuple):
    lead: tuple[int, ...]  # (B, S) or (N,)
    device: torch.device


def _check_linear(value: Any, what: str, vocab: int) -> Linear:
    """A Linear's shapes: hidden [B, S, H] or [N, H], weight [vocab, H], bias [vocab]."""
    if not isinstance(value, Linear):
        raise InputError(f"{what} must be lossgraph.Linear(hidden, weight, bias), got {type(value).__name__}")
    hidden = _tensor(value.hidden, f"{what}.hidden")
    weight = _tensor(value.weight, f"{what}.weight")
    if hidden.dim() not in (2, 3):
        raise InputError(f"{what}.hidden must be [B, S, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape != (vocab, hidden.shape[-1]):
        raise InputError(
            f"{what}.weight has shape {tuple(weight.shape)}, expected {(vocab, hidden.shape[-1])} (vocab x hidden)"
        )
    if not (_is_float(hidden) and hidden.dtype == weight.dtype):
        raise InputError(f"{what}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype")
    if weight.device != hidden.device:
        raise InputError(f"{what}: weight is on {weight.device}, hidden on {hidden.device}")
    if value.bias is not None:
        bias = _tensor(value.bias, f"{what}.bias")
        if bias.shape != (vocab,) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise InputError(f"{what}.bias must be a [{vocab}] tensor like the weight, got {tuple(bias.shape)}")
    return value


Shards = Mapping[str, Union[VocabShard, None]]  # head -> the columns this rank holds (None: the whole vocab)


def _ranks(group) -> str:
    import torch.distributed as dist

    return str(dist.get_process_group_ranks(group))


def _vocab_message(what: str, columns: int, head: HeadPlan, shard: VocabShard | None) -> str:
    """A head's logits of the wrong width: under vocab parallel, with the whole and the per-rank vocab."""
    if shard is None:
        return f"{what} has vocab {columns}, but head {head.name!r} declares vocab_size {head.vocab_size}"
    split = (
        f"under vocab parallel over {shard.ranks} ranks each rank passes its {shard.size} columns (this rank: "
        f"[{shard.start}, {shard.start + shard.size}))"
    )
    if columns == head.vocab_size:
        return (
            f"{what} holds {columns} columns, the whole vocab of head {head.name!r}; {split}: pass this rank's "
            "slice (logits.to_local() for a DTensor), or a DTensor sharded on the vocab (Shard(-1)) without "
            "vocab_parallel_group (it brings its own group)"
        )
    return f"{what} holds {columns} columns; head {head.name!r} declares vocab_size {head.vocab_size}, and {split}"


def _local_logits(plan: Plan, logits: Mapping[str, Any], vocab_group) -> tuple[dict[str, Any], dict]:
    """The logits as local tensors, and each head's vocab shard: a plain tensor is split over
    `vocab_group` (None: whole); a DTensor brings its own split: Shard(-1) is vocab parallel over its mesh
    dimension's group, Replicate() is whole. `to_local()` is differentiable: its backward hands the
    gradient back as a DTensor with the same placements (so ColwiseParallel's backward does the rest)."""
    local = dict(logits)
    shards: dict[str, VocabShard | None] = {}
    for head in plan.heads:
        if head.name not in logits:
            continue
        value = logits[head.name]
        what = f"logits[{head.name!r}]"
        if not is_dtensor(value):
            shards[head.name] = (
                None if vocab_group is None or head.hidden_input else VocabShard(head.vocab_size, vocab_group)
            )
            continue
        if head.hidden_input:
            raise InputError(
                f"{what} is a DTensor, but head {head.name!r} takes hidden states (input: hidden): pass "
                "lossgraph.Linear(hidden, weight) of plain tensors, or declare the head input: logits"
            )
        if value.dim() not in (2, 3):
            raise InputError(f"{what} must be [B, S, V] or [N, V], got a DTensor of shape {tuple(value.shape)}")
        if value.shape[-1] != head.vocab_size:
            raise InputError(
                f"{what} is a DTensor of {value.shape[-1]} columns in all ({value.to_local().shape[-1]} on this "
                f"rank), but head {head.name!r} declares vocab_size {head.vocab_size}"
            )
        group = dtensor_vocab_group(value, what, head.vocab_size)
        shard = None
        if group is not None:
            if vocab_group is not None and not same_ranks(group, vocab_group):
                raise InputError(
                    f"{what} is a DTensor split over the vocab across ranks {_ranks(group)} (its device mesh), but "
                    f"the graph was compiled with vocab_parallel_group over ranks {_ranks(vocab_group)}: a DTensor "
                    "brings its own group, so leave vocab_parallel_group out (or give its mesh's group)"
                )
            for teacher in head.teachers:
                if teacher.vocab_columns and teacher.vocab_size != head.vocab_size:
                    raise InputError(
                        f"{what} is split over the vocab, and teacher {teacher.name!r} (vocab {teacher.vocab_size}) "
                        f"and head {head.name!r} (vocab {head.vocab_size}) must share one vocab under vocab parallel"
                    )
            shard = VocabShard(head.vocab_size, group)
        local[head.name] = value.to_local()
        shards[head.name] = shard
    return local, shards


def _local_teacher(name: str, value: Any, vocab: int, head: str, shard: VocabShard | None) -> Any:
    """A teacher's tensor given as a DTensor, as a local tensor: this rank's columns when it is split
    over the vocab like the head's logits, the whole vocab when it is replicated. Anything else is
    returned as is."""
    if not is_dtensor(value):
        return value
    what = f"teachers[{name!r}]"
    if value.shape[-1] != vocab:
        raise InputError(
            f"{what} is a DTensor of {value.shape[-1]} columns in all, but teacher {name!r} declares vocab_size {vocab}"
        )
    group = dtensor_vocab_group(value, what, vocab)
    if group is not None and shard is None:
        raise InputError(
            f"{what} is a DTensor split over the vocab (Shard(-1)), but head {head!r}'s logits hold the whole "
            f"vocab: pass {what}.full_tensor(), or the head's logits split over the same ranks"
        )
    if group is not None and not same_ranks(group, shard.group):
        raise InputError(
            f"{what} is split over the vocab across ranks {_ranks(group)}, but head {head!r}'s logits across ranks "
            f"{_ranks(shard.group)}: split both over one group"
        )
    return value.detach().to_local()


def _layout(plan: Plan, logits: Mapping[str, Any], shards: Shards) -> _Layout:
    lead: tuple[int, ...] | None = None
    device = None
    for head in plan.heads:
        if head.name not in logits:
            continue
        what = f"logits[{head.name!r}]"
        if head.hidden_input:
            tensor = _check_linear(logits[head.name], what, head.vocab_size).hidden
        else:
            if isinstance(logits[head.name], Linear):
                raise InputError(f"{what} is a Linear, but head {head.name!r} takes logits; declare it input: hidden")
            tensor = _tensor(logits[head.name], what)
            if tensor.dim() not in (2, 3):
                raise InputError(f"{what} must be [B, S, V] or [N, V], got shape {tuple(tensor.shape)}")
            if not _is_float(tensor):
                raise InputError(f"{what} must be a floating tensor, got {tensor.dtype}")
            shard = shards.get(head.name)
            if tensor.shape[-1] != (head.vocab_size if shard is None else shard.size):
                raise InputError(_vocab_message(what, tensor.shape[-1], head, shard))
        if lead is None:
            lead, device = tuple(tensor.shape[:-1]), tensor.device
        elif tuple(tensor.shape[:-1]) != lead:
            raise InputError(
                f"{what} has leading shape {tuple(tensor.shape[:-1])}, other heads {lead}; "
                "all heads must cover the same positions"
            )
        elif tensor.device != device:
            raise InputError(f"{what} is on {tensor.device}, other heads on {device}")
    if lead is None:
        raise InputError("no logits given: pass logits={head name: tensor}")
    return _Layout(lead, device)


def _positional(value: Any, layout: _Layout, what: str, *, integer: bool) -> torch.Tensor:
    tensor = _tensor(value, what)
    if tuple(tensor.shape) != layout.lead:
        raise InputError(f"{what} has shape {tuple(tensor.shape)}; the logits cover positions {layout.lead}")
    if tensor.device != layout.device:
        raise InputError(f"{what} is on {tensor.device}, the logits on {layout.device}")
    if integer and not _is_int(tensor):
        raise InputError(f"{what} must be an integer tensor, got {tensor.dtype}")
    return tensor


def _normalizer(
    plan: Plan, head: HeadPlan, count: torch.Tensor, positions: int, num_items: NumItems, check_values: bool
) -> torch.Tensor:
    if num_items is not None and plan.normalization != "tokens":
        raise InputError(f"num_items applies to normalization: tokens, but this graph uses {plan.normalization}")
    if plan.normalization == "sum":
        return torch.ones((), dtype=torch.float32, device=count.device)
    if plan.normalization == "batch":
        return torch.full((), float(max(positions, 1)), dtype=torch.float32, device=count.device)
    if num_items is None:  # the token total; 1 when it is 0 (every term is then 0 anyway)
        return torch.where(count > 0, count, 1.0).to(torch.float32)
    value = num_items
    if isinstance(num_items, Mapping):
        bound = [h.name for h in plan.heads if h.terms]
        unbound = [h.name for h in plan.heads if not h.terms]
        _check_names(num_items, bound, unbound, "num_items head", "give a count for every head with losses")
        value = num_items[head.name]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InputError(f"num_items for head {head.name!r} must be a scalar, got shape {tuple(value.shape)}")
        if check_values and not bool(torch.isfinite(value).all() & (value > 0).all()):
            raise InputError(f"num_items for head {head.name!r} must be a positive number, got {value.item()!r}")
        # a positive count (checked above where values are read): the clamp only keeps 0 from dividing
        return value.reshape(()).to(device=count.device, dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"num_items for head {head.name!r} must be a positive number, got {value!r}")
    return torch.full((), float(value), dtype=torch.float32, device=count.device)


@dataclass
class _SourceInputs:
    """The call as a leaf form sees it while it checks a source's value (`kinds.form.FormInputs`)."""

    layout: _Layout
    head: str
    shard: VocabShard | None
    hidden_input: bool
    document_ids: torch.Tensor | None = None  # [B, S] as the call gave them, or None

    @property
    def lead(self) -> tuple[int, ...]:
        return self.layout.lead

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def tensor(self, value: Any, what: str) -> torch.Tensor:
        return _tensor(value, what)

    def floating(self, tensor: torch.Tensor) -> bool:
        return _is_float(tensor)

    def integer(self, tensor: torch.Tensor) -> bool:
        return _is_int(tensor)

    def positional(self, value: Any, what: str, trailing: tuple[int, ...]) -> torch.Tensor:
        tensor = _tensor(value, what)
        if tuple(tensor.shape) != (*self.lead, *trailing):
            raise InputError(f"{what} has shape {tuple(tensor.shape)}, expected {(*self.lead, *trailing)}")
        if tensor.device != self.device:
            raise InputError(f"{what} is on {tensor.device}, the logits on {self.device}")
        return tensor

    def linear(self, value: Any, what: str, vocab: int) -> Linear:
        """A Linear checked against the positions, its hidden states flattened to [N, H] and detached."""
        linear = _check_linear(value, what, vocab)
        if tuple(linear.hidden.shape[:-1]) != self.lead:
            raise InputError(
                f"{what} hidden has leading shape {tuple(linear.hidden.shape[:-1])}; the student's positions are "
                f"{self.lead}"
            )
        if linear.hidden.device != self.device:
            raise InputError(f"{what} is on {linear.hidden.device}, the logits on {self.device}")
        hidden = linear.hidden.detach().reshape(-1, linear.hidden.shape[-1])
        bias = None if linear.bias is None else linear.bias.detach()
        return Linear(hidden, linear.weight.detach(), bias)

    def local(self, value: Any, name: str, vocab: int) -> Any:
        return _local_teacher(name, value, vocab, self.head, self.shard)

    def position(self, mask: torch.Tensor, row: int) -> int:
        return _position(mask, row)


def _check_values(head: HeadPlan, batch: HeadBatch, plan: Plan, where: _SourceInputs) -> None:
    """Value checks (they synchronize with the device)."""
    if batch.labels is not None:
        used = batch.labels[batch.mask]
        bad = (used < 0) | (used >= head.vocab_size)
        if bool(bad.any()):
            value = int(used[bad][0])
            raise InputError(
                f"labels of head {head.name!r} hold {value}, outside [0, {head.vocab_size}); use "
                f"ignore_index ({plan.labels.ignore_index}) for positions without a label"
            )
    for name, value in batch.sources.items():
        mask = _teacher_mask(head, batch, name)
        batch.forms[name].check_values(name, plan.teachers[name], value, mask, where)


def _teacher_mask(head: HeadPlan, batch: HeadBatch, name: str) -> torch.Tensor:
    """[N] bool: the positions a teacher is read at, those of the term groups whose terms read it."""
    if not batch.groups:
        return batch.mask
    groups = {t.group for t in head.terms if t.target is not None and name in {x.name for x in t.target.leaves()}}
    mask = torch.zeros_like(batch.mask)
    for index in sorted(groups):
        mask = mask | batch.group(index).mask
    return mask


def _position(mask: torch.Tensor, index: int) -> int:
    """The flattened position of the index-th unmasked row."""
    return int(mask.nonzero()[index, 0])


class PositionInputs(NamedTuple):
    """The per-position inputs of a call besides logits and teachers, checked, in the "next_token"
    alignment (index s holds what position s's next-token prediction is compared with); each head
    shifts them further by its offset."""

    labels: torch.Tensor | None  # int64 [B, S] or [N]
    loss_mask: torch.Tensor | None  # bool: the label at this index may take loss
    weights: torch.Tensor | None  # float32 per-index weights (a float loss_mask)
    document_ids: torch.Tensor | None  # [B, S]
    sequence: bool  # [B, S] positions (else flat [N])


def _check_alignment(label_alignment: Any) -> None:
    if label_alignment not in LABEL_ALIGNMENTS:
        raise InputError(
            f"label_alignment must be 'next_token' (labels[b, s] is the token after position s, the default) "
            f"or 'input' (labels aligned with input_ids, as Hugging Face gives them), got {label_alignment!r}"
        )


def _check_label_alignment(
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor | None,
    ignore_index: int,
    label_alignment: LabelAlignment,
) -> None:
    """Refuse labels that match input_ids in the other alignment at every position that takes loss,
    and not in the one given: they were passed in the wrong one. Labels that match both (a run of one
    repeated token) or neither are left alone. One device synchronization."""
    rows = labels.reshape(-1, labels.shape[-1])  # flat [N] labels are one row
    ids = input_ids.reshape(rows.shape)
    used = rows != ignore_index
    if loss_mask is not None:
        used = used & loss_mask.reshape(rows.shape)
    unshifted = (rows == ids) | ~used  # labels[s] == input_ids[s]
    shifted = (rows[:, :-1] == ids[:, 1:]) | ~used[:, :-1]  # labels[s] == input_ids[s + 1]
    flags = torch.stack([used.any(), unshifted.all(), used[:, :-1].any(), shifted.all()]).tolist()
    any_used, all_unshifted, any_comparable, all_shifted = flags
    if label_alignment == "next_token" and any_used and all_unshifted and not all_shifted:
        raise InputError(
            "labels look unshifted: at every position that takes loss they equal input_ids at the same "
            "position (labels[b, s] == input_ids[b, s]), as Hugging Face labels do, but label_alignment="
            "'next_token' (the default) reads labels[b, s] as the token after position s (input_ids[b, s + 1]). "
            "Pass label_alignment='input' to have lossgraph shift them (loss_mask is then aligned with "
            f"input_ids too), or pass labels[:, 1:] padded at the end with ignore_index ({ignore_index})"
        )
    if label_alignment == "input" and any_comparable and all_shifted and not all_unshifted:
        raise InputError(
            "labels look already shifted: at every position that takes loss they equal the next input token "
            "(labels[b, s] == input_ids[b, s + 1]), but label_alignment='input' reads labels aligned with "
            "input_ids (labels[b, s] is the token at position s, as Hugging Face gives them). Pass "
            "label_alignment='next_token' (the default) for labels that are already shifted, or the unshifted labels"
        )


def _input_to_next_token(inputs: PositionInputs, layout: _Layout, plan: Plan) -> PositionInputs:
    """From the "input" alignment (index s: the token at s) to "next_token" (index s: the token at s + 1):
    one step to the left. The last position has no target left; with document_ids, neither has a
    position whose next token starts another document (every head then stays inside its document)."""
    given = inputs.loss_mask
    if given is None:
        given = torch.ones(layout.lead, dtype=torch.bool, device=layout.device)
    loss_mask = _shift(given, 2, False)
    if inputs.document_ids is not None:
        loss_mask = loss_mask & (_shift(inputs.document_ids, 2, 0) == inputs.document_ids)
    return PositionInputs(
        labels=None if inputs.labels is None else _shift(inputs.labels, 2, plan.labels.ignore_index),
        loss_mask=loss_mask,
        weights=None if inputs.weights is None else _shift(inputs.weights, 2, 0.0),
        document_ids=inputs.document_ids,
        sequence=inputs.sequence,
    )


def _position_inputs(
    plan: Plan,
    layout: _Layout,
    labels: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    label_alignment: LabelAlignment,
    check_values: bool,
) -> PositionInputs:
    """Check labels, loss_mask, document_ids and input_ids against the positions, and bring labels and
    loss_mask to the "next_token" alignment."""
    _check_alignment(label_alignment)
    sequence = len(layout.lead) == 2
    if label_alignment == "input" and not sequence:
        raise InputError(
            "label_alignment='input' shifts labels along the sequence: pass [B, S, V] logits and [B, S] labels"
        )
    if plan.labels is not None:
        if labels is None:
            raise InputError(
                f"the graph has the labels source {plan.labels.name!r}: pass labels=[B, S] token ids "
                "(label_alignment='next_token', the default: labels[b, s] is the token after position s)"
            )
        labels = _positional(labels, layout, "labels", integer=True).long()
    elif labels is not None:
        raise InputError("labels given, but the graph has no labels source; declare one or drop the argument")
    weights = None
    if loss_mask is not None:
        loss_mask = _positional(loss_mask, layout, "loss_mask", integer=False)
        if loss_mask.is_floating_point():  # per-position weights
            weights = loss_mask.to(torch.float32)
        loss_mask = loss_mask != 0
    if document_ids is not None:
        if not sequence:
            raise InputError("document_ids need [B, S] logits to know where sequences are")
        document_ids = _positional(document_ids, layout, "document_ids", integer=True)
    if input_ids is not None:
        input_ids = _positional(input_ids, layout, "input_ids", integer=True)
    if check_values:
        if weights is not None and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise InputError(
                "loss_mask holds per-position weights (a float tensor): each must be finite and >= 0; "
                "pass 0 where a position takes no loss"
            )
        if labels is not None and input_ids is not None:
            _check_label_alignment(labels, input_ids, loss_mask, plan.labels.ignore_index, label_alignment)
    inputs = PositionInputs(labels, loss_mask, weights, document_ids, sequence)
    return _input_to_next_token(inputs, layout, plan) if label_alignment == "input" else inputs


def _head_inputs(
    plan: Plan, head: HeadPlan, inputs: PositionInputs, lead: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A head's (mask [N] bool, labels [N] int64 (0 where masked) or None, weights [N] float32 or None)."""
    sequence = inputs.sequence
    if head.offset > 1 and not sequence:
        raise InputError(
            f"head {head.name!r} has offset {head.offset}: its labels are shifted along the sequence, "
            "so pass [B, S, V] logits and [B, S] labels"
        )
    conditions = []  # what a position needs to take loss; each a [B, S] or [N] bool tensor
    if sequence and head.offset > 1:
        conditions.append(_shift(torch.ones(lead, dtype=torch.bool, device=device), head.offset, False))
        if inputs.document_ids is not None:
            conditions.append(_shift(inputs.document_ids, head.offset, 0) == inputs.document_ids)
    labels = None
    if inputs.labels is not None:
        labels = _shift(inputs.labels, head.offset, plan.labels.ignore_index) if sequence else inputs.labels
        conditions.append(labels != plan.labels.ignore_index)
    if inputs.loss_mask is not None:
        conditions.append(_shift(inputs.loss_mask, head.offset, False) if sequence else inputs.loss_mask)
    valid = conditions[0] if conditions else torch.ones(lead, dtype=torch.bool, device=device)
    for condition in conditions[1:]:
        valid = valid & condition
    mask = valid.reshape(-1)
    weights = None
    if inputs.weights is not None:
        weights = (_shift(inputs.weights, head.offset, 0.0) if sequence else inputs.weights).reshape(-1)
    if labels is not None:
        labels = torch.where(mask, labels.reshape(-1), 0)
    return mask, labels, weights


Masks = Mapping[str, torch.Tensor]


def _named_inputs(
    given: Mapping[str, object] | None,
    expected: list[str],
    *,
    keyword: str,
    noun: str,
    declared: Callable[[str], str],
    value: str,
    advice: str,
) -> dict[str, object]:
    """The call's `keyword={NAME: tensor}` dict, holding exactly the names the graph declares: an unknown
    name (with a did-you-mean) and a missing one are InputErrors that say which loss declares what."""
    if given is not None and not isinstance(given, Mapping):
        raise InputError(f"{keyword} must be a dict {{name: {value}}}")
    given = dict(given or {})
    unknown = [name for name in given if name not in expected]
    if unknown:
        hint = did_you_mean(str(unknown[0]), expected)
        used = ", ".join(repr(name) for name in expected) or "none"
        raise InputError(
            f"unknown {noun} {unknown[0]!r}{hint}; no loss {declared(str(unknown[0]))} (the graph's {keyword}: {used})"
        )
    missing = [name for name in expected if name not in given]
    if missing:
        raise InputError(
            f"missing {noun} {', '.join(repr(m) for m in missing)}: a loss {declared(missing[0])}; "
            f"pass {keyword}={{{missing[0]!r}: {value}}}{advice}"
        )
    return given


def _check_masks(plan: Plan, masks: Masks | None, layout: _Layout, check_values: bool) -> dict[str, tuple]:
    """The run-time masks of `positions: {mask: NAME}` terms, each as (bool [N], float32 weights [N] or
    None), indexed like the logits (not shifted by an offset or a label alignment)."""
    expected = plan.masks
    masks = _named_inputs(
        masks,
        expected,
        keyword="masks",
        noun="mask",
        declared=lambda name: f"takes positions: {{mask: {name}}}",
        value="[B, S] bool or float tensor",
        advice=", True (or a weight > 0) where its terms take loss, indexed like the logits",
    )
    found = {}
    for name in expected:
        what = f"masks[{name!r}]"
        tensor = _positional(masks[name], layout, what, integer=False)
        if not (_is_float(tensor) or _is_int(tensor) or tensor.dtype == torch.bool):
            raise InputError(f"{what} must be a bool, integer or float tensor, got {tensor.dtype}")
        weight = None
        if tensor.is_floating_point():
            weight = tensor.reshape(-1).to(torch.float32)
            if check_values and not bool((torch.isfinite(weight) & (weight >= 0)).all()):
                raise InputError(
                    f"{what} holds per-position weights (a float tensor): each must be finite and >= 0; pass 0 "
                    "where its terms take no loss"
                )
        found[name] = ((tensor != 0).reshape(-1), weight)
    return found


def _group_positions(
    plan: Plan,
    head: HeadPlan,
    batch: HeadBatch,
    masks: dict[str, tuple],
    num_items: NumItems,
    check_values: bool,
) -> tuple[TermPositions, ...]:
    """The positions and normalizer of each of the head's term groups but the first (its targets)."""
    groups = []
    for group in head.groups[1:]:
        if group.positions == "all":
            mask, weight = torch.ones_like(batch.mask), None
        elif group.positions == "targets":  # class-weighted cross-entropy over the head's targets
            mask, weight = batch.mask, batch.weight
        else:
            mask, weight = masks[group.mask]
            if group.labelled:  # its terms read the labels: only positions that have a target
                mask = mask & batch.mask
        count = mask.sum()
        if group.aggregation is not None:
            groups.append(_aggregated_positions(head, group, batch, mask, weight, count, num_items))
            continue
        label_weight = None
        if group.class_weights is not None:  # w_{y_i}: the group divides by sum_i m_i w_{y_i}
            label_weight = torch.where(mask, batch.class_weights[group.class_weights].at(batch.labels), 0.0)
        if group.normalizer == "targets":
            normalizer = batch.normalizer
        else:
            if num_items is not None:
                node = next(t.node for t in head.terms if head.groups[t.group] == group)
                if group.class_weights is not None:
                    raise InputError(
                        f"num_items gives head {head.name!r}'s target count, but loss {node!r} divides by the "
                        f"summed class weights ({group.class_weights!r}) of its positions' labels; set "
                        "normalizer: targets on it to divide it by num_items too, or leave num_items out"
                    )
                where = "all" if group.positions == "all" else "mask " + repr(group.mask)
                raise InputError(
                    f"num_items gives head {head.name!r}'s target count, but loss {node!r} divides by the count "
                    f"of its own positions ({where}); set "
                    "normalizer: targets on it to divide it by num_items too, or leave num_items out"
                )
            total = (
                _target_total(mask, weight)
                if label_weight is None
                else _weighted_label_total(mask, weight, label_weight)
            )
            normalizer = _normalizer(plan, head, total, mask.numel(), None, check_values)
        groups.append(TermPositions(mask, weight, count, normalizer, label_weight))
    return tuple(groups)


def _aggregated_positions(
    head: HeadPlan,
    group,
    batch: HeadBatch,
    mask: torch.Tensor,
    weight: torch.Tensor | None,
    count: torch.Tensor,
    num_items: NumItems,
) -> TermPositions:
    """A group whose rows its loss kind weighs over a leaf's value (per sequence of a rollout): the leaf's
    form gives the weights and the total the group's sum is divided by."""
    source, aggregation, constant = group.aggregation
    if num_items is not None:
        node = next(t.node for t in head.terms if head.groups[t.group] == group)
        raise InputError(
            f"num_items gives head {head.name!r}'s target count, but loss {node!r} aggregates by {aggregation} "
            f"over {source!r}, which divides by its sequences; leave num_items out (compile with "
            "normalize_across to sum the sequences over data-parallel ranks)"
        )
    weights, total = batch.forms[source].group_weights(batch.sources[source], mask, weight, aggregation, constant)
    normalizer = torch.where(total > 0, total, 1.0)
    return TermPositions(mask, weights, count, normalizer, aggregated_total=total)


def _weighted_label_total(mask: torch.Tensor, weights: torch.Tensor | None, label_weight: torch.Tensor) -> torch.Tensor:
    """sum_i m_i w_{y_i} (float32): a class-weighted cross-entropy's normalizer (torch's weighted mean)."""
    row = mask.to(torch.float32) if weights is None else torch.where(mask, weights, 0.0)
    return (row * label_weight).sum()


def _check_class_weights(
    plan: Plan, class_weights: Mapping[str, torch.Tensor] | None, layout: _Layout, check_values: bool
) -> dict[str, ClassWeights]:
    """The run-time class-weight vectors of `class_weights: NAME` cross-entropy terms, checked: [vocab]
    floating on the logits' device, and (value checks) finite, >= 0, with a sum > 0."""
    expected = plan.class_weights
    given = _named_inputs(
        class_weights,
        list(expected),
        keyword="class_weights",
        noun="class_weights",
        declared=lambda name: f"has class_weights: {name}",
        value="[vocab_size] float tensor",
        advice=", one weight per token id (>= 0)",
    )
    found = {}
    for name, heads in expected.items():
        what = f"class_weights[{name!r}]"
        tensor = _tensor(given[name], what)
        if tensor.dim() != 1:
            raise InputError(
                f"{what} must be 1-D [vocab_size], one weight per token id, got shape {tuple(tensor.shape)}"
            )
        for head in heads:
            if tensor.shape[0] != head.vocab_size:
                raise InputError(
                    f"{what} has {tensor.shape[0]} weights, but head {head.name!r} has vocab {head.vocab_size}; give "
                    "one weight per token id of the whole vocab (every rank gets all of them under vocab parallel)"
                )
        if not _is_float(tensor):
            raise InputError(f"{what} must be a floating tensor, got {tensor.dtype}")
        if tensor.device != layout.device:
            raise InputError(f"{what} is on {tensor.device}, the logits on {layout.device}")
        vector = tensor.detach().to(torch.float32).contiguous()
        if check_values:
            if not bool((torch.isfinite(vector) & (vector >= 0)).all()):
                raise InputError(f"{what}: each class weight must be finite and >= 0")
            if not bool(vector.sum() > 0):
                raise InputError(f"{what}: the class weights sum to 0; give some class a weight > 0")
        found[name] = ClassWeights(vector, tensor.detach().to(torch.float64).sum().to(torch.float32))
    return found


def _target_total(mask: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """A head's target count (int64), or the sum of its weights (float32) under a float loss_mask."""
    return mask.sum() if weights is None else torch.where(mask, weights, 0.0).sum()


def _resolve_check_values(check_values: bool | None, device: torch.device) -> bool:
    if check_values is None:
        # free on the CPU; on an accelerator, and inside torch.compile, they would cost a synchronization
        return device.type == "cpu" and not torch.compiler.is_compiling()
    return check_values


def count_targets(
    plan: Plan,
    labels: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    label_alignment: LabelAlignment,
    check_values: bool | None,
) -> dict[str, torch.Tensor]:
    """Each head's target count (the sum of its weights under a float loss_mask) for these inputs: what
    `normalization: tokens` divides the head's terms by when no num_items is given. Heads with terms only."""
    given = {"labels": labels, "loss_mask": loss_mask, "document_ids": document_ids, "input_ids": input_ids}
    what = next((name for name, value in given.items() if value is not None), None)
    if what is None:
        raise InputError("give labels, loss_mask, document_ids or input_ids: they say where the batch's positions are")
    first = _tensor(given[what], what)
    if first.dim() not in (1, 2):
        raise InputError(f"{what} must be [B, S] or [N], got shape {tuple(first.shape)}")
    layout = _Layout(tuple(first.shape), first.device)
    check_values = _resolve_check_values(check_values, layout.device)
    inputs = _position_inputs(plan, layout, labels, loss_mask, document_ids, input_ids, label_alignment, check_values)
    counts = {}
    for head in plan.heads:
        if head.terms:
            mask, _, weights = _head_inputs(plan, head, inputs, layout.lead, layout.device)
            counts[head.name] = _target_total(mask, weights)
    return counts


def prepare_batches(
    plan: Plan,
    logits: Mapping[str, torch.Tensor],
    labels: torch.Tensor | None,
    teachers: Mapping[str, TeacherValue] | None,
    loss_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    num_items: NumItems,
    check_values: bool | None,
    vocab_group=None,
    *,
    input_ids: torch.Tensor | None = None,
    label_alignment: LabelAlignment = "next_token",
    masks: Masks | None = None,
    class_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, HeadBatch]:
    """Check the inputs and lay them out per head (only heads with terms get a batch).

    Callable teachers are called here, once each, after the logits, labels and masks have been checked.
    """
    if not isinstance(logits, Mapping):
        raise InputError("logits must be a dict {head name: tensor}")
    bound = [head.name for head in plan.heads if head.terms]
    unbound = [head.name for head in plan.heads if not head.terms]
    _check_names(logits, bound, unbound, "head", "pass logits={head name: [B, S, V] or [N, V] tensor}")
    if vocab_group is not None:
        group_size(vocab_group)  # fails clearly when torch.distributed is not initialized
    logits, shards = _local_logits(plan, logits, vocab_group)
    layout = _layout(plan, logits, shards)
    check_values = _resolve_check_values(check_values, layout.device)
    inputs = _position_inputs(plan, layout, labels, loss_mask, document_ids, input_ids, label_alignment, check_values)
    named = _check_masks(plan, masks, layout, check_values)
    weights = _check_class_weights(plan, class_weights, layout, check_values)
    resolved = resolve_teachers(plan, teachers)

    batches: dict[str, HeadBatch] = {}
    for head in plan.heads:
        if not head.terms:
            continue
        mask, head_labels, head_weight = _head_inputs(plan, head, inputs, layout.lead, layout.device)
        count = mask.sum()
        linear = None
        if head.hidden_input:
            given = logits[head.name]
            linear = Linear(given.hidden.reshape(-1, given.hidden.shape[-1]), given.weight, given.bias)
        batch = HeadBatch(
            logits=None if head.hidden_input else logits[head.name].reshape(-1, logits[head.name].shape[-1]),
            mask=mask,
            labels=head_labels,
            sources={},
            forms={},
            count=count,
            normalizer=_normalizer(plan, head, _target_total(mask, head_weight), mask.numel(), num_items, check_values),
            linear=linear,
            shard=shards[head.name],
            weight=head_weight,
            class_weights={t.class_weights: weights[t.class_weights] for t in head.terms if t.class_weights},
        )
        where = _SourceInputs(layout, head.name, batch.shard, head.hidden_input, inputs.document_ids)
        for target in head.teachers:
            form = leaf_form(target.form)
            batch.sources[target.name] = form.flatten(target.name, target, resolved[target.name], where)
            batch.forms[target.name] = form
        if len(head.groups) > 1:
            batch.groups = _group_positions(plan, head, batch, named, num_items, check_values)
        if check_values:
            _check_values(head, batch, plan, where)
        batches[head.name] = batch
    return batches
