"""TRL: a `GRPOTrainer` whose loss is a lossgraph graph.

    from lossgraph.integrations.trl import LossGraphGRPOTrainer

    trainer = LossGraphGRPOTrainer(model=policy, reward_funcs=reward, args=GRPOConfig(...),
                                   train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

TRL generates, scores and computes the advantages as usual; only the loss changes. Without `loss_graph`
the trainer compiles `grpo_document(args, vocab_size)`: a `policy_gradient` node (and a `kl_estimate`
node with `beta`) that reproduces TRL's own loss for `loss_type` grpo, bnpo, dr_grpo, dapo or cispo. With
`loss_graph`, any graph with one head and a `rollout` source runs instead, e.g. the policy gradient next
to an exact `reverse_kl` to the reference model, whose logits come from `teachers={"reference": model}`
(each teacher is run on the same prompt + completion, without gradient).

Per step the graph gets the completion's logits at the policy's positions ([B, T, V]: position t
predicts completion token t), the completion tokens as labels (-100 where the completion mask is 0),
and `Rollout(advantages, old_per_token_logps, ref_per_token_logps)` from TRL's batch (old log-probs
absent, as TRL leaves them on-policy: the detached log-probs of this forward, TRL's own convention).
The loss is divided as TRL's `loss_type` says, also for a graph of your own (gradient accumulation,
and `num_items_in_batch` as `num_items` for dapo and cispo, which a `token_mean` aggregation takes).
Logged: `kl` (the token mean of the node named `kl`, TRL's metric), each term's value as
`lossgraph/<node>/<head>` and the head metrics. `demonstrations` with a `demonstration_graph` add an LM
loss on a batch of its own (a second call).

`generalized_jsd_loss` is TRL's `GKDTrainer.generalized_jsd_loss` computed by a `jsd` node: set it as a
GKDTrainer subclass's static method. The guide is docs/rl.md ("With TRL", "TRL's GKDTrainer with
lossgraph's jsd"). Needs `pip install lossgraph[rl]`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from importlib.resources import files
from typing import Any

import torch
import yaml
from trl import GRPOTrainer

from ..document import loads
from ..errors import InputError
from ..kinds import loss_kind
from ..kinds.sources.rollout import Rollout, RolloutTarget
from ..runtime.compiled import CompiledGraph, GraphOutput
from ..runtime.compiled import compile as compile_graph
from .mtp_heads import IntegrationError, unwrap_model
from .transformers import compute_loss as transformers_compute_loss

__all__ = [
    "EXPRESSED_LOSS_TYPES",
    "GKD_REDUCTIONS",
    "LossGraphGRPOTrainer",
    "generalized_jsd_loss",
    "grpo_document",
]

#: TRL's `loss_type` -> the policy_gradient node's aggregation
EXPRESSED_LOSS_TYPES = {
    "grpo": "sequence_mean",
    "bnpo": "token_mean",
    "dr_grpo": "constant",
    "dapo": "token_mean",
    "cispo": "token_mean",
}
# loss types whose count is TRL's `num_items_in_batch` (the generation batch's tokens over the processes)
_COUNTED_OVER_THE_GENERATION_BATCH = ("dapo", "cispo")
# the names of lossgraph/data/trl_grpo.yaml
_ROLLOUT, _POLICY, _KL = "rollouts", "pg", "kl"

Teacher = torch.nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _unexpressed(args) -> list[str]:
    """The GRPOConfig settings a lossgraph graph does not reproduce (each says how to fix it)."""
    problems = []
    if args.loss_type not in EXPRESSED_LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r}: use one of {', '.join(EXPRESSED_LOSS_TYPES)}")
    if args.importance_sampling_level not in ("token", "sequence"):
        problems.append(f"importance_sampling_level={args.importance_sampling_level!r}: use 'token' or 'sequence'")
    if args.beta != 0.0 and args.use_bias_correction_kl:
        problems.append("use_bias_correction_kl=True (k3 times the ratio): set use_bias_correction_kl=False")
    if args.off_policy_mask_threshold is not None:
        problems.append("off_policy_mask_threshold: leave it None")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        problems.append("vllm_importance_sampling_correction=True: set it False")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        problems.append("an entropy bonus (entropy_coef, use_adaptive_entropy): leave it off")
    return problems


def grpo_document(args, vocab_size: int) -> dict[str, Any]:
    """The loss graph (as a YAML-shaped dict) of TRL's GRPOTrainer loss for this `GRPOConfig`:
    lossgraph/data/trl_grpo.yaml with its values.

    One head `next`, the completion tokens as `labels`, a `rollout` source `rollouts` with old (and, with
    `beta`, reference) log-probs, a `policy_gradient` node `pg` with TRL's epsilon, epsilon_high, delta,
    temperature and aggregation, and with `beta` != 0 a `kl_estimate` node `kl` (k3) of weight beta with
    the same aggregation. Raises `IntegrationError` for the settings it does not reproduce."""
    problems = _unexpressed(args)
    if problems:
        raise IntegrationError("lossgraph does not reproduce these GRPOConfig settings: " + "; ".join(problems))
    document = yaml.safe_load(files("lossgraph").joinpath("data/trl_grpo.yaml").read_text(encoding="utf-8"))
    document["vocab_size"] = int(vocab_size)
    aggregation = EXPRESSED_LOSS_TYPES[args.loss_type]
    rollout_fields: dict[str, Any] = {"aggregation": aggregation, "temperature": float(args.temperature)}
    if aggregation == "constant":
        rollout_fields["max_completion_length"] = int(args.max_completion_length)
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if args.loss_type == "cispo":
        policy = {"objective": "cispo", "epsilon_high": float(epsilon_high)}
    else:
        policy = {"epsilon_low": float(args.epsilon), "epsilon_high": float(epsilon_high)}
        if args.delta is not None:
            policy["delta"] = float(args.delta)
    if args.importance_sampling_level == "sequence":  # GSPO: each completion is one sequence
        policy["importance_sampling"] = "sequence"
    if args.top_entropy_quantile < 1.0:  # the policy term on the batch's highest-entropy tokens only
        policy["top_entropy_quantile"] = float(args.top_entropy_quantile)
    losses = document["losses"]
    losses[_POLICY].update(policy, **rollout_fields)
    if args.beta == 0.0:
        del losses[_KL]
        document["sources"][_ROLLOUT]["ref_logprobs"] = False
    else:
        losses[_KL].update(weight=float(args.beta), **rollout_fields)
    return document


def _rollout_source(graph: CompiledGraph) -> tuple[str, RolloutTarget]:
    rollouts = [(name, target) for name, target in graph.plan.teachers.items() if isinstance(target, RolloutTarget)]
    if len(graph.plan.heads) != 1 or len(rollouts) != 1:
        raise IntegrationError(
            f"LossGraphGRPOTrainer runs a graph with one head and one rollout source; this one has "
            f"{len(graph.plan.heads)} heads and {len(rollouts)} rollout sources"
        )
    return rollouts[0]


class LossGraphGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with its loss computed by a lossgraph graph (module docstring).

    loss_graph: a compiled graph with one head and one `rollout` source (default: `grpo_document(args)`,
    TRL's own loss). teachers: {source: model or callable(input_ids, attention_mask) -> logits} for the
    graph's dense `teacher` sources (e.g. the reference model of an exact `reverse_kl`), run on the
    prompt + completion without gradient (a model is moved to the trainer's device, in eval mode).
    demonstrations: transformers batches (`input_ids`, `attention_mask`, `labels` aligned with
    input_ids), cycled one per training micro-batch, on which `demonstration_graph` (e.g. a
    `cross_entropy` node) runs in a second call; its loss is added (divided by the accumulation steps)
    and its terms are logged as `lossgraph/demonstrations/<node>/<head>`. The other arguments are
    GRPOTrainer's."""

    def __init__(
        self,
        *args,
        loss_graph: CompiledGraph | None = None,
        teachers: Mapping[str, Teacher] | None = None,
        demonstrations: Iterable[Mapping[str, torch.Tensor]] | None = None,
        demonstration_graph: CompiledGraph | None = None,
        **kwargs,
    ):
        if (demonstrations is None) != (demonstration_graph is None):
            raise IntegrationError("demonstrations and demonstration_graph go together: pass both, or neither")
        super().__init__(*args, **kwargs)
        if loss_graph is None:
            vocab_size = unwrap_model(self.model).config.get_text_config().vocab_size
            loss_graph = compile_graph(loads(yaml.safe_dump(grpo_document(self.args, vocab_size))))
        self.rollout_name, self.rollout_target = _rollout_source(loss_graph)
        missing = sorted(set(loss_graph.plan.teachers) - {self.rollout_name} - set(teachers or {}))
        if missing:
            raise IntegrationError(f"the graph's sources {missing} need models: pass teachers={{name: model}}")
        self.loss_graph = loss_graph
        # a teacher model runs beside the policy, in eval mode (no dropout)
        self.teachers = {
            name: teacher.to(self.accelerator.device).eval() if isinstance(teacher, torch.nn.Module) else teacher
            for name, teacher in (teachers or {}).items()
        }
        self.demonstration_graph = demonstration_graph
        self._demonstrations = None if demonstrations is None else itertools.cycle(demonstrations)

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        with self.accelerator.autocast():  # as TRL's forward (bf16 mixed precision by default)
            logits = _completion_logits(model, input_ids, attention_mask, completion_ids.size(1))
        labels = completion_ids.masked_fill(mask == 0, -100)
        mode = "train" if self.model.training else "eval"
        out = self.loss_graph(
            {self.loss_graph.plan.heads[0].name: logits},
            labels=labels,
            teachers={self.rollout_name: self._rollout(inputs, logits, labels), **self._teacher_logits(inputs)},
            num_items=self._num_items(inputs, mode),
        )
        self._log_graph_metrics(out, mode, labels != -100)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss = out.loss if self.loss_type in _COUNTED_OVER_THE_GENERATION_BATCH else out.loss / accumulation
        if self._demonstrations is not None and mode == "train":
            loss = loss + self._demonstration_loss(model, mode) / accumulation
        return loss

    def _demonstration_loss(self, model, mode: str) -> torch.Tensor:
        """The demonstration graph on the next demonstration batch (a second call: its own batch)."""
        batch = {name: value.to(self.accelerator.device) for name, value in next(self._demonstrations).items()}
        with self.accelerator.autocast():
            out = transformers_compute_loss(model, batch, self.demonstration_graph)
        for key, value in out.values.items():
            self._metrics[mode][f"lossgraph/demonstrations/{key}"].append(float(value))
        return out.loss

    def _rollout(self, inputs, logits: torch.Tensor, labels: torch.Tensor) -> Rollout:
        old = None
        if self.rollout_target.old_logprobs:
            old = inputs.get("old_per_token_logps")
            if old is None:  # TRL's on-policy step: the ratio is 1, with its gradient
                old = _sampled_logprobs(logits.detach(), labels, self.temperature)
        ref = None
        if self.rollout_target.ref_logprobs:
            ref = inputs.get("ref_per_token_logps")
            if ref is None:
                raise InputError(
                    "the graph's rollout declares ref_logprobs, but TRL's batch has no 'ref_per_token_logps' "
                    "(TRL computes them when beta != 0)"
                )
        return Rollout(inputs["advantages"], old_logprobs=old, ref_logprobs=ref)

    def _teacher_logits(self, inputs) -> dict[str, torch.Tensor]:
        if not self.teachers:
            return {}
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keep = inputs["completion_ids"].size(1)
        with torch.no_grad(), self.accelerator.autocast():
            return {
                name: _completion_logits(teacher, input_ids, attention_mask, keep)
                for name, teacher in self.teachers.items()
            }

    def _num_items(self, inputs, mode: str):
        """TRL's count for dapo and cispo: the generation batch's tokens, per process and accumulation step."""
        if self.loss_type not in _COUNTED_OVER_THE_GENERATION_BATCH:
            return None
        count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            count = count * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return count

    def _log_graph_metrics(self, out: GraphOutput, mode: str, completion_tokens: torch.Tensor) -> None:
        """Each term's value, each head metric, and TRL's `kl`: the token mean of the node named `kl` over
        the batch's completion tokens (this process's), whatever the node's aggregation."""
        # logging reads the values on the host once per step, as TRL's own metrics do
        metrics = self._metrics[mode]
        for key, value in out.values.items():
            metrics[f"lossgraph/{key}"].append(float(value))
        kl = [value for key, value in out.per_token.items() if key.split("/", 1)[0] == "kl"]
        if kl:
            metrics["kl"].append(float(kl[0].sum() / completion_tokens.sum().clamp(min=1)))
        for head, head_metrics in out.metrics.items():
            for name, value in head_metrics.items():
                metrics[f"lossgraph/{head}/{name}"].append(float(value))
        for name, value in self._trl_metrics(out).items():
            metrics[name].append(float(value))

    def _trl_metrics(self, out: GraphOutput) -> dict[str, torch.Tensor]:
        """The metrics TRL logs under the same names (`LossKind.trainer_metrics`: the policy node's entropy
        and clip ratios), where the graph has one node that reports them. Under
        `importance_sampling_level="sequence"` TRL counts clipped sequence ratios, which lossgraph does not
        report, so only the entropy is logged then."""
        found = {
            (term.node, name): out.metrics[head.name][f"{term.node}/{name}"]
            for head in self.loss_graph.plan.heads
            for term in head.terms
            for name in loss_kind(term.kind).trainer_metrics
            if f"{term.node}/{name}" in out.metrics.get(head.name, {})
        }
        if len({node for node, _ in found}) != 1:
            return {}
        clip_ratios = self.args.importance_sampling_level != "sequence"
        return {name: value for (_, name), value in found.items() if clip_ratios or "clip" not in name}


