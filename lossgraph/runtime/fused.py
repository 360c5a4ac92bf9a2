"""The fused backend: each head's launches as one opaque op, wrapped in an autograd Function.

Layers, bottom up:
  kernels/codegen.py, kernels/launcher.py   the generated Triton kernel and its launch
  `lossgraph::fused_head` (torch.library)    every launch of one head; opaque to torch.compile
  `PrecomputedGradient` (autograd.Function)  loss in forward, gradient already computed; backward
                                             only scales it by the incoming gradient
  `FusedBackend`                             the runtime's backend (lossgraph.runtime.backend.HeadBackend)

The loss and its gradient come out of the same launch, so backward never touches the logits again.
When no gradient is asked for (torch.no_grad, or logits that do not require it), the kernels that write
no gradient run instead (`lossgraph::fused_head_values`): nothing N x V is allocated or written.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ..compiler.fusion import FusionPlan, Launch
from ..compiler.plan import DenseTarget, HeadPlan, Plan, TopKTarget
from ..errors import BackendError
from ..kernels.launcher import (
    Inputs,
    KernelCacheError,
    TermNumbers,
    launch,
    launch_apply,
    launch_reduce,
    launch_stats,
    layout,
)
from ..kernels.layout import kernel_layout
from ..kernels.signature import KernelSpec
from ..kinds import LeafForm, leaf_form
from ..kinds.source import LaunchIndex
from .autograd import PrecomputedGradient
from .backend import BackendOptions, ChunkResult, HeadBackend, HeadResult, TermStep
from .inputs import HeadBatch
from .linear import linear_head
from .parallel import VocabShard, all_reduce, combine_statistics

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchBinding:
    """One launch of a head, with its inputs located in the head-level argument lists."""

    spec: KernelSpec
    terms: tuple[int, ...]  # head-term index of each kernel term
    dense: tuple[int, ...]  # head-level dense teacher index of each kernel teacher
    topk: tuple[int, ...]
    slots: tuple[int, int]  # where the launch's temperature slots lie in the head's list of slots
    class_weights: tuple[int, ...] = ()  # head-level index of each of the launch's class-weight vectors
    others: tuple[tuple[int, int], ...] = ()  # where each leaf of another form lies in the head's form_tensors
    # the form of each of the launch's leaves (dense, top-k, others) and its position among its form's
    forms: tuple[LeafForm, ...] = ()
    positions: tuple[int, ...] = ()


@dataclass(frozen=True)
class HeadKernels:
    """Every launch of one head for one set of gradient-active terms."""

    launches: tuple[LaunchBinding, ...]
    terms: int
    dense: int
    slots: int  # temperature slots of every launch of the head

    @property
    def identity(self) -> bool:
        """One launch whose terms and teachers are the head's, in the head's order."""
        if len(self.launches) != 1:
            return False
        (binding,) = self.launches
        return binding.terms == tuple(range(self.terms)) and binding.dense == tuple(range(self.dense))


@dataclass(frozen=True)
class FusedHead:
    """One head's plan objects and the static facts the fused op reads of them, found once per backend.

    The temperature slots are the plan's (`Launch.slots`, launch after launch); each holds the
    temperature of the terms the plan's kernel spec puts in it (`KernelTerm.slot`), or the constant 1.
    """

    plan: HeadPlan
    launches: tuple[Launch, ...]
    terms: tuple[tuple[int, ...], ...]  # per launch: the head-term index of each of its terms
    slot_terms: tuple[int | None, ...]  # per slot: a head term whose temperature it holds; None: fixed at 1
    dense: tuple[str, ...]  # dense teachers in the order the op takes them
    topk: tuple[str, ...]
    slot_teachers: tuple[bool, ...] = ()  # per slot: it holds that term's teacher_temperature (no term's own)
    class_weights: tuple[str, ...] = ()  # class-weight vectors in the order the op takes them
    others: tuple[str, ...] = ()  # leaves of other forms, whose tensors the op takes in `form_tensors`

    @staticmethod
    def of(head: HeadPlan, launches: Sequence[Launch]) -> FusedHead:
        keys = [term.key for term in head.terms]
        terms, slot_terms, slot_teachers = [], [], []
        for planned in launches:
            indices = tuple(keys.index(term.key) for term in planned.terms)
            spec = planned.kernel_spec()
            for slot, fixed_one in enumerate(spec.slot_is_one):
                held = [indices[t] for t, term in enumerate(spec.terms) if term.slot == slot]
                # a slot only a target's teachers are read at holds a term's teacher_temperature
                teachers = [indices[t] for t, term in enumerate(spec.terms) if term.teacher_slot == slot]
                slot_teachers.append(not fixed_one and not held and bool(teachers))
                held = held or teachers
                slot_terms.append(None if fixed_one or not held else held[0])
            terms.append(indices)
        return FusedHead(
            plan=head,
            launches=tuple(launches),
            terms=tuple(terms),
            slot_terms=tuple(slot_terms),
            dense=tuple(t.name for t in head.teachers if isinstance(t, DenseTarget)),
            topk=tuple(t.name for t in head.teachers if isinstance(t, TopKTarget)),
            slot_teachers=tuple(slot_teachers),
            class_weights=tuple(dict.fromkeys(name for launch in launches for name in launch.class_weights)),
            others=tuple(t.name for t in head.teachers if any(t in launch.others for launch in launches)),
        )

    def form_tensor_span(self, name: str) -> tuple[int, int]:
        """Where leaf `name` of another form lies in the op's `form_tensors`."""
        start = 0
        for leaf in self.plan.teachers:
            if leaf.name in self.others:
                count = leaf_form(leaf.form).tensor_count
                if leaf.name == name:
                    return start, start + count
                start += count
        raise KeyError(name)

    def inverse_temperatures(self, steps: Sequence[TermStep]) -> list[float]:
        """1/T of every slot at this step (a teacher-only slot: 1 / the term's teacher temperature)."""
        return [
            1.0 if term is None else 1.0 / (steps[term].target_temperature if teacher else steps[term].temperature)
            for term, teacher in zip(self.slot_terms, self.slot_teachers)
        ]

    def kernels(self, active: tuple[bool, ...], gradient: bool) -> HeadKernels:
        """The launches' kernels for one set of gradient-active terms (values only without `gradient`)."""
        bindings = []
        start = 0
        for planned, indices in zip(self.launches, self.terms):
            spec = planned.kernel_spec(tuple(active[i] for i in indices))
            stop = start + len(spec.slot_is_one)
            leaves = (*planned.dense, *planned.topk, *planned.others)
            index = LaunchIndex.of(leaves)
            bindings.append(
                LaunchBinding(
                    spec=spec if gradient else replace(spec, gradient=False),
                    terms=indices,
                    dense=tuple(self.dense.index(t.name) for t in planned.dense),
                    topk=tuple(self.topk.index(t.name) for t in planned.topk),
                    slots=(start, stop),
                    class_weights=tuple(self.class_weights.index(name) for name in planned.class_weights),
                    others=tuple(self.form_tensor_span(t.name) for t in planned.others),
                    forms=tuple(leaf_form(t.form) for t in leaves),
                    positions=tuple(index.positions[t.name] for t in leaves),
                )
            )
            start = stop
        return HeadKernels(tuple(bindings), len(self.plan.terms), len(self.dense), start)


