"""The compiled graph: a `torch.nn.Module` that runs a plan inside a training step.

`lossgraph.compile(...)` returns a `CompiledGraph`. Calling it checks the inputs, lays them out per
head, evaluates each head with the chosen backend (the reference math or the fused Triton kernel)
and returns one differentiable loss with a per-term breakdown and per-head metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from .autograd import PrecomputedGradient
from ..document import check_spec, load
from ..errors import BackendError, ConfigError, InputError, SourceFileError
from .fused import FusedSupport, fused_head_result, head_layout, register_graph
from ..compiler.fusion import FusionPlan
from .inputs import HeadBatch, NumItems, TeacherValue, prepare_batches
from .linear import linear_head, reference_rows
from .parallel import GatherVocab, global_counts, group_size
from ..compiler.plan import DenseTarget, HeadPlan, Plan, Term
from .reference import compute_dtype, map_vocab, reference_terms
from ..spec.schedules import evaluate
from ..spec.models import LossGraphSpec

BACKENDS = ("auto", "torch", "triton")


class TermStep(NamedTuple):
    """A term's settings at one step: weight x head weight, temperature, and the T^2 factor (or 1)."""

    weight: float
    temperature: float
    scale: float


class HeadResult(NamedTuple):
    """What a backend returns for one head."""

    loss: torch.Tensor  # differentiable: sum over terms of weight x scale x value (weight-0 terms left out)
    values: torch.Tensor  # [terms] detached: each term's normalized value x scale, before the weight
    prediction: torch.Tensor  # [N] student argmax
    teacher_predictions: dict[str, torch.Tensor]  # [N] argmax of each teacher on the head's vocab


HeadEvaluator = Callable[[HeadPlan, HeadBatch, list[TermStep]], HeadResult]