def _completion_logits(model: Teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int):
    """[B, keep, V] logits, position t predicting completion token t (the last `keep` tokens)."""
    if isinstance(model, torch.nn.Module):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep + 1).logits
    else:
        logits = model(input_ids, attention_mask)
    return logits[:, -keep - 1 : -1]  # the logits before each completion token


def _sampled_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each label, 0 where the label is -100."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(labels < 0, 0.0)


# --------------------------------------------------------------------------------------------------
# GKD: TRL's generalized JSD through lossgraph's `jsd`.
# --------------------------------------------------------------------------------------------------

GKD_REDUCTIONS = ("batchmean", "sum", "mean")


@functools.lru_cache(maxsize=32)
def _gkd_graph(vocab_size: int, beta: float, temperature: float) -> CompiledGraph:
    document = yaml.safe_load(files("lossgraph").joinpath("data/trl_gkd.yaml").read_text(encoding="utf-8"))
    document["vocab_size"] = vocab_size
    # TRL's endpoints are the KLs themselves, which `jsd` gives with `normalize` (the divergence is 0 there)
    endpoint = beta in (0.0, 1.0)
    document["losses"]["gkd"].update(beta=beta, normalize=endpoint, temperature=temperature)
    return compile_graph(loads(yaml.safe_dump(document)))


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """TRL's `GKDTrainer.generalized_jsd_loss` (same arguments, same value and gradient) computed by
    lossgraph's `jsd` node (the fused kernel on CUDA tensors):

        class LossGraphGKDTrainer(GKDTrainer):
            generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    beta KL(teacher || M) + (1 - beta) KL(student || M), M = beta teacher + (1 - beta) student, both
    logits divided by `temperature`; forward KL(teacher || student) at beta 0, reverse at 1. Positions
    whose label is -100 take no loss. The sum is divided by `num_items_in_batch` when given, else by the
    `reduction`: batchmean the unmasked positions (without labels: the batch size, as TRL), sum nothing,
    mean their count times the vocab (TRL averages over the vocab's entries too). TRL's `none` (a value
    per vocab entry) is refused: lossgraph's values are per position (`GraphOutput.per_token`)."""
    if reduction not in GKD_REDUCTIONS:
        raise IntegrationError(
            f"reduction {reduction!r}: lossgraph's jsd gives one value per position, not per vocab entry; "
            f"use one of {', '.join(GKD_REDUCTIONS)}"
        )
    graph = _gkd_graph(student_logits.size(-1), float(beta), float(temperature))
    mask = None if labels is None else labels != -100
    out = graph({"next": student_logits}, teachers={"teacher": teacher_logits}, loss_mask=mask)
    if num_items_in_batch is not None:
        return out.loss / num_items_in_batch
    positions = student_logits[..., 0].numel() if mask is None else mask.sum().clamp(min=1)
    if reduction == "batchmean":
        return out.loss / (max(student_logits.size(0), 1) if mask is None else positions)
    if reduction == "mean":
        return out.loss / (positions * student_logits.size(-1))
    return out.loss
