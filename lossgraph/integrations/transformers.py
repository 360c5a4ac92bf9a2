"""Hugging Face transformers: MTP heads on any `*ForCausalLM`, and a Trainer that runs a loss graph.

    from lossgraph.integrations.transformers import LossGraphTrainer, attach_mtp_heads

    graph = lossgraph.compile("mtp_distill.yaml")
    attach_mtp_heads(student, graph, style="medusa")   # one module per head with offset > 1
    trainer = LossGraphTrainer(model=student, args=args, train_dataset=data,
                               loss_graph=graph, teachers={"teacher": teacher_model})
    trainer.train()

Batches follow the transformers convention: `labels` aligned with `input_ids` (labels[b, s] is the
token at position s), -100 where no loss is taken. The graph is called with
`label_alignment="input"`, so lossgraph shifts them to each head's target (offset d reads the token
at s + d). Optional columns: `loss_mask` (aligned with `input_ids` like `labels`: nonzero where the
token counts as a target; float values weigh it), `position_ids` (packed sequences: a document starts
where they do not count up by one) or `document_ids`, and `<source>_indices` / `<source>_logprobs`
[S, k] for each top-k teacher source. Padding (`attention_mask` 0) is never a target. The guide is
docs/transformers.md. Needs `pip install lossgraph[transformers]`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer

from ..compiler.plan import TopKTarget
from ..errors import InputError
from ..runtime.compiled import CompiledGraph, GraphOutput
from ..runtime.inputs import TopK
from .mtp_heads import (
    HEADS_ATTRIBUTE,
    STYLES,
    DeepSeekMTPModule,
    IntegrationError,
    LogitProcessing,
    MedusaHead,
    MTPBlock,
    MTPHeads,
    attach_mtp_heads,
    check_processing,
    document_ids_from_positions,
    draft_tokens,
    forward_parameters,
    from_pretrained,
    load_mtp_heads,
    logit_processing,
    mtp_heads,
    tapped,
    unwrap_model,
)

__all__ = [
    "HEADS_ATTRIBUTE",
    "STYLES",
    "DeepSeekMTPModule",
    "IntegrationError",
    "LogitProcessing",
    "LossGraphTrainer",
    "MTPBlock",
    "MTPHeads",
    "MedusaHead",
    "attach_mtp_heads",
    "compute_loss",
    "document_ids_from_positions",
    "draft_tokens",
    "from_pretrained",
    "graph_columns",
    "head_logits",
    "load_mtp_heads",
    "logit_processing",
    "mtp_heads",
    "tokens_per_head",
    "topk_teacher_columns",
]

Teacher = PreTrainedModel | torch.nn.Module | Callable[[Mapping[str, Any]], Any]

# batch keys that are never passed to the model's forward by lossgraph
_NOT_MODEL_INPUTS = frozenset(
    {
        "labels",
        "use_cache",
        "cache",
        "past_key_values",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "logits_to_keep",
        "num_logits_to_keep",
        "num_items_in_batch",
    }
)


# --------------------------------------------------------------------------------------------------
# Batches.
# --------------------------------------------------------------------------------------------------


def graph_columns(graph: CompiledGraph) -> list[str]:
    """The batch columns lossgraph reads besides the model's inputs (the Trainer must keep them)."""
    columns = ["labels", "loss_mask", "document_ids", "position_ids", "attention_mask"]
    for name, target in graph.plan.teachers.items():
        if isinstance(target, TopKTarget):
            columns += [f"{name}_indices", f"{name}_logprobs"]
    return columns


def _documents(batch: Mapping[str, Any]) -> torch.Tensor | None:
    if batch.get("document_ids") is not None:
        return batch["document_ids"]
    positions = batch.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() in (1, 2) and "input_ids" in batch:
        documents = document_ids_from_positions(positions).expand_as(batch["input_ids"])
        return documents if bool((documents[:, -1] > 1).any()) else None
    return None