@dataclass
class GraphOutput:
    """Result of one call: `loss` to call backward() on, and detached numbers for logging."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # "node/head" -> weighted term
    values: dict[str, torch.Tensor]  # "node/head" -> unweighted term (normalized, T^2-scaled if asked)
    weights: dict[str, float]  # "node/head" -> weight x head weight at this step
    metrics: dict[str, dict[str, torch.Tensor]]  # head -> tokens, accuracy, agreement/<teacher>

    def by_head(self) -> dict[str, torch.Tensor]:
        """Sum of the weighted terms of each head."""
        return self._sum_by(lambda key: key.split("/", 1)[1])

    def by_node(self) -> dict[str, torch.Tensor]:
        """Sum of the weighted terms of each loss node over its heads."""
        return self._sum_by(lambda key: key.split("/", 1)[0])

    def _sum_by(self, group: Callable[[str], str]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for key, value in self.terms.items():
            name = group(key)
            sums[name] = sums[name] + value if name in sums else value
        return sums


def term_step(term: Term, step: int) -> TermStep:
    """Evaluate a term's weight and temperature schedules at `step`."""
    weight = evaluate(term.weight, step) * term.head_weight
    temperature = evaluate(term.temperature, step)
    if torch.compiler.is_compiling():
        # a validated spec keeps schedules finite and temperatures positive; the checks below would
        # only add guards on the step to a compiled graph
        return TermStep(weight, temperature, temperature * temperature if term.temperature_scaling else 1.0)
    if not math.isfinite(weight):
        raise InputError(f"loss {term.node!r} has a non-finite weight ({weight}) at step {step}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"loss {term.node!r} has temperature {temperature} at step {step}; it must be > 0")
    scale = temperature * temperature if term.temperature_scaling else 1.0
    return TermStep(weight, temperature, scale)


def predictions(head: HeadPlan, batch: HeadBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student argmax and each teacher's argmax over the head's vocab (for the metrics)."""
    with torch.no_grad():
        student = batch.logits.argmax(-1)
        teachers = {name: map_vocab(t, head.vocab_size).argmax(-1) for name, t in batch.teachers.items()}
        for name, topk in batch.topk.items():
            teachers[name] = topk.indices.gather(1, topk.logprobs.argmax(-1, keepdim=True)).squeeze(1).long()
    return student, teachers


def weighted_sum(values: torch.Tensor, steps: list[TermStep]) -> torch.Tensor:
    """sum_t weight_t x values[t] over the terms whose weight is not 0 (a weight-0 term may be inf)."""
    active = [values[t] * s.weight for t, s in enumerate(steps) if s.weight != 0.0]
    return torch.stack(active).sum() if active else values.new_zeros(())


def reference_head(head: HeadPlan, batch: HeadBatch, steps: list[TermStep]) -> HeadResult:
    """The reference backend: plain PyTorch math, gradients by autograd."""
    raw = reference_terms(head.terms, batch, [s.temperature for s in steps])
    # a weight-0 term is reported but takes no part in the gradient: detached, so that a value it
    # cannot define (a broken teacher) does not reach the gradient as 0 x NaN
    values = torch.stack([(value if s.weight != 0.0 else value.detach()) * s.scale for value, s in zip(raw, steps)])
    if any(s.weight != 0.0 for s in steps):
        loss = weighted_sum(values, steps)
    else:  # every weight is 0 at this step: a zero loss that still backpropagates (zeros)
        loss = torch.zeros((), dtype=compute_dtype(batch.logits), device=batch.logits.device)
        if torch.is_grad_enabled() and batch.logits.requires_grad:  # no N x V zeros when none is asked for
            loss = PrecomputedGradient.apply(batch.logits, loss, torch.zeros_like(batch.logits), False, None)
    student, teachers = predictions(head, batch)
    return HeadResult(loss, values.detach(), student, teachers)


def _metrics(head: HeadPlan, batch: HeadBatch, result: HeadResult) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        count = batch.count
        denominator = count.clamp(min=1).to(torch.float32)
        metrics = {"tokens": count}
        if batch.labels is not None:
            metrics["accuracy"] = ((result.prediction == batch.labels) & batch.mask).sum() / denominator
        for name, teacher in result.teacher_predictions.items():
            metrics[f"agreement/{name}"] = ((result.prediction == teacher) & batch.mask).sum() / denominator
    return metrics


class CompiledGraph(torch.nn.Module):
    """A validated loss graph bound to a backend. Call it once per training step."""

    def __init__(
        self,
        spec: LossGraphSpec,
        plan: Plan,
        fusion: FusionPlan,
        backend: str = "auto",
        *,
        inplace_grad: bool = False,
        check_inputs: bool | None = None,
        chunk_size: int | None = None,
        accumulate_fp32: bool = False,
        vocab_parallel_group=None,
        normalize_across=None,
    ):
        super().__init__()
        if vocab_parallel_group is not None:
            _check_vocab_parallel(plan, vocab_parallel_group)
        if normalize_across is not None:
            group_size(normalize_across)  # fails clearly when torch.distributed is not initialized
        self.vocab_parallel_group = vocab_parallel_group
        self.normalize_across = normalize_across
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise InputError(f"chunk_size must be a positive number of rows, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.accumulate_fp32 = accumulate_fp32
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.spec = spec
        self.plan = plan
        self.fusion = fusion
        self.backend = backend
        # static per-head facts the fused backend reads on every call (kept trace-friendly)
        self.fused_token = register_graph(plan, fusion, owner=self)
        # where the fused backend can run, found now: torch.compile cannot trace these checks in a call
        self.fused_support = None if backend == "torch" else FusedSupport.probe()
        self.head_layouts = {head.name: head_layout(head) for head in plan.heads}
        self.inplace_grad = inplace_grad
        self.check_inputs = check_inputs

    def __setstate__(self, state) -> None:
        """A copy (copy.deepcopy, pickle) registers its plans under a token of its own, so that it keeps
        working when the original is collected, and finds out anew where the fused backend can run."""
        super().__setstate__(state)
        self.fused_token = register_graph(self.plan, self.fusion, owner=self)
        self.fused_support = None if self.backend == "torch" else FusedSupport.probe()

    def extra_repr(self) -> str:
        heads = ", ".join(f"{h.name}: {len(h.terms)} terms" for h in self.plan.heads)
        return f"backend={self.backend!r}, heads=({heads})"

    def evaluator(self, device: torch.device) -> HeadEvaluator:
        """The head evaluator the backend setting selects for tensors on `device`."""
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cuda"):
            return self.reference_evaluator
        refusal = self.fused_support.refusal(device)
        if refusal is not None:
            raise BackendError(refusal)
        return self.fused_evaluator

    def fused_evaluator(self, head: HeadPlan, batch: HeadBatch, steps: list[TermStep]) -> HeadResult:
        """The fused backend: one generated Triton kernel per head (per chunk for hidden-input heads)."""
        return fused_head_result(self, head, batch, steps)

    def reference_evaluator(self, head: HeadPlan, batch: HeadBatch, steps: list[TermStep]) -> HeadResult:
        """The reference math; chunked over rows for a hidden-input head; on full rows (gathered
        from every rank's slice) under vocab parallel."""
        if batch.linear is not None:
            return linear_head(
                self, head, batch, steps, lambda chunk, gradient: reference_rows(head, chunk, steps, gradient)
            )
        if batch.shard is not None:
            full = replace(
                batch,
                logits=GatherVocab.apply(batch.logits, batch.shard),
                teachers={name: GatherVocab.apply(t, batch.shard) for name, t in batch.teachers.items()},
                shard=None,
            )
            return reference_head(head, full, steps)
        return reference_head(head, batch, steps)

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        teachers: Mapping[str, TeacherValue] | None = None,
        step: int = 0,
        loss_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        num_items: NumItems = None,
    ) -> GraphOutput:
        """Evaluate every head's terms.

        logits: {head: [B, S, V] or [N, V]}; labels: next-token ids [B, S] (or [N]); teachers:
        {source: logits tensor, TopK, or a zero-argument callable, called once}; step: the training
        step for schedules; loss_mask: [B, S], nonzero where a label counts (shifted like labels);
        document_ids: [B, S], masks MTP targets across document boundaries; num_items: the token
        count to divide by (one number, or one per head) for gradient accumulation or data parallel.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InputError(f"step must be a Python int >= 0, got {step!r}")
        if self.normalize_across is not None and num_items is not None:
            raise InputError("give num_items or compile with normalize_across, not both: both set the normalizer")
        batches = prepare_batches(
            self.plan,
            logits,
            labels,
            teachers,
            loss_mask,
            document_ids,
            num_items,
            self.check_inputs,
            self.vocab_parallel_group,
        )
        if self.normalize_across is not None and self.plan.normalization == "tokens":
            counts = global_counts([batch.count for batch in batches.values()], self.normalize_across)
            for batch, count in zip(batches.values(), counts):
                batch.normalizer = count.clamp(min=1).to(torch.float32)
        device = next(iter(batches.values())).mask.device
        run_head = self.evaluator(device)
        total = None
        terms: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        metrics: dict[str, dict[str, torch.Tensor]] = {}
        for head in self.plan.heads:
            if head.name not in batches:
                continue
            batch = batches[head.name]
            steps = [term_step(term, step) for term in head.terms]
            result = run_head(head, batch, steps)
            total = result.loss if total is None else total + result.loss
            for index, (term, s) in enumerate(zip(head.terms, steps)):
                values[term.key] = result.values[index]
                # a weight-0 term adds exactly 0 (its value may be infinite: 0 x inf would be NaN)
                terms[term.key] = (
                    result.values[index] * s.weight if s.weight != 0.0 else torch.zeros_like(result.values[index])
                )
                weights[term.key] = s.weight
            metrics[head.name] = _metrics(head, batch, result)
        return GraphOutput(total, terms, values, weights, metrics)


def _check_vocab_parallel(plan: Plan, group) -> None:
    """What vocab parallel needs of a graph: even splits, logits heads, teachers on the head's vocab."""
    ranks = group_size(group)
    for head in plan.heads:
        if not head.terms:
            continue
        if head.hidden_input:
            raise BackendError(f"head {head.name!r} takes hidden states; vocab parallel needs logits heads")
        if head.vocab_size % ranks:
            raise BackendError(
                f"head {head.name!r} has vocab {head.vocab_size}, which does not split evenly over {ranks} ranks"
            )
        for teacher in head.teachers:
            if isinstance(teacher, DenseTarget) and teacher.vocab_size != head.vocab_size:
                raise BackendError(
                    f"teacher {teacher.name!r} (vocab {teacher.vocab_size}) and head {head.name!r} (vocab "
                    f"{head.vocab_size}) must share one vocab under vocab parallel"
                )


def compile(
    graph: LossGraphSpec | str | Path,
    backend: str = "auto",
    *,
    inplace_grad: bool = False,
    check_inputs: bool | None = None,
    chunk_size: int | None = None,
    accumulate_fp32: bool = False,
    vocab_parallel_group=None,
    normalize_across=None,
) -> CompiledGraph:
    """Compile a loss graph (a spec, or the path of a YAML file) into a callable module.

    backend: "torch" (reference math, any device), "triton" (one fused kernel per head), or "auto"
    (triton for CUDA tensors, torch otherwise). inplace_grad: the fused backend writes the gradient
    over the logits, saving one N x V buffer (the logits are destroyed). check_inputs: run the value
    checks that synchronize with the device (labels in range, top-k indices valid); None runs them
    for CPU tensors only. chunk_size: rows per chunk of a hidden-input head (default: chosen from V so
    that one chunk of logits takes at most 256 MiB); accumulate_fp32: accumulate the weight gradient
    of hidden-input heads in float32. vocab_parallel_group: a torch.distributed group over which every
    head's and dense teacher's logits are split along the vocab (rank r holds columns
    [r V/R, (r+1) V/R)); labels and top-k ids stay global. normalize_across: a group (the data-parallel
    one) over which each head's unmasked-token count is summed, so every rank divides by the global
    count (multiply the loss by the group's size when the gradients are averaged, as DDP does).
    """
    if isinstance(graph, str) and "\n" in graph:
        raise SourceFileError(
            "compile() takes a spec or the path of a YAML file, and this string has line breaks: "
            "for YAML text, use lossgraph.compile(lossgraph.loads(text))"
        )
    spec = graph if isinstance(graph, LossGraphSpec) else load(graph)
    report = check_spec(spec)
    context = report.context
    if context is None or context.plan is None or context.fusion is None:
        raise ConfigError(report.diagnostics)
    return CompiledGraph(
        spec,
        context.plan,
        context.fusion,
        backend,
        inplace_grad=inplace_grad,
        check_inputs=check_inputs,
        chunk_size=chunk_size,
        accumulate_fp32=accumulate_fp32,
        vocab_parallel_group=vocab_parallel_group,
        normalize_across=normalize_across,
    )
