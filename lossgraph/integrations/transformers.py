"""Hugging Face transformers: MTP heads on any `*ForCausalLM`, and a Trainer that runs a loss graph.

    from lossgraph.integrations.transformers import LossGraphTrainer, attach_mtp_heads

    graph = lossgraph.compile("mtp_distill.yaml")
    attach_mtp_heads(student, graph)              # one new linear head per head with offset > 1
    trainer = LossGraphTrainer(model=student, args=args, train_dataset=data,
                               loss_graph=graph, teachers={"teacher": teacher_model})
    trainer.train()

Heads with offset 1 use the model's own output embedding (`lm_head`); every other head of the graph
gets a `torch.nn.Linear` in `model.lossgraph_heads`, initialized as a copy of `lm_head` (it is
trained with the model and saved with its state dict). Batches follow the transformers convention:
`labels` aligned with `input_ids`, -100 where no loss is taken; they are shifted to next-token labels
here, and lossgraph shifts them further for each head's offset. Needs `pip install lossgraph[transformers]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer

from ..compiler.plan import TopKTarget
from ..errors import InputError, LossGraphError
from ..runtime.compiled import CompiledGraph, GraphOutput
from ..runtime.inputs import TopK

HEADS_ATTRIBUTE = "lossgraph_heads"


def _check_plain_logits(model: PreTrainedModel) -> None:
    """lossgraph applies the output heads itself, so models that post-process logits are refused."""
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1.0):
            raise LossGraphError(
                f"{type(model).__name__} post-processes its logits ({name}={value}); lossgraph computes "
                "head logits as hidden states @ head weights and does not reproduce that"
            )


def attach_mtp_heads(model: PreTrainedModel, graph: CompiledGraph) -> PreTrainedModel:
    """Add one linear head per graph head with offset > 1 (a copy of `lm_head`); returns the model."""
    _check_plain_logits(model)
    output = model.get_output_embeddings()
    if output is None:
        raise LossGraphError(f"{type(model).__name__} has no output embedding (lm_head) to copy")
    vocab, hidden = output.weight.shape
    heads = getattr(model, HEADS_ATTRIBUTE, None)
    if heads is None:
        heads = torch.nn.ModuleDict()
        model.add_module(HEADS_ATTRIBUTE, heads)
    for head in graph.plan.heads:
        if head.vocab_size != vocab:
            raise LossGraphError(
                f"head {head.name!r} declares vocab_size {head.vocab_size}, but the model's vocab is {vocab}"
            )
        if head.offset > 1 and head.name not in heads:
            layer = torch.nn.Linear(hidden, vocab, bias=output.bias is not None)
            layer.to(device=output.weight.device, dtype=output.weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(output.weight)
                if output.bias is not None:
                    layer.bias.copy_(output.bias)
            heads[head.name] = layer
    return model


def head_logits(
    model: PreTrainedModel, graph: CompiledGraph, input_ids: torch.Tensor, **model_inputs: Any
) -> dict[str, torch.Tensor]:
    """Logits [B, S, V] of every graph head that has losses, from one pass through the model's trunk."""
    hidden = model.base_model(input_ids=input_ids, **model_inputs).last_hidden_state
    heads = getattr(model, HEADS_ATTRIBUTE, None)
    logits = {}
    for head in graph.plan.heads:
        if not head.terms:
            continue
        if head.offset == 1:
            logits[head.name] = model.get_output_embeddings()(hidden)
        elif heads is None or head.name not in heads:
            raise LossGraphError(f"head {head.name!r} (offset {head.offset}) has no layer: call attach_mtp_heads first")
        else:
            logits[head.name] = heads[head.name](hidden)
    return logits


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' labels (aligned with input_ids) -> next-token labels (position s holds token s+1)."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def compute_loss(
    model: PreTrainedModel,
    batch: Mapping[str, Any],
    graph: CompiledGraph,
    teachers: Mapping[str, PreTrainedModel | Callable[..., torch.Tensor]] | None = None,
    step: int = 0,
    num_items: int | torch.Tensor | None = None,
) -> GraphOutput:
    """Run `graph` on one transformers batch.

    teachers: for each dense teacher source of the graph, a model (called with the batch's
    `input_ids` and `attention_mask`, under no_grad, once per step) or a callable taking the batch.
    Top-k teacher sources are read from the batch as `<source>_indices` and `<source>_logprobs`.
    num_items: transformers' `num_items_in_batch` (the label count over the accumulated batches),
    used as the normalizer of every head for gradient accumulation.
    """
    if "labels" not in batch and graph.plan.labels is not None:
        raise InputError("the batch has no 'labels'; the graph's labels source needs them")
    model_inputs = {k: v for k, v in batch.items() if k in ("attention_mask", "position_ids")}
    logits = head_logits(model, graph, batch["input_ids"], **model_inputs)
    labels = None
    if graph.plan.labels is not None:
        labels = next_token_labels(batch["labels"], graph.plan.labels.ignore_index)
    return graph(
        logits,
        labels=labels,
        teachers=_teacher_values(graph, teachers or {}, batch),
        step=step,
        num_items=_num_items(graph, num_items),
    )


def _num_items(graph: CompiledGraph, num_items: int | torch.Tensor | None):
    if num_items is None or graph.plan.normalization != "tokens":
        return None
    return num_items


def _teacher_values(graph: CompiledGraph, teachers: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, target in graph.plan.teachers.items():
        if isinstance(target, TopKTarget):
            keys = (f"{name}_indices", f"{name}_logprobs")
            missing = [key for key in keys if key not in batch]
            if missing:
                raise InputError(f"top-k teacher {name!r}: the batch has no {' or '.join(missing)}")
            values[name] = TopK(batch[keys[0]], batch[keys[1]])
            continue
        if name not in teachers:
            raise InputError(f"teacher {name!r}: pass teachers={{{name!r}: model or callable}}")
        teacher = teachers[name]
        if isinstance(teacher, torch.nn.Module):
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
            values[name] = lambda teacher=teacher, inputs=inputs: teacher(**inputs).logits
        else:
            values[name] = lambda teacher=teacher: teacher(batch)
    return values


class LossGraphTrainer(Trainer):
    """`transformers.Trainer` whose loss is a lossgraph graph; logs every term as `lossgraph/<node>/<head>`."""

    def __init__(
        self,
        *args: Any,
        loss_graph: CompiledGraph,
        teachers: Mapping[str, PreTrainedModel | Callable[..., torch.Tensor]] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # the graph normalizes by num_items_in_batch itself: transformers must not also divide the loss
        # by the gradient-accumulation steps, whatever the model's forward signature says
        self.model_accepts_loss_kwargs = True
        self.loss_graph = loss_graph
        self.teachers = dict(teachers or {})
        for teacher in self.teachers.values():
            if isinstance(teacher, torch.nn.Module):
                teacher.eval().requires_grad_(False)
        self._latest_terms: dict[str, torch.Tensor] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(
            model, inputs, self.loss_graph, self.teachers, step=self.state.global_step, num_items=num_items_in_batch
        )
        self._latest_terms = out.terms
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # transformers gathered num_items_in_batch over the processes, and DDP averages gradients:
            # undo the average, as transformers' own compute_loss does
            processes = self.accelerator.num_processes // (self.get_tp_size() if hasattr(self, "get_tp_size") else 1)
            loss = loss * (processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        if return_outputs:  # evaluation reads the outputs like a dict of tensors
            return loss, {"loss": loss.detach(), **out.terms}
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training logs: add the latest value of every term
            logs.update({f"lossgraph/{key}": float(value) for key, value in self._latest_terms.items()})
        super().log(logs, *args, **kwargs)