def _graph_inputs(graph: CompiledGraph, batch: Mapping[str, Any]):
    """(labels, loss_mask, document_ids) from a transformers batch, all aligned with input_ids: the graph
    takes them with label_alignment="input"."""
    if "input_ids" not in batch:
        raise InputError(f"the batch has no 'input_ids' (it has {', '.join(batch) or 'nothing'})")
    labels = None
    if graph.plan.labels is not None:
        labels = batch.get("labels")
        if labels is None:
            raise InputError(
                f"the batch has no 'labels'; the graph's labels source {graph.plan.labels.name!r} needs them "
                "(transformers' convention: aligned with input_ids, -100 where no loss is taken)"
            )
    mask = batch.get("loss_mask")
    attention = batch.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.dim() == 2:
        padding = attention != 0  # a padding token is never a target
        mask = padding if mask is None else (mask * padding if mask.is_floating_point() else (mask != 0) & padding)
    return labels, mask, _documents(batch)


def tokens_per_head(graph: CompiledGraph, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """What each head of the graph divides by on this batch (`normalization: tokens`): its target count,
    `graph.tokens_per_head` for a transformers batch.

    Sum it over the micro-batches of an optimizer step (and over data-parallel ranks) and pass the sum
    as `compute_loss(..., num_items=...)`: the accumulated gradient then equals one big batch's.
    A float `loss_mask` counts its weights.
    """
    labels, mask, documents = _graph_inputs(graph, batch)
    return graph.tokens_per_head(labels, mask, documents, input_ids=batch["input_ids"], label_alignment="input")


# --------------------------------------------------------------------------------------------------
# Running the model and the graph.
# --------------------------------------------------------------------------------------------------


def _model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    named, var_keyword = forward_parameters(type(model))
    inputs = {key: value for key, value in batch.items() if key in named and key not in _NOT_MODEL_INPUTS}
    if "use_cache" in named or var_keyword:
        inputs["use_cache"] = False
    return inputs


def _head_softcap(graph: CompiledGraph, name: str) -> float | None:
    head = graph.spec.heads.get(name) if graph.spec is not None else None
    return getattr(head, "softcap", None)


def _forward(
    model: torch.nn.Module, graph: CompiledGraph, batch: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], Any]:
    """One forward of the (possibly wrapped) model; the logits of every graph head that has losses."""
    inner = unwrap_model(model)
    for head in graph.plan.heads:
        if head.terms and head.hidden_input:
            raise IntegrationError(
                f"head {head.name!r} is declared `input: hidden`; the transformers integration gives every head "
                "its logits: declare `input: logits` (the default)"
            )
    inputs = _model_inputs(inner, batch)
    with tapped(model) as tap:
        outputs = model(**inputs)
    try:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        found: dict[str, torch.Tensor] = {}
        processing: LogitProcessing = tap.processing
        checked = False
        for head in graph.plan.heads:
            if not head.terms:
                continue
            softcap = _head_softcap(graph, head.name)
            if softcap is not None and softcap != processing.softcap:
                raise IntegrationError(
                    f"head {head.name!r} declares softcap: {softcap}, but {type(inner).__name__} "
                    + (
                        f"caps its logits at final_logit_softcapping={processing.softcap}; set softcap: "
                        f"{processing.softcap} (or remove it: lossgraph then gets the capped logits)"
                        if processing.softcap is not None
                        else "applies no final_logit_softcapping; remove softcap from the head"
                    )
                )
            if head.offset == 1 and softcap is None:
                found[head.name] = logits  # what the model's own loss would see
                continue
            if not checked:
                check_processing(tap, logits)
                checked = True
            if head.offset == 1:  # lossgraph caps them itself (the head's softcap), so pass them uncapped
                found[head.name] = processing.scaled(tap.raw)
                continue
            if not tap.mtp or head.name not in tap.mtp:
                raise IntegrationError(
                    f"head {head.name!r} (offset {head.offset}) has no module: call "
                    "attach_mtp_heads(model, graph) before training (and before wrapping the model)"
                )
            raw = tap.mtp[head.name]
            found[head.name] = processing.scaled(raw) if softcap is not None else processing(raw)
        return found, outputs
    finally:
        tap.clear()