# The fused op's registry: every live fused backend, by token, held weakly. A backend keeps the kernels
# found for its heads (by key, `<token>/<head>/<active terms>`), so they go when the backend is collected.
_BACKENDS: weakref.WeakValueDictionary[str, FusedBackend] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


@dataclass(frozen=True)
class FusedSupport:
    """Where the fused backend can run, found once when a graph is compiled.

    Finding a package and reading the environment are calls torch.compile cannot trace, so they
    happen here, outside any traced code; a call only looks up the device type in `refusals`.
    """

    refusals: tuple[tuple[str, str], ...]  # (device type, why the fused backend cannot run there)

    @staticmethod
    def probe() -> FusedSupport:
        if importlib.util.find_spec("triton") is None:
            why = "backend='triton' needs the triton package; install it, or use backend='torch'"
            return FusedSupport((("cuda", why), ("cpu", why)))
        if os.environ.get("TRITON_INTERPRET") == "1":
            return FusedSupport(())
        why = (
            "backend='triton' runs Triton kernels, which need a CUDA device; set TRITON_INTERPRET=1 before "
            "Python starts to run them on the CPU (slow; for tests), or use backend='torch'"
        )
        return FusedSupport((("cpu", why),))

    def refusal(self, device: torch.device) -> str | None:
        """Why the fused backend cannot take tensors on `device`, or None when it can."""
        for device_type, why in self.refusals:
            if device.type == device_type:
                return why
        if device.type in ("cuda", "cpu"):
            return None
        return f"backend='triton' runs on CUDA devices, and the tensors are on {device.type}; use backend='torch'"


