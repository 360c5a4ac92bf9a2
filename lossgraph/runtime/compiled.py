"""The compiled graph: a `torch.nn.Module` that runs a plan inside a training step.

`lossgraph.compile(...)` returns a `CompiledGraph`. Calling it checks the inputs, lays them out per
head, evaluates each head with the chosen backend (the reference math or the fused Triton kernel)
and returns one differentiable loss with a per-term breakdown and per-head metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compiler.fusion import FusionPlan
from ..compiler.plan import HeadPlan, Plan, Term
from ..document import check_spec, load
from ..errors import BackendError, ConfigError, InputError, SourceFileError
from ..kinds import loss_kind
from ..spec.models import LossGraphSpec
from ..spec.schedules import evaluate
from .backend import BACKENDS, BackendOptions, HeadBackend, HeadResult, TermStep, diagnostic_columns
from .fused import FusedBackend
from .inputs import HeadBatch, LabelAlignment, Linear, NumItems, TeacherValue, count_targets, prepare_batches
from .parallel import global_counts, group_size
from .reference_backend import ReferenceBackend

__all__ = ["BACKENDS", "CompiledGraph", "GraphOutput", "HeadResult", "TermStep", "compile", "term_step"]


@dataclass
class GraphOutput:
    """Result of one call: `loss` to call backward() on, and detached numbers for logging."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # "node/head" -> weighted term
    values: dict[str, torch.Tensor]  # "node/head" -> unweighted term (normalized, T^2-scaled if asked)
    weights: dict[str, float]  # "node/head" -> weight x head weight at this step
    # head -> tokens, accuracy, agreement/<teacher>, and "<node>/<metric>" of kinds that report their own
    # (policy_gradient's: docs/rl.md, "Metrics")
    metrics: dict[str, dict[str, torch.Tensor]]
    # "node/head" -> the term's value at every position ([B, S] or [N], float32, detached; 0 where
    # masked; T^2-scaled if asked): `values` is its sum, each position times its loss_mask weight, over
    # the normalizer. For analysis and logging; weight positions in the loss itself with a float loss_mask.
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)

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
    teacher = None if term.teacher_temperature is None else evaluate(term.teacher_temperature, step)
    if torch.compiler.is_compiling():
        # a validated spec keeps schedules finite and temperatures positive; the checks below would
        # only add guards on the step to a compiled graph
        return TermStep(weight, temperature, temperature * temperature if term.temperature_scaling else 1.0, teacher)
    if not math.isfinite(weight):
        raise InputError(f"loss {term.node!r} has a non-finite weight ({weight}) at step {step}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"loss {term.node!r} has temperature {temperature} at step {step}; it must be > 0")
    if teacher is not None and not (math.isfinite(teacher) and teacher > 0):
        raise InputError(f"loss {term.node!r} has teacher_temperature {teacher} at step {step}; it must be > 0")
    # temperature_scaling multiplies by the student's T^2 (the gradient's 1/T is the student's)
    scale = temperature * temperature if term.temperature_scaling else 1.0
    return TermStep(weight, temperature, scale, teacher)


def _metrics(head: HeadPlan, batch: HeadBatch, result: HeadResult, row_diagnostics: bool) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        count = batch.count
        denominator = count.clamp(min=1).to(torch.float32)
        metrics = {"tokens": count}
        if batch.labels is not None:
            metrics["accuracy"] = ((result.prediction == batch.labels) & batch.mask).sum() / denominator
        for name, teacher in result.teacher_predictions.items():
            metrics[f"agreement/{name}"] = ((result.prediction == teacher) & batch.mask).sum() / denominator
        if row_diagnostics:
            metrics.update(_term_metrics(head, batch, result.diagnostics))
    return metrics


def _term_metrics(head: HeadPlan, batch: HeadBatch, diagnostics: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The metrics the head's kinds report from their row diagnostics, as "<node>/<metric>"."""
    columns = diagnostic_columns(head.terms)
    if not columns:
        return {}
    if diagnostics is None:  # a head with no rows (a chunked head that evaluated none)
        diagnostics = torch.zeros((batch.mask.shape[0], len(columns)), device=batch.mask.device)
    metrics = {}
    for t, term in enumerate(head.terms):
        own = {name: diagnostics[:, c] for c, (owner, name) in enumerate(columns) if owner == t}
        if own:
            found = loss_kind(term.kind).metrics(term, own, batch.group(term.group))
            metrics.update({f"{term.node}/{name}": value for name, value in found.items()})
    return metrics


class CompiledGraph(torch.nn.Module):
    """A validated loss graph bound to a backend. Call it once per training step.

    It holds the graph's plan objects, its `options` (a frozen `BackendOptions`) and the backends that
    evaluate its heads: `reference_backend` always, `fused_backend` unless compiled with backend="torch".
    """

    def __init__(
        self, spec: LossGraphSpec, plan: Plan, fusion: FusionPlan, options: BackendOptions | None = None, **settings
    ):
        super().__init__()
        options = (options or BackendOptions()).with_settings(**settings)
        if options.vocab_parallel_group is not None:
            _check_vocab_parallel(plan, options.vocab_parallel_group)
        if options.normalize_across is not None:
            group_size(options.normalize_across)  # fails clearly when torch.distributed is not initialized
        self.spec = spec
        self.plan = plan
        self.fusion = fusion
        self.options = options
        self.reference_backend = ReferenceBackend(self.options)
        # the fused backend finds out now where it can run, and registers its plans for the fused op
        self.fused_backend = (
            None
            if options.backend == "torch"
            else FusedBackend(
                options, plan, fusion, fallback=self.reference_backend if options.backend == "auto" else None
            )
        )

    @property
    def backend(self) -> str:
        """The backend setting: "auto", "torch" or "triton"."""
        return self.options.backend

    def extra_repr(self) -> str:
        heads = ", ".join(f"{h.name}: {len(h.terms)} terms" for h in self.plan.heads)
        return f"backend={self.backend!r}, heads=({heads})"

    def backend_for(self, device: torch.device) -> HeadBackend:
        """The backend the `backend` setting selects for tensors on `device`."""
        if self.fused_backend is None or (self.backend == "auto" and device.type != "cuda"):
            return self.reference_backend
        refusal = self.fused_backend.refusal(device)
        if refusal is not None:
            raise BackendError(refusal)
        return self.fused_backend

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        teachers: Mapping[str, TeacherValue] | None = None,
        step: int = 0,
        loss_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        num_items: NumItems = None,
        *,
        input_ids: torch.Tensor | None = None,
        label_alignment: LabelAlignment = "next_token",
        masks: Mapping[str, torch.Tensor] | None = None,
        class_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> GraphOutput:
        """Evaluate every head's terms.

        logits: {head: [B, S, V] or [N, V]}, position s of every head being input position s; a DTensor
          split on the vocab (Shard(-1)) makes its head vocab parallel over its mesh's group, a
          replicated one is taken whole (docs/distributed.md).
        labels: token ids [B, S] (or [N]) in the `label_alignment`:
          - "next_token" (default): labels[b, s] is the token after position s (input_ids[b, s + 1]);
            a head of offset d reads labels[b, s + d - 1];
          - "input": labels[b, s] is the token at position s, aligned with input_ids as Hugging Face
            gives them (only [B, S]); a head of offset d reads labels[b, s + d], so it has no target at
            its last d positions.
        teachers: {source: logits tensor, TopK, or a zero-argument callable, called once}, aligned with
        the logits' positions in either alignment. step: the training step for schedules.
        loss_mask: aligned like the labels (in the same label_alignment), nonzero where a label counts,
        or float per-position weights (the loss is then their weighted mean).
        document_ids: [B, S], the document of each input position: a head never predicts a token of
        another document; under "next_token", mask the next-token head's cross-document labels yourself.
        num_items: the token count to divide by (one number, or one per head) for gradient
        accumulation or data parallel (see `tokens_per_head`).
        input_ids: [B, S] (or [N]), the tokens the logits were computed from; only read by the value
        checks (`check_inputs`), which refuse labels that match them in the other alignment.
        masks: {name: [B, S] (or [N]) bool or float tensor} for the losses that take `positions: {mask:
        name}`, indexed like the logits (position s of every head; not shifted by an offset or by the
        label_alignment); a float mask weights the positions.
        class_weights: {name: [vocab_size] float tensor} for the cross_entropy losses with `class_weights:
        name`: one weight >= 0 per token id (the whole vocab, also under vocab parallel), on the logits'
        device, as torch's F.cross_entropy(weight=...).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InputError(f"step must be a Python int >= 0, got {step!r}")
        options = self.options
        if options.normalize_across is not None and num_items is not None:
            raise InputError("give num_items or compile with normalize_across, not both: both set the normalizer")
        batches = prepare_batches(
            self.plan,
            logits,
            labels,
            teachers,
            loss_mask,
            document_ids,
            num_items,
            options.check_inputs,
            options.vocab_parallel_group,
            input_ids=input_ids,
            label_alignment=label_alignment,
            masks=masks,
            class_weights=class_weights,
        )
        if options.normalize_across is not None and self.plan.normalization == "tokens":
            _normalize_across(self.plan, batches, options.normalize_across)
        device = next(iter(batches.values())).mask.device
        backend = self.backend_for(device)
        total = None
        terms: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        metrics: dict[str, dict[str, torch.Tensor]] = {}
        per_token: dict[str, torch.Tensor] = {}
        for head in self.plan.heads:
            if head.name not in batches:
                continue
            batch = batches[head.name]
            steps = [term_step(term, step) for term in head.terms]
            result = backend.evaluate(head, batch, steps)
            total = result.loss if total is None else total + result.loss
            positions = _positions(logits[head.name])
            rows = result.per_token.to(torch.float32).unbind(1)
            for term, s, value, row in zip(head.terms, steps, result.values.unbind(0), rows):
                values[term.key] = value
                # a weight-0 term adds exactly 0 (its value may be infinite: 0 x inf would be NaN)
                terms[term.key] = value * s.weight if s.weight != 0.0 else torch.zeros_like(value)
                weights[term.key] = s.weight
                per_token[term.key] = row.reshape(positions)
            metrics[head.name] = _metrics(head, batch, result, options.row_diagnostics)
        return GraphOutput(total, terms, values, weights, metrics, per_token)

    def tokens_per_head(
        self,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        label_alignment: LabelAlignment = "next_token",
    ) -> dict[str, torch.Tensor]:
        """Each head's target count on a batch: {head: 0-d tensor} for every head with terms.

        What `normalization: tokens` divides a head's terms by when no num_items is given (int64; under
        a float loss_mask, the float32 sum of its weights). Sum it over the micro-batches of an
        optimizer step (and all-reduce it over data-parallel ranks) and pass the sum as `num_items`.
        The arguments mean what they mean in a call (labels in the `label_alignment`); the first one
        given says where the positions are, so a graph without labels needs one of the others.
        Runs no device synchronization unless `check_inputs` asks for value checks.
        """
        return count_targets(
            self.plan, labels, loss_mask, document_ids, input_ids, label_alignment, self.options.check_inputs
        )


def _normalize_across(plan: Plan, batches: dict[str, HeadBatch], group) -> None:
    """Divide by totals summed over the ranks of `group` (one all-reduce): each head's target total, and
    the total of each term group that divides by its own positions."""
    totals, owners = [], []
    for name, batch in batches.items():
        totals.append(batch.total())
        owners.append((batch, None))
        for index, positions in enumerate(plan.head(name).groups[1:]):
            if positions.normalizer == "positions":
                totals.append(batch.groups[index].total())
                owners.append((batch, index))
    for (batch, index), total in zip(owners, global_counts(totals, group)):
        normalizer = torch.where(total > 0, total, 1.0)
        if index is None:
            batch.normalizer = normalizer
        else:
            batch.groups[index].normalizer = normalizer
    for name, batch in batches.items():  # groups that divide by the head's target count follow it
        for index, positions in enumerate(plan.head(name).groups[1:]):
            if positions.normalizer == "targets":
                batch.groups[index].normalizer = batch.normalizer


def _positions(given: torch.Tensor | Linear) -> tuple[int, ...]:
    """The positions a head's input covers: [B, S] or [N] (the shape of its logits or hidden states
    without the last dimension)."""
    return tuple((given.hidden if isinstance(given, Linear) else given).shape[:-1])


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
            if teacher.vocab_columns and teacher.vocab_size != head.vocab_size:
                raise BackendError(
                    f"teacher {teacher.name!r} (vocab {teacher.vocab_size}) and head {head.name!r} (vocab "
                    f"{head.vocab_size}) must share one vocab under vocab parallel"
                )


def compile(
    graph: LossGraphSpec | str | Path,
    backend: str | None = None,
    *,
    options: BackendOptions | None = None,
    **settings,
) -> CompiledGraph:
    """Compile a loss graph (a spec, or the path of a YAML file) into a callable module.

    The settings are a `BackendOptions` (`options=`), or its fields as keywords, which replace those of
    `options` where both are given: `compile(path, "triton", inplace_grad=True)` is
    `compile(path, options=BackendOptions(backend="triton", inplace_grad=True))`.

    backend: "torch" (reference math, any device), "triton" (one fused kernel per head), or "auto"
    (the default: triton for CUDA tensors, torch otherwise). inplace_grad: the fused backend writes the
    gradient over the logits, saving one N x V buffer (the logits are destroyed). check_inputs: run the
    value checks that synchronize with the device (labels in range, top-k indices valid); None runs them
    for CPU tensors only. chunk_size: rows per chunk of a hidden-input head (default: chosen from V so
    that one chunk of logits takes at most 256 MiB); accumulate_fp32: accumulate the weight gradient
    of hidden-input heads in float32. vocab_parallel_group: a torch.distributed group over which every
    head's and dense teacher's logits are split along the vocab (rank r holds columns
    [r V/R, (r+1) V/R)); labels and top-k ids stay global. Logits given as a DTensor split on the vocab
    (Shard(-1), as ColwiseParallel(use_local_output=False) gives them) need no group: such a head is vocab
    parallel over its mesh's group, and its gradient goes back as a DTensor. normalize_across: a group
    (the data-parallel one) over which each head's unmasked-token count is summed, so every rank divides
    by the global count (multiply the loss by the group's size when the gradients are averaged, as DDP does).
    row_diagnostics: the per-row quantities some kinds compute beside their values for their metrics
    (policy_gradient's); False drops them, and those metrics, from both backends (and the kernels).
    """
    if isinstance(graph, str) and "\n" in graph:
        raise SourceFileError(
            "compile() takes a spec or the path of a YAML file, and this string has line breaks: "
            "for YAML text, use lossgraph.compile(lossgraph.loads(text))"
        )
    if backend is not None:
        settings["backend"] = backend
    options = (options or BackendOptions()).with_settings(**settings)
    spec = graph if isinstance(graph, LossGraphSpec) else load(graph)
    report = check_spec(spec)
    context = report.context
    if context is None or context.plan is None or context.fusion is None:
        raise ConfigError(report.diagnostics)
    return CompiledGraph(spec, context.plan, context.fusion, options)
