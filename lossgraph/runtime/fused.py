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

from ..compiler.fusion import FusionPlan, Launch, SlotSource
from ..compiler.plan import DenseTarget, HeadPlan, Plan, TopKTarget
from ..errors import BackendError, KindError
from ..kernels import names
from ..kernels.arguments import Inputs, TermNumbers
from ..kernels.fragments import FragmentError, PhasedRows
from ..kernels.launcher import (
    KernelCacheError,
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
from .backend import BackendOptions, ChunkResult, HeadBackend, HeadResult, TermStep, diagnostic_columns
from .inputs import HeadBatch
from .linear import linear_head
from .parallel import VocabShard, all_reduce, combine_statistics

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class HeadNumbers(NamedTuple):
    """A head's per-call numbers: each temperature slot's 1/T (the slots of every launch, in order), then
    each term's gradient weight, value scale and loss weight (`TermNumbers`, over the head's terms).

    Plain floats: the launches pass them to the kernels as float arguments (kernels/arguments.py). Inside
    torch.compile they cross the op as one float64 CPU tensor (`flat`), which dynamo does not specialize on.
    """

    inverse_temperatures: list[float]
    gradient: list[float]
    value_scale: list[float]
    loss: list[float]

    def flat(self) -> list[float]:
        return [*self.inverse_temperatures, *self.gradient, *self.value_scale, *self.loss]

    @staticmethod
    def of(flat: list[float], slots: int) -> HeadNumbers:
        """The numbers `flat` gave, for a head whose launches have `slots` temperature slots."""
        terms = (len(flat) - slots) // 3
        per_term = flat[slots:]
        return HeadNumbers(flat[:slots], per_term[:terms], per_term[terms : 2 * terms], per_term[2 * terms :])


class HeadArguments(NamedTuple):
    """The tensors a head's launches read besides the logits, as the fused op takes them."""

    row_scale: torch.Tensor  # [N] or [N, term groups] float32
    labels: Optional[torch.Tensor]
    dense: list[torch.Tensor]
    topk_indices: list[torch.Tensor]
    topk_logprobs: list[torch.Tensor]
    class_weights: list[torch.Tensor]  # each class-weight vector [V_total] then its 0-d sum, vector after vector
    form_tensors: list[torch.Tensor]  # the tensors of the head's leaves of other forms, leaf after leaf


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
    diagnostics: tuple[int, ...] = ()  # the head's values column of each of the launch's row diagnostics


@dataclass(frozen=True)
class HeadKernels:
    """Every launch of one head for one set of gradient-active terms."""

    launches: tuple[LaunchBinding, ...]
    terms: int
    dense: int
    slots: int  # temperature slots of every launch of the head
    columns: int  # of the head's values: each term's, the rows' loss, then the row diagnostics

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

    The temperature slots are the plan's (`Launch.slots`, launch after launch), and so is what each
    holds (`Launch.slot_sources`, here with head-term indices).
    """

    plan: HeadPlan
    launches: tuple[Launch, ...]
    terms: tuple[tuple[int, ...], ...]  # per launch: the head-term index of each of its terms
    slot_sources: tuple[SlotSource | None, ...]  # per slot of every launch; None: fixed at 1
    dense: tuple[str, ...]  # dense teachers in the order the op takes them
    topk: tuple[str, ...]
    class_weights: tuple[str, ...] = ()  # class-weight vectors in the order the op takes them
    others: tuple[str, ...] = ()  # leaves of other forms, whose tensors the op takes in `form_tensors`
    diagnostics: tuple[tuple[int, str], ...] = ()  # (head term, name) of each row diagnostic, in column order
    row_diagnostics: bool = True  # the kernels write them (BackendOptions.row_diagnostics)

    @staticmethod
    def of(head: HeadPlan, launches: Sequence[Launch], row_diagnostics: bool = True) -> FusedHead:
        keys = [term.key for term in head.terms]
        terms = tuple(tuple(keys.index(term.key) for term in planned.terms) for planned in launches)
        return FusedHead(
            plan=head,
            launches=tuple(launches),
            terms=terms,
            slot_sources=tuple(
                None if source is None else replace(source, term=indices[source.term])
                for planned, indices in zip(launches, terms)
                for source in planned.slot_sources
            ),
            dense=tuple(t.name for t in head.teachers if isinstance(t, DenseTarget)),
            topk=tuple(t.name for t in head.teachers if isinstance(t, TopKTarget)),
            class_weights=tuple(dict.fromkeys(name for launch in launches for name in launch.class_weights)),
            others=tuple(t.name for t in head.teachers if any(t in launch.others for launch in launches)),
            diagnostics=diagnostic_columns(head.terms) if row_diagnostics else (),
            row_diagnostics=row_diagnostics,
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

    def numbers(self, steps: Sequence[TermStep]) -> HeadNumbers:
        """The head's per-call numbers at this step (what `TermStep`s become on their way to the kernels)."""
        inverse_temperatures = [
            1.0
            if source is None
            else 1.0 / (steps[source.term].target_temperature if source.teacher else steps[source.term].temperature)
            for source in self.slot_sources
        ]
        return HeadNumbers(
            inverse_temperatures,
            # what the kernel multiplies dl/ds by: weight x scale x ds/dz (= 1/T)
            [step.weight * step.scale / step.temperature for step in steps],
            [step.scale for step in steps],
            [step.weight for step in steps],
        )

    def kernels(self, active: tuple[bool, ...], gradient: bool) -> HeadKernels:
        """The launches' kernels for one set of gradient-active terms (values only without `gradient`)."""
        bindings = []
        start = 0
        first_diagnostic = len(self.plan.terms) + 1
        for planned, indices in zip(self.launches, self.terms):
            spec = planned.kernel_spec(tuple(active[i] for i in indices))
            if not self.row_diagnostics:
                spec = replace(spec, row_diagnostics=False)
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
                    diagnostics=tuple(
                        first_diagnostic + self.diagnostics.index((indices[t], name)) for t, name in spec.diagnostics
                    ),
                )
            )
            start = stop
        columns = first_diagnostic + len(self.diagnostics)
        return HeadKernels(tuple(bindings), len(self.plan.terms), len(self.dense), start, columns)


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
        self.heads = {
            head.name: FusedHead.of(head, fusion.for_head(head.name), options.row_diagnostics) for head in plan.heads
        }
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
        except FragmentError as error:
            raise KindError(str(error)) from None

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
        return HeadResult(
            loss, rows.values.detach(), rows.prediction, rows.teacher_predictions, rows.per_token, rows.diagnostics
        )


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
    arguments: HeadArguments,
    numbers: HeadNumbers,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every launch of the head's kernels `key`; `grad` is None for kernels that write no gradient."""
    kernels = _kernels(key)
    if kernels.identity:  # one launch holding every term and teacher in the head's order: its outputs are the head's
        return _launch(kernels.launches[0], logits, grad, arguments, numbers, shard)
    rows, terms = logits.shape[0], kernels.terms
    values = torch.zeros((rows, kernels.columns), dtype=torch.float32, device=logits.device)
    prediction = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    teacher_predictions = torch.zeros((len(arguments.dense), rows), dtype=torch.int64, device=logits.device)
    for binding in kernels.launches:
        launch_values, launch_prediction, launch_teachers = _launch(binding, logits, grad, arguments, numbers, shard)
        for column, term in enumerate(binding.terms):  # slices: a list index would sync with the GPU
            values[:, term] = launch_values[:, column]
        values[:, terms] += launch_values[:, len(binding.terms)]  # each launch's share of the row's loss
        for column, head_column in enumerate(binding.diagnostics, len(binding.terms) + 1):
            values[:, head_column] = launch_values[:, column]
        prediction = launch_prediction
        for local, head_index in enumerate(binding.dense):
            teacher_predictions[head_index] = launch_teachers[local]
    return values, prediction, teacher_predictions