class FusedBackend:
    """`HeadBackend` by the generated Triton kernels: every launch of a head as one opaque op.

    Built from the graph's options and plan objects; registers itself (weakly) under a token of its own,
    by which the op finds the head's launches, and keeps the kernels found for them. A copy (deepcopy,
    pickle) registers under a new token and finds out anew where it can run; collecting the backend
    (with the graph that holds it) frees both.
    """

    name = "triton"

    def __init__(self, options: BackendOptions, plan: Plan, fusion: FusionPlan, fallback: HeadBackend | None = None):
        self.options = options
        self.fallback = fallback  # evaluates the heads of a dtype the kernels do not take (backend="auto")
        self.heads = {head.name: FusedHead.of(head, fusion.for_head(head.name)) for head in plan.heads}
        self._start()

    def _start(self) -> None:
        # where the fused backend can run, found now: torch.compile cannot trace these checks in a call
        self.support = FusedSupport.probe()
        self.token = f"graph{next(_TOKENS)}"
        self.kernels: dict[str, HeadKernels] = {}
        _BACKENDS[self.token] = self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for own in ("support", "token", "kernels"):
            del state[own]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start()

    def __repr__(self) -> str:
        return f"FusedBackend(token={self.token!r})"

    def refusal(self, device: torch.device) -> str | None:
        """Why the fused backend cannot take tensors on `device`, or None when it can."""
        return self.support.refusal(device)

    def evaluate(self, head: HeadPlan, batch: HeadBatch, steps: Sequence[TermStep]) -> HeadResult:
        """The fused backend's evaluation of one head.

        Where the fused backend can run was found when the backend was built (see FusedSupport), so
        nothing here needs more than the tensors: torch.compile traces it whole.
        """
        try:
            return self._evaluate(head, batch, steps)
        except KernelCacheError as error:
            raise BackendError(str(error)) from None

    def _evaluate(self, head: HeadPlan, batch: HeadBatch, steps: Sequence[TermStep]) -> HeadResult:
        dtype = batch.linear.hidden.dtype if batch.linear is not None else batch.logits.dtype
        if dtype not in _SUPPORTED_DTYPES:
            if self.fallback is not None:
                return self.fallback.evaluate(head, batch, steps)
            raise BackendError(
                f"the fused kernel takes float32, bfloat16 or float16 logits, got {dtype} for head "
                f"{head.name!r}; use backend='torch' for float64"
            )
        fused_head = self.heads[head.name]
        if batch.linear is not None:

            def chunk_rows(chunk: HeadBatch, gradient: bool) -> ChunkResult:
                return fused_rows(self.token, fused_head, chunk, steps, inplace=True, gradient=gradient)

            return linear_head(self.options, head, batch, steps, chunk_rows)
        # under torch.no_grad (or for logits that need no gradient) the kernels write nothing N x V
        gradient = torch.is_grad_enabled() and batch.logits.requires_grad
        fold = batch.logits.dtype == torch.float16
        rows = fused_rows(
            self.token, fused_head, batch, steps, inplace=self.options.inplace_grad, fold=fold, gradient=gradient
        )
        loss = rows.loss
        if rows.grad is not None:
            loss = PrecomputedGradient.apply(batch.logits, loss, rows.grad, rows.in_place, rows.grad_scale)
        return HeadResult(loss, rows.values.detach(), rows.prediction, rows.teacher_predictions, rows.per_token)