def head_logits(
    model: torch.nn.Module, graph: CompiledGraph, input_ids: torch.Tensor, **model_inputs: Any
) -> dict[str, torch.Tensor]:
    """Logits [B, S, V] of every graph head that has losses, from one forward of the model."""
    return _forward(model, graph, {"input_ids": input_ids, **model_inputs})[0]


def _teacher_call(teacher: torch.nn.Module, batch: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
    """A zero-argument callable giving the teacher's logits on `device` (the teacher moved there once)."""
    if not isinstance(teacher, PreTrainedModel) and not hasattr(teacher, "get_base_model"):
        inner = teacher
    else:
        inner = unwrap_model(teacher)
    dispatched = getattr(inner, "hf_device_map", None) is not None or getattr(inner, "is_quantized", False)
    parameter = next(teacher.parameters(), None)
    if parameter is not None and parameter.device != device and not dispatched:
        teacher.to(device)
    target = device if not dispatched or parameter is None else parameter.device
    named, var_keyword = forward_parameters(type(inner))
    inputs = {
        key: batch[key].to(target)
        for key in ("input_ids", "attention_mask", "position_ids")
        if batch.get(key) is not None and (key in named or var_keyword)
    }
    if "use_cache" in named:
        inputs["use_cache"] = False

    def call() -> torch.Tensor:
        outputs = teacher(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        return logits.to(device)

    return call


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, TopK):
        return TopK(value.indices.to(device), value.logprobs.to(device))
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def _teacher_values(
    graph: CompiledGraph, teachers: Mapping[str, Teacher], batch: Mapping[str, Any], device: torch.device
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    unknown = sorted(set(teachers) - set(graph.plan.teachers))
    if unknown:
        raise InputError(
            f"teachers given for {', '.join(map(repr, unknown))}, which the graph does not read; "
            f"its teacher sources: {', '.join(graph.plan.teachers) or 'none'}"
        )
    for name, target in graph.plan.teachers.items():
        if isinstance(target, TopKTarget):
            keys = (f"{name}_indices", f"{name}_logprobs")
            missing = [key for key in keys if batch.get(key) is None]
            if missing:
                raise InputError(
                    f"top-k teacher {name!r}: the batch has no {' or '.join(missing)}; give every example "
                    f"the columns {keys[0]} and {keys[1]} ([S, {target.k}] each, for example from "
                    "topk_teacher_columns), and let a custom data collator keep them"
                )
            values[name] = TopK(batch[keys[0]], batch[keys[1]])
            continue
        if name not in teachers:
            raise InputError(f"teacher {name!r}: pass teachers={{{name!r}: model or callable}}")
        teacher = teachers[name]
        if isinstance(teacher, torch.nn.Module):
            values[name] = _teacher_call(teacher, batch, device)
        elif callable(teacher):
            values[name] = lambda teacher=teacher: _moved(teacher(batch), device)
        else:
            raise InputError(f"teacher {name!r} must be a model or a callable taking the batch")
    return values


def _check_term_positions(graph: CompiledGraph) -> None:
    """What the Trainer cannot do for a term with positions of its own: pass run-time masks, or count
    a term's own positions over an optimizer step (it counts each head's targets, `tokens_per_head`)."""
    for head in graph.plan.heads:
        for term in head.terms:
            group = head.groups[term.group]
            if group.mask is not None:
                raise IntegrationError(
                    f"loss {term.node!r} takes positions: {{mask: {group.mask}}}, a run-time mask that "
                    "LossGraphTrainer does not pass; call the graph yourself with masks=... (or lossgraph's "
                    "compute_loss in a Trainer subclass), or use positions: targets / all"
                )
            own_count = group.normalizer == "positions" and graph.plan.normalization == "tokens"
            if group.class_weights is not None and own_count:
                raise IntegrationError(
                    f"loss {term.node!r} has class_weights: {group.class_weights} divided by its labels' summed "
                    "class weights, but LossGraphTrainer divides every term by its head's target count over the "
                    "optimizer step (tokens_per_head), which has no class weights; set normalizer: targets on it, "
                    "or normalization: batch or sum"
                )
            if group.positions != "targets" and own_count:
                raise IntegrationError(
                    f"loss {term.node!r} takes positions: {group.positions} divided by their own count, but "
                    "LossGraphTrainer divides every term by its head's target count over the optimizer step "
                    "(tokens_per_head); set normalizer: targets on it, or normalization: batch or sum"
                )


def _num_items(graph: CompiledGraph, num_items: Any):
    if num_items is None or graph.plan.normalization != "tokens":
        return None
    return num_items


def _run(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    graph: CompiledGraph,
    teachers: Mapping[str, Teacher] | None,
    step: int,
    num_items: Any,
    class_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[GraphOutput, Any]:
    labels, loss_mask, documents = _graph_inputs(graph, batch)
    logits, outputs = _forward(model, graph, batch)
    device = batch["input_ids"].device
    out = graph(
        logits,
        labels=labels,
        teachers=_teacher_values(graph, teachers or {}, batch, batch["input_ids"].device),
        step=step,
        loss_mask=loss_mask,
        document_ids=documents,
        num_items=_num_items(graph, num_items),
        input_ids=batch["input_ids"],
        label_alignment="input",
        class_weights=None if class_weights is None else {n: w.to(device) for n, w in class_weights.items()},
    )
    return out, outputs


def compute_loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    graph: CompiledGraph,
    teachers: Mapping[str, Teacher] | None = None,
    step: int = 0,
    num_items: int | torch.Tensor | Mapping[str, int | torch.Tensor] | None = None,
    class_weights: Mapping[str, torch.Tensor] | None = None,
) -> GraphOutput:
    """Run `graph` on one transformers batch; the model may be wrapped (DDP, FSDP, DeepSpeed, PEFT).

    batch: `input_ids`, and `labels` aligned with them as transformers gives them (labels[b, s] is the
    token at position s, -100 where no loss is taken; not shifted): the graph runs with
    `label_alignment="input"`, and `loss_mask` is aligned the same way. With the value checks
    (`check_inputs`), labels that are already shifted are refused.
    teachers: for each dense teacher source of the graph, a model (moved to the batch's device once,
    then called with the batch's `input_ids`, `attention_mask` and `position_ids` under no_grad, once per
    step) or a callable taking the batch. Top-k teacher sources are read from the batch as
    `<source>_indices` and `<source>_logprobs`.
    num_items: what each head divides by (`normalization: tokens`): a number for every head, or a dict
    by head as `tokens_per_head` gives it summed over the micro-batches of a step. None: this batch's
    own counts.
    class_weights: {name: [vocab_size] tensor} for cross_entropy losses with `class_weights: name` (moved to
    the batch's device).
    """
    return _run(model, batch, graph, teachers, step, num_items, class_weights)[0]


@torch.no_grad()
def topk_teacher_columns(
    teacher: torch.nn.Module,
    batch: Mapping[str, Any],
    graph: CompiledGraph,
    source: str,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """`{<source>_indices, <source>_logprobs}` [B, S, k]: the teacher's top-k next-token log-probs.

    What a `topk_teacher` source of the graph reads (k from the graph), computed offline once, for
    example in `datasets.map(..., batched=True)`. Log-probs are at temperature 1.
    """
    target = graph.plan.teachers.get(source)
    if not isinstance(target, TopKTarget):
        names = [name for name, t in graph.plan.teachers.items() if isinstance(t, TopKTarget)]
        raise InputError(f"{source!r} is not a topk_teacher source of the graph (those are: {names or 'none'})")
    input_ids = torch.as_tensor(batch["input_ids"])
    parameter = next(teacher.parameters(), None)
    device = parameter.device if parameter is not None else input_ids.device
    attention = batch.get("attention_mask")
    call = _teacher_call(
        teacher,
        {
            "input_ids": input_ids.to(device),
            "attention_mask": None if attention is None else torch.as_tensor(attention).to(device),
        },
        device,
    )
    top = torch.log_softmax(call().float(), -1).topk(target.k, dim=-1)
    return {f"{source}_indices": top.indices.cpu(), f"{source}_logprobs": top.values.to(dtype).cpu()}


# --------------------------------------------------------------------------------------------------
# The Trainer.
# --------------------------------------------------------------------------------------------------


class LossGraphTrainer(Trainer):
    """`transformers.Trainer` whose loss is a lossgraph graph.

    Batches are transformers batches: `labels` aligned with `input_ids` (not shifted), as `compute_loss`
    takes them.

    - Training logs every term as `lossgraph/<node>/<head>`, averaged like `loss` over the steps since
      the last log (all micro-batches of gradient accumulation), so the terms sum to the logged loss.
    - Evaluation reports `eval_lossgraph/<node>/<head>` (terms, mean over batches like `eval_loss`) and
      `eval_lossgraph_metrics/<head>/<metric>` (accuracy, agreement/<teacher>; over the tokens).
    - Gradient accumulation: each head is normalized by its target count over the whole optimizer step
      (and over the processes, with `average_tokens_across_devices`), as one big batch would be.
    - The columns the graph reads (labels, loss_mask, position_ids, document_ids, top-k teacher
      columns) are kept by `remove_unused_columns`; `extra_columns` keeps more (for callable teachers).
    - Teacher models are frozen and moved to the training device.
    """

    def __init__(
        self,
        *args: Any,
        loss_graph: CompiledGraph,
        teachers: Mapping[str, Teacher] | None = None,
        extra_columns: Sequence[str] = (),
        class_weights: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(loss_graph, CompiledGraph):
            raise IntegrationError(
                f"loss_graph must be a compiled graph (lossgraph.compile(path)), got {type(loss_graph).__name__}"
            )
        self.loss_graph = loss_graph
        self.teachers = dict(teachers or {})
        self.extra_columns = list(extra_columns)
        self.class_weights = dict(class_weights or {})  # cross_entropy's run-time class weights, by name
        super().__init__(*args, **kwargs)
        self._check_setup()
        # each head is normalized over the whole step (tokens) or summed (sum): transformers must not also
        # divide the loss by the gradient-accumulation steps; `batch` is a per-batch mean, which it divides
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = loss_graph.plan.normalization != "batch"
        if loss_graph.plan.labels is None and self.args.label_names is None:
            # a graph without labels (pure distillation) still has a loss to evaluate: transformers only
            # computes one for batches without labels when the model "can return a loss" with no label names
            self.label_names = []
            self.can_return_loss = True
        for teacher in self.teachers.values():
            if isinstance(teacher, torch.nn.Module):
                teacher.eval().requires_grad_(False)
                inner = teacher if not hasattr(teacher, "get_base_model") else teacher.get_base_model()
                if getattr(inner, "hf_device_map", None) is None and not getattr(inner, "is_quantized", False):
                    teacher.to(self.args.device)
        self._term_keys = [term.key for term in loss_graph.plan.terms]
        self._term_sums: torch.Tensor | None = None  # since the last training log
        self._terms_logged_at = 0
        self._micro_terms: torch.Tensor | None = None
        self._counts_gathered = False
        self._evaluation: _EvalSums | None = None

    def _check_setup(self) -> None:
        graph, args = self.loss_graph, self.args
        if args.n_gpu > 1:
            raise IntegrationError(
                f"LossGraphTrainer does not run under torch.nn.DataParallel ({args.n_gpu} GPUs in one process): "
                "launch one process per GPU (torchrun / accelerate launch) or set CUDA_VISIBLE_DEVICES"
            )
        if self.label_smoother is not None:
            raise IntegrationError(
                f"label_smoothing_factor={args.label_smoothing_factor} does not apply to a loss graph: declare a "
                "label_smoothing source in the graph (sources: {smooth: {type: label_smoothing, source: labels, "
                "epsilon: 0.1}}) and set label_smoothing_factor to 0"
            )
        if self.compute_loss_func is not None:
            raise IntegrationError("compute_loss_func and loss_graph both define the loss: give only loss_graph")
        unknown = sorted(set(self.teachers) - set(graph.plan.teachers))
        if unknown:
            raise IntegrationError(
                f"teachers given for {', '.join(map(repr, unknown))}, which the graph does not read; "
                f"its teacher sources: {', '.join(graph.plan.teachers) or 'none'}"
            )
        dense = [n for n, t in graph.plan.teachers.items() if not isinstance(t, TopKTarget)]
        missing = [name for name in dense if name not in self.teachers]
        if missing:
            raise IntegrationError(
                f"the graph reads the teacher source(s) {', '.join(map(repr, missing))}: pass "
                f"teachers={{{missing[0]!r}: teacher_model}} (a model, or a callable taking the batch)"
            )
        _check_term_positions(graph)
        expected = list(graph.plan.class_weights)
        if sorted(self.class_weights) != sorted(expected):
            raise IntegrationError(
                f"the graph's cross_entropy losses read the class weights {expected or 'none'}, but class_weights "
                f"gives {sorted(self.class_weights) or 'none'}: pass class_weights={{name: [vocab_size] tensor}} "
                "for each of them"
            )
        inner = unwrap_model(self.model)
        needed = [h for h in graph.plan.heads if h.terms and h.offset > 1]
        heads = mtp_heads(inner)
        absent = [h.name for h in needed if heads is None or h.name not in heads.offsets]
        if absent:
            raise IntegrationError(
                f"the graph's head(s) {', '.join(map(repr, absent))} have no module on the model: call "
                "attach_mtp_heads(model, graph) before creating the Trainer (its optimizer must see them)"
            )

    # ---- columns --------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        keep = [*graph_columns(self.loss_graph), *self.extra_columns]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *keep]))

    # ---- normalization over the accumulated step -------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        device = args[0] if args else kwargs.get("device", self.args.device)  # transformers < 4.49: no device
        return batch_samples, self._step_counts(batch_samples, device)

    def _step_counts(self, batch_samples: list, device: torch.device) -> dict[str, torch.Tensor] | None:
        """Each head's target count over the micro-batches of one optimizer step (and the processes)."""
        graph = self.loss_graph
        self._counts_gathered = False
        if graph.plan.normalization == "batch" or not batch_samples:
            return None
        heads = [head.name for head in graph.plan.heads if head.terms]
        totals = torch.zeros(len(heads), dtype=torch.float64)
        for batch in batch_samples:
            counts = tokens_per_head(graph, batch)
            totals += torch.stack([counts[name].to("cpu", torch.float64) for name in heads])
        totals = totals.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            totals = self.accelerator.gather(totals[None]).sum(0)
            self._counts_gathered = True
        # a head without targets in the whole step contributes 0 whatever it is divided by
        return {name: totals[i].clamp(min=1).to(torch.float32) for i, name in enumerate(heads)}

    def _process_scale(self) -> int:
        """DDP averages gradients over processes; a loss normalized by the global count is multiplied back."""
        if not self._counts_gathered:
            return 1
        tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return self.accelerator.num_processes // max(tp, 1)

    # ---- the loss -----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = num_items_in_batch if isinstance(num_items_in_batch, Mapping) else None
        out, outputs = _run(
            model, inputs, self.loss_graph, self.teachers, self.state.global_step, counts, self.class_weights
        )
        loss = out.loss
        terms = torch.stack([out.terms[key] for key in self._term_keys]).detach().float()
        if counts is not None:
            scale = self._process_scale()
            if scale != 1:
                loss, terms = loss * scale, terms * scale
        if model.training:
            self._micro_terms = terms
        elif self._evaluation is not None:
            self._evaluation.add(out, loss.detach(), terms)
        if return_outputs:
            return loss, outputs
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._micro_terms = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        terms = self._micro_terms
        if terms is None:
            return loss
        if not self.loss_is_scaled_for_ga:  # transformers divided the loss by the accumulation steps
            terms = terms / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if self._term_sums is None:
            self._term_sums = torch.zeros_like(terms)
        if self.args.logging_nan_inf_filter and not bool(torch.isfinite(loss)):
            # as transformers does for the loss: count the average of the steps logged so far instead
            steps = 1 + self.state.global_step - self._terms_logged_at
            self._term_sums += self._term_sums / steps
        else:
            self._term_sums += terms.to(self._term_sums.device)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: the terms since the last one, averaged over its steps
            steps = self.state.global_step - self._terms_logged_at
            if self._term_sums is not None and steps > 0:
                sums = self._term_sums
                if self.args.world_size > 1:
                    sums = self.accelerator.gather(sums[None]).mean(0)
                values = (sums / steps).tolist()
                logs.update({f"lossgraph/{key}": value for key, value in zip(self._term_keys, values)})
                self._term_sums.zero_()
            self._terms_logged_at = self.state.global_step
        super().log(logs, *args, **kwargs)

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        bound = inspect.signature(Trainer.evaluation_loop).bind(self, *args, **kwargs)
        bound.apply_defaults()
        prefix = bound.arguments["metric_key_prefix"]
        self._evaluation = _EvalSums(self.loss_graph, self._term_keys)
        try:
            output = super().evaluation_loop(*args, **kwargs)
            output.metrics.update(self._evaluation.metrics(prefix, self))
        finally:
            self._evaluation = None
        return output


class _EvalSums:
    """Per-term sums over evaluation batches (mean over batches, like eval_loss) and per-head metrics
    over tokens."""

    def __init__(self, graph: CompiledGraph, keys: list[str]):
        self.keys = keys
        self.heads = [head.name for head in graph.plan.heads if head.terms]
        self.metric_keys: list[tuple[str, str]] = []
        self.sums: torch.Tensor | None = None  # [finite-loss batches, all batches] x [count, terms...]
        self.metric_sums: torch.Tensor | None = None

    def add(self, out: GraphOutput, loss: torch.Tensor, terms: torch.Tensor) -> None:
        if not self.metric_keys:
            self.metric_keys = [(h, m) for h in self.heads for m in out.metrics.get(h, {}) if m != "tokens"]
        row = torch.cat([torch.ones(1, device=terms.device), terms])
        finite = torch.isfinite(loss).reshape(1).to(row.dtype)
        rows = torch.stack([row * finite, row])
        self.sums = rows if self.sums is None else self.sums + rows
        values = []
        for head in self.heads:
            values.append(out.metrics[head]["tokens"].float())
        for head, name in self.metric_keys:
            values.append(out.metrics[head][name].float() * out.metrics[head]["tokens"].float())
        metric_row = torch.stack(values).to(terms.device)
        self.metric_sums = metric_row if self.metric_sums is None else self.metric_sums + metric_row

    def metrics(self, prefix: str, trainer: Trainer) -> dict[str, float]:
        if self.sums is None:
            return {}
        sums, metric_sums = self.sums, self.metric_sums
        if trainer.args.world_size > 1:
            sums = trainer.accelerator.gather(sums[None]).sum(0)
            metric_sums = trainer.accelerator.gather(metric_sums[None]).sum(0)
        # like eval_loss: batches whose loss is not finite are left out when some are (logging_nan_inf_filter)
        use = sums[0] if trainer.args.logging_nan_inf_filter and float(sums[0][0]) > 0 else sums[1]
        results = {f"{prefix}_lossgraph/{key}": float(value) for key, value in zip(self.keys, use[1:] / use[0])}
        tokens = dict(zip(self.heads, metric_sums[: len(self.heads)].tolist()))
        for (head, name), value in zip(self.metric_keys, metric_sums[len(self.heads) :].tolist()):
            results[f"{prefix}_lossgraph_metrics/{head}/{name}"] = value / tokens[head] if tokens[head] else math.nan
        return results