def _launch(
    binding: LaunchBinding,
    logits: torch.Tensor,
    grad: Optional[torch.Tensor],
    head: HeadArguments,
    numbers: HeadNumbers,
    shard: VocabShard | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch of a head: its values [N, launch terms + 1 + its row diagnostics] (column `launch terms`
    its share of each row's loss), the student argmax [N] and its teachers' argmaxes [launch teachers, N]."""
    pairs = list(zip(head.class_weights[0::2], head.class_weights[1::2]))
    leaves = [(head.dense[i],) for i in binding.dense]
    leaves += [(head.topk_indices[i], head.topk_logprobs[i]) for i in binding.topk]
    leaves += [tuple(head.form_tensors[start:stop]) for start, stop in binding.others]
    target_arguments: dict[str, object] = {}
    for form, position, tensors in zip(binding.forms, binding.positions, leaves):
        target_arguments.update(form.kernel_tensors(tensors, position))
    inputs = Inputs(
        logits,
        head.row_scale,
        head.labels,
        target_arguments,
        numbers.inverse_temperatures[binding.slots[0] : binding.slots[1]],
        [pairs[i] for i in binding.class_weights],
    )
    launch_numbers = TermNumbers(
        [numbers.gradient[t] for t, term in zip(binding.terms, binding.spec.terms) if term.active],
        [numbers.value_scale[t] for t in binding.terms],
        [numbers.loss[t] for t in binding.terms],
    )
    if shard is None and not binding.spec.phased:
        return launch(binding.spec, inputs, grad=grad, numbers=launch_numbers)
    leaf_tensors = {}  # each leaf's tensors by the kernel arguments it binds, for the terms' row inputs
    for form, position, tensors in zip(binding.forms, binding.positions, leaves):
        leaf_tensors[frozenset(form.kernel_tensors(tensors, position))] = tensors
    return _phased_launch(binding.spec, inputs, grad, launch_numbers, shard, leaf_tensors)


def _phased_launch(
    spec: KernelSpec,
    inputs: Inputs,
    grad: Optional[torch.Tensor],
    numbers: TermNumbers,
    shard: VocabShard | None,
    leaf_tensors: dict[frozenset, tuple] | None = None,
):
    """One launch in phases: statistics (of this slice, combined across ranks under vocab parallel; of
    the whole vocab with `shard` None), the terms' row inputs across rows on the device (a phased spec),
    then the terms and the gradient. The same results as one launch over the whole vocab."""
    vocab = inputs.logits.shape[1]
    where = (
        {"vocab_start": shard.start, "vocab_total": shard.total} if shard else {"vocab_start": 0, "vocab_total": vocab}
    )
    statistics = launch_stats(spec, inputs, **where)
    if shard is not None:
        statistics = combine_statistics(layout(spec, "stats"), statistics, shard.group)
    if spec.phased:
        inputs = _with_row_inputs(spec, inputs, statistics.floats, leaf_tensors or {})
    reductions = None
    kernel = kernel_layout(spec)
    if kernel.reduction_terms:
        reductions = launch_reduce(spec, inputs, statistics.floats, **where)
        if shard is not None:
            reductions = all_reduce(reductions, dist.ReduceOp.SUM, shard.group)
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
    if streamed and shard is not None:  # each rank summed these over its own columns
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
    # copies: the fused op's outputs may not be views of one buffer (torch.compile checks)
    return values, statistics.ints[:, 0].clone(), statistics.ints[:, 1:].t().clone()


def _with_row_inputs(spec: KernelSpec, inputs: Inputs, floats: torch.Tensor, leaf_tensors: dict) -> Inputs:
    """`inputs` with the row inputs of the spec's terms (`LossFragments.row_inputs`), computed from every
    row's combined statistics by torch ops on the device: no host sync between the phases."""
    columns = {name: c for c, (name, _, _) in enumerate(layout(spec, "stats").float_stats())}

    def column(name: str) -> torch.Tensor:
        return floats[:, columns[name]].to(torch.float32)

    arguments = dict(inputs.target_arguments)
    for t, term in enumerate(spec.terms):
        if not term.loss.row_inputs(term):
            continue
        s = term.slot
        inverse = 1.0 if spec.slot_is_one[s] else float(inputs.inverse_temperatures[s])
        peak, log_sum = column(names.student_max(s)), torch.log(column(names.student_sum(s)))
        logit = column(names.LABEL_LOGIT)
        logprob = (logit * inverse - peak) - log_sum  # as the kernel's `logprob`
        student_entropy = None
        if names.moment(s) in columns:  # H = log S - M / S, M = sum_j exp(s_j - m)(s_j - m)
            student_entropy = log_sum - column(names.moment(s)) / column(names.student_sum(s))
        weight = inputs.row_scale[:, spec.group_of(t)] if spec.grouped else inputs.row_scale
        target = leaf_tensors[frozenset(term.target.kernel_arguments())]
        rows = PhasedRows(logprob, student_entropy, weight, target)
        values = term.loss.row_input_values(term, rows)
        for name, value in zip(term.loss.row_inputs(term), values):
            arguments[names.row_input(t, name)] = value.to(torch.float32).contiguous()
    return inputs._replace(target_arguments=arguments)


# The fused backend as torch.compile sees it: every launch of a head as one op, opaque, so that the
# compiler neither breaks the graph nor traces into Triton. Eager calls run the launches directly
# (`fused_rows`): a custom op's dispatch costs more host time than the launches it wraps.
#
# The op finds the head's kernels by a string key (`kernel_key`) in a registry of live backends: its
# arguments must be tensors and primitives, so it cannot take the backend, and the registry is weak so that
# a collected graph takes its kernels with it.


def _head_op(name: str, gradient: bool):
    """The op `lossgraph::{name}` and its fake: all launches of a head, returning (gradient [N, V] in the
    logits dtype, only with `gradient`; per-row values [N, HeadKernels.columns] (each term's value times its
    value scale, the row's weighted loss, then the row diagnostics); student argmax [N]; teacher argmaxes
    [dense teachers, N]).

    `scalars` is `HeadNumbers.flat()` as a CPU float64 tensor: a float argument of a custom op makes
    dynamo specialize on its value (one recompile per scheduled weight or temperature), a tensor does not.
    """

    def head(
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
    ):
        grad = torch.empty_like(logits) if gradient else None
        arguments = HeadArguments(row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors)
        # a CPU tensor: reading it is no device synchronization
        numbers = HeadNumbers.of(scalars.tolist(), _kernels(key).slots)
        outputs = _run_launches(key, logits, grad, arguments, numbers)
        return outputs if grad is None else (grad, *outputs)

    head.__annotations__["return"] = tuple[(torch.Tensor,) * (4 if gradient else 3)]
    op = torch.library.custom_op(f"lossgraph::{name}", head, mutates_args=())

    @op.register_fake
    def _fake(key, logits, row_scale, labels, dense, topk_indices, topk_logprobs, class_weights, form_tensors, scalars):
        rows = logits.shape[0]
        outputs = (
            logits.new_empty((rows, _kernels(key).columns), dtype=torch.float32),
            logits.new_empty((rows,), dtype=torch.int64),
            logits.new_empty((len(dense), rows), dtype=torch.int64),
        )
        return (torch.empty_like(logits), *outputs) if gradient else outputs

    return op


fused_head = _head_op("fused_head", gradient=True)
# the kernels that write no gradient (`key` from kernel_key(..., gradient=False)): nothing N x V written
fused_head_values = _head_op("fused_head_values", gradient=False)


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
    numbers = head.numbers(steps)
    inverse_normalizer = batch.normalizer.reciprocal()
    grouped = len(head.plan.groups) > 1
    if grouped:  # [N, groups]: each term group's weights over its normalizer (over group 0's with fold)
        row_scale = batch.row_scales(fold).contiguous()
    else:
        row_weight = batch.row_weight()  # the mask, times per-position weights where given
        row_scale = row_weight if fold else row_weight * inverse_normalizer
    topk = [batch.sources[name] for name in head.topk]
    arguments = HeadArguments(
        row_scale,
        batch.labels,
        [_rows(batch.sources[name]) for name in head.dense],
        [t.indices.contiguous() for t in topk],
        [t.logprobs.contiguous() for t in topk],
        [tensor for name in head.class_weights for tensor in batch.class_weights[name]],
        [tensor for name in head.others for tensor in batch.forms[name].tensors(batch.sources[name])],
    )
    # in place needs a single launch (later launches re-read the logits); inside torch.compile the
    # compiler owns the buffers and cannot functionalize a kernel that overwrites a graph input
    compiling = torch.compiler.is_compiling()
    in_place = gradient and inplace and len(head.launches) == 1 and not compiling
    rows = _rows(logits.detach())
    if in_place and rows.data_ptr() != logits.data_ptr():
        raise BackendError(f"inplace_grad needs logits of head {head.plan.name!r} with unit stride on the vocab")
    if in_place:
        # .data, not .detach(): its own version counter, so autograd does not see the caller's tensor
        # (a view of the model's output) modified and does not rebuild its backward as a copy
        rows = logits.data
    if compiling and batch.shard is None:
        scalars = torch.tensor(numbers.flat(), dtype=torch.float64)
        if gradient:
            grad, values, prediction, teacher_predictions = fused_head(key, rows, *arguments, scalars)
        else:
            grad, (values, prediction, teacher_predictions) = None, fused_head_values(key, rows, *arguments, scalars)
    else:  # eager, and vocab parallel (collectives between the phases: outside any compilable op)
        grad = (rows if in_place else torch.empty_like(rows)) if gradient else None
        values, prediction, teacher_predictions = _run_launches(key, rows, grad, arguments, numbers, batch.shard)
    terms = len(head.plan.terms)
    values, diagnostics = values[:, : terms + 1], values[:, terms + 1 :] if head.diagnostics else None
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
        grad,
        scaled,
        prediction,
        teachers,
        in_place,
        inverse_normalizer if fold else None,
        per_token.detach(),
        loss,
        diagnostics,
    )