@torch.compiler.assume_constant_result
def kernel_key(token: str, head_name: str, active: tuple[bool, ...], gradient: bool = True) -> str:
    """The key the fused op finds a head's kernels by, for one set of gradient-active terms; with
    `gradient` False, the kernels that write no gradient (values only: every term inactive).

    A pure function of constant arguments, so torch.compile evaluates it once while tracing.
    """
    if not gradient:
        active = (False,) * len(active)
    key = f"{token}/{head_name}/{''.join('1' if a else '0' for a in active)}{'' if gradient else '/values'}"
    backend = _BACKENDS[token]
    if key not in backend.kernels:
        backend.kernels[key] = backend.heads[head_name].kernels(active, gradient)
    return key


def _kernels(key: str) -> HeadKernels:
    """The kernels registered under `key` (by kernel_key)."""
    return _BACKENDS[key.split("/", 1)[0]].kernels[key]


def _run_launches(
    key: str,
    logits: torch.Tensor,
    grad: Optional[torch.Tensor],
    row_scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    dense: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    topk_logprobs: list[torch.Tensor],
    class_weights: list[torch.Tensor],
    form_tensors: list[torch.Tensor],
    scalars: torch.Tensor,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every launch of the head's kernels `key`; `grad` is None for kernels that write no gradient.
    `class_weights` holds each class-weight vector of the head and then its sum, vector after vector;
    `form_tensors` the tensors of the head's leaves of other forms (`FusedHead.others`), leaf after leaf."""
    kernels = _kernels(key)
    # a CPU tensor: reading it is no device synchronization
    numbers = scalars.tolist()
    inverse_temperatures, per_term = numbers[: kernels.slots], numbers[kernels.slots :]
    terms = kernels.terms
    head_numbers = TermNumbers(per_term[:terms], per_term[terms : 2 * terms], per_term[2 * terms :])
    pairs = list(zip(class_weights[0::2], class_weights[1::2]))
    head = _HeadInputs(
        logits, row_scale, labels, dense, topk_indices, topk_logprobs, inverse_temperatures, pairs, form_tensors
    )
    if kernels.identity:  # one launch holding every term and teacher in the head's order: its outputs are the head's
        return _launch(kernels.launches[0], head, grad, head_numbers, shard)
    rows = logits.shape[0]
    values = torch.zeros((rows, terms + 1), dtype=torch.float32, device=logits.device)
    prediction = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    teacher_predictions = torch.zeros((len(dense), rows), dtype=torch.int64, device=logits.device)
    for binding in kernels.launches:
        launch_values, launch_prediction, launch_teachers = _launch(binding, head, grad, head_numbers, shard)
        for column, term in enumerate(binding.terms):  # slices: a list index would sync with the GPU
            values[:, term] = launch_values[:, column]
        values[:, terms] += launch_values[:, len(binding.terms)]  # each launch's share of the row's loss
        prediction = launch_prediction
        for local, head_index in enumerate(binding.dense):
            teacher_predictions[head_index] = launch_teachers[local]
    return values, prediction, teacher_predictions


class _HeadInputs(NamedTuple):
    """What the fused op received for a head, for its launches to take their parts of."""

    logits: torch.Tensor
    row_scale: torch.Tensor
    labels: Optional[torch.Tensor]
    dense: list[torch.Tensor]
    topk_indices: list[torch.Tensor]
    topk_logprobs: list[torch.Tensor]
    inverse_temperatures: list[float]
    class_weights: list[tuple[torch.Tensor, torch.Tensor]]  # (vector [V_total] float32, its 0-d sum)
    form_tensors: list[torch.Tensor]  # the tensors of the leaves of other forms, leaf after leaf


def _launch(
    binding: LaunchBinding,
    head: _HeadInputs,
    grad: Optional[torch.Tensor],
    head_numbers: TermNumbers,
    shard: VocabShard | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch of a head: its values [N, launch terms + 1] (the last column its share of each row's
    loss), the student argmax [N] and its teachers' argmaxes [launch teachers, N]."""
    leaves = [(head.dense[i],) for i in binding.dense]
    leaves += [(head.topk_indices[i], head.topk_logprobs[i]) for i in binding.topk]
    leaves += [tuple(head.form_tensors[start:stop]) for start, stop in binding.others]
    target_arguments: dict[str, object] = {}
    for form, position, tensors in zip(binding.forms, binding.positions, leaves):
        target_arguments.update(form.kernel_tensors(tensors, position))
    inputs = Inputs(
        head.logits,
        head.row_scale,
        head.labels,
        target_arguments,
        head.inverse_temperatures[binding.slots[0] : binding.slots[1]],
        [head.class_weights[i] for i in binding.class_weights],
    )
    numbers = TermNumbers(
        [head_numbers.gradient[t] for t, term in zip(binding.terms, binding.spec.terms) if term.active],
        [head_numbers.value_scale[t] for t in binding.terms],
        [head_numbers.loss[t] for t in binding.terms],
    )
    if shard is None:
        return launch(binding.spec, inputs, grad=grad, numbers=numbers)
    return _sliced_launch(binding.spec, inputs, grad, numbers, shard)


def _sliced_launch(
    spec: KernelSpec, inputs: Inputs, grad: Optional[torch.Tensor], numbers: TermNumbers, shard: VocabShard
):
    """One launch under vocab parallel: statistics of this slice, combined across ranks, then the
    terms and this slice's gradient. The same results as one launch over the whole vocab."""
    where = {"vocab_start": shard.start, "vocab_total": shard.total}
    statistics = combine_statistics(layout(spec, "stats"), launch_stats(spec, inputs, **where), shard.group)
    reductions = None
    kernel = kernel_layout(spec)
    if kernel.reduction_terms:
        partial = launch_reduce(spec, inputs, statistics.floats, **where)
        reductions = all_reduce(partial, dist.ReduceOp.SUM, shard.group)
    values = launch_apply(
        spec,
        inputs,
        grad=grad,
        numbers=numbers,
        floats=statistics.floats,
        topk_logits=statistics.topk_logits,
        reductions=reductions,
        **where,
    )
    streamed = kernel.streamed_terms
    if streamed:  # each rank summed these over its own columns
        totals = all_reduce(torch.stack([values[:, t] for t in streamed], 1), dist.ReduceOp.SUM, shard.group)
        for column, term in enumerate(streamed):
            values[:, term] = totals[:, column]
        # the row's loss again, from the totals: the kernel took it over this rank's partial sums
        row_loss = torch.zeros_like(values[:, 0])
        for t, weight in enumerate(numbers.loss):
            if weight != 0.0 and spec.grouped:  # as the kernel: each term times its group's row scale
                row_loss += weight * values[:, t] * inputs.row_scale[:, spec.group_of(t)]
            elif weight != 0.0:
                row_loss += weight * values[:, t]
        values[:, len(numbers.loss)] = row_loss
    return values, statistics.ints[:, 0], statistics.ints[:, 1:].t()


# The three ops below are the fused backend as torch.compile sees it: opaque, so that the compiler
# neither breaks the graph nor traces into Triton. Eager calls skip them (`_dispatch`): a custom op's
# dispatch costs more host time than the launches it wraps.


def _head(
    key: str,
    logits: torch.Tensor,
    row_scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    dense: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    topk_logprobs: list[torch.Tensor],
    class_weights: list[torch.Tensor],
    form_tensors: list[torch.Tensor],
    scalars: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All launches of a head: (gradient [N, V] in the logits dtype, per-row values [N, terms + 1] (each
    term's value times its value scale, then the row's weighted loss), student argmax [N], teacher
    argmaxes [dense teachers, N]).

    `scalars` is a CPU float64 tensor: each temperature slot's 1/T (the slots of every launch, in order),
    then each term's gradient weight, value scale and loss weight (`TermNumbers`, term after term).
    A tensor rather than floats, so that a compiled graph does not specialize on their values.
    """
    grad = torch.empty_like(logits)
    values, prediction, teachers = _run_launches(
        key, logits, grad, row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors, scalars
    )
    return grad, values, prediction, teachers


def _head_inplace(
    key: str,
    logits: torch.Tensor,
    row_scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    dense: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    topk_logprobs: list[torch.Tensor],
    class_weights: list[torch.Tensor],
    form_tensors: list[torch.Tensor],
    scalars: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `_head`, but the gradient overwrites the logits (one N x V buffer saved)."""
    return _run_launches(
        key, logits, logits, row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors, scalars
    )


def _head_values(
    key: str,
    logits: torch.Tensor,
    row_scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    dense: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    topk_logprobs: list[torch.Tensor],
    class_weights: list[torch.Tensor],
    form_tensors: list[torch.Tensor],
    scalars: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `_head` for kernels that write no gradient (`key` from kernel_key(..., gradient=False)):
    the values and argmaxes only, and nothing N x V allocated or written."""
    return _run_launches(
        key, logits, None, row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors, scalars
    )


fused_head = torch.library.custom_op("lossgraph::fused_head", _head, mutates_args=())
fused_head_inplace = torch.library.custom_op("lossgraph::fused_head_inplace", _head_inplace, mutates_args=("logits",))
fused_head_values = torch.library.custom_op("lossgraph::fused_head_values", _head_values, mutates_args=())


def _fake_results(key: str, logits: torch.Tensor, dense: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Shapes of (values, student argmax, teacher argmaxes), for torch.compile's tracing."""
    rows = logits.shape[0]
    return (
        logits.new_empty((rows, _kernels(key).terms + 1), dtype=torch.float32),
        logits.new_empty((rows,), dtype=torch.int64),
        logits.new_empty((len(dense), rows), dtype=torch.int64),
    )


@fused_head.register_fake
def _fused_head_fake(
    key, logits, row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors, scalars
):
    return (torch.empty_like(logits), *_fake_results(key, logits, dense))


@fused_head_inplace.register_fake
def _fused_head_inplace_fake(
    key, logits, row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors, scalars
):
    return _fake_results(key, logits, dense)


@fused_head_values.register_fake
def _fused_head_values_fake(
    key, logits, row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors, scalars
):
    return _fake_results(key, logits, dense)


_EAGER = {fused_head: _head, fused_head_inplace: _head_inplace, fused_head_values: _head_values}


def _dispatch(op, *arguments):
    """`op` inside torch.compile; its implementation, called directly, in eager mode."""
    return op(*arguments) if torch.compiler.is_compiling() else _EAGER[op](*arguments)


def _active_terms(steps) -> tuple[bool, ...]:
    """Which terms take part in the gradient (weight not 0), as plain bools.

    Written with `if` on purpose: under torch.compile a weight that follows a schedule is symbolic, and
    branching on it makes dynamo guard on the comparison and continue with a constant, so a compiled
    graph is specialized on the active set and recompiles only when that set changes.
    """
    active = []
    for step in steps:
        if step.weight != 0.0:
            active.append(True)
        else:
            active.append(False)
    return tuple(active)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along the vocab, as the kernel addresses them."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def fused_rows(
    token: str,
    head: FusedHead,
    batch: HeadBatch,
    steps: Sequence[TermStep],
    *,
    inplace: bool,
    fold: bool = False,
    gradient: bool = True,
) -> ChunkResult:
    """Run every launch of `head` (of the backend registered as `token`) over the rows of
    `batch.logits`; with `inplace` the gradient overwrites the logits (only possible when the head is
    one launch). With `fold`, the gradient is written without the 1/normalizer factor, which is
    returned as `grad_scale` for backward to apply: float16 gradients then keep small entries that 1/N
    would flush to zero. With `gradient` False the kernels write no gradient (the result's `grad` is
    None) and the logits are left as they are."""
    logits = batch.logits
    key = kernel_key(token, head.plan.name, _active_terms(steps), gradient)
    # what the kernel multiplies dl/ds by: weight x scale x ds/dz (= 1/T); each value's scale; each
    # term's weight in the loss
    numbers = [
        *head.inverse_temperatures(steps),
        *(step.weight * step.scale / step.temperature for step in steps),
        *(step.scale for step in steps),
        *(step.weight for step in steps),
    ]
    scalars = torch.tensor(numbers, dtype=torch.float64)
    inverse_normalizer = batch.normalizer.reciprocal()
    grouped = len(head.plan.groups) > 1
    if grouped:  # [N, groups]: each term group's weights over its normalizer (over group 0's with fold)
        row_scale = batch.row_scales(fold).contiguous()
    else:
        row_weight = batch.row_weight()  # the mask, times per-position weights where given
        row_scale = row_weight if fold else row_weight * inverse_normalizer
    topk = [batch.sources[name] for name in head.topk]
    arguments = (
        row_scale,
        batch.labels,
        [_rows(batch.sources[name]) for name in head.dense],
        [t.indices.contiguous() for t in topk],
        [t.logprobs.contiguous() for t in topk],
        [tensor for name in head.class_weights for tensor in batch.class_weights[name]],
        [tensor for name in head.others for tensor in batch.forms[name].tensors(batch.sources[name])],
        scalars,
    )
    # in place needs a single launch (later launches re-read the logits); inside torch.compile the
    # compiler owns the buffers and cannot functionalize a kernel that overwrites a graph input
    in_place = gradient and inplace and len(head.launches) == 1 and not torch.compiler.is_compiling()
    rows = _rows(logits.detach())
    if in_place and rows.data_ptr() != logits.data_ptr():
        raise BackendError(f"inplace_grad needs logits of head {head.plan.name!r} with unit stride on the vocab")
    if in_place:
        # .data, not .detach(): its own version counter, so autograd does not see the caller's tensor
        # (a view of the model's output) modified and does not rebuild its backward as a copy
        rows = logits.data
    grad = None
    if batch.shard is not None:  # collectives between the phases: eager only, outside the compilable op
        if gradient:
            grad = rows if in_place else torch.empty_like(rows)
        values, prediction, teacher_predictions = _run_launches(key, rows, grad, *arguments, shard=batch.shard)
    elif not gradient:
        values, prediction, teacher_predictions = _dispatch(fused_head_values, key, rows, *arguments)
    elif in_place:
        grad = rows
        values, prediction, teacher_predictions = _dispatch(fused_head_inplace, key, grad, *arguments)
    else:
        grad, values, prediction, teacher_predictions = _dispatch(fused_head, key, rows, *arguments)
    # each term's rows and the rows' loss, weighted and divided by the normalizer (the kernels write 0 for
    # masked rows); a product and a sum rather than a matrix product, which TF32 settings would round
    if grouped:  # each term by its group's scale; the kernels wrote the rows' loss already scaled
        columns = [row_scale[:, term.group] for term in head.plan.terms]  # slices: a list index would sync
        scale = torch.stack([*columns, torch.ones_like(columns[0])], 1)
        sums = (values * scale).sum(0)
    else:
        sums = (values * row_scale[:, None]).sum(0)
    if fold:
        sums = sums * inverse_normalizer
    scaled, loss, per_token = sums[:-1], sums[-1], values[:, :-1]
    teachers = {name: teacher_predictions[index] for index, name in enumerate(head.dense)}
    for name in (*head.topk, *head.others):  # the kernels give the dense teachers' argmaxes
        predicted = batch.forms[name].prediction(batch.sources[name], head.plan.vocab_size)
        if predicted is not None:
            teachers[name] = predicted
    return ChunkResult(
        grad, scaled, prediction, teachers, in_place, inverse_normalizer if fold else None, per_token.detach(), loss
    )
