"""The fused backend: each head's launches as one opaque op, wrapped in an autograd Function.

Layers, bottom up:
  kernels/codegen.py, kernels/launcher.py   the generated Triton kernel and its launch
  `lossgraph::fused_head` (torch.library)    every launch of one head; opaque to torch.compile
  `FusedHeadLoss` (autograd.Function)        loss in forward, gradient already computed; backward
                                             only scales it by the incoming gradient
  `fused_head_evaluator`                     the runtime's per-head entry point

The loss and its gradient come out of the same launch, so backward never touches the logits again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import BackendError
from .fusion import Launch, temperature_key
from .inputs import HeadBatch
from .kernels.launcher import launch as launch_kernel
from .kernels.signature import KernelSpec
from .plan import DenseTarget, HeadPlan, TopKTarget

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchBinding:
    """One launch of a head, with its inputs located in the head-level argument lists."""

    spec: KernelSpec
    terms: tuple[int, ...]  # head-term index of each kernel term
    dense: tuple[int, ...]  # head-level dense teacher index of each kernel teacher
    topk: tuple[int, ...]
    temperatures: tuple[int, ...]  # head-level temperature index of each kernel slot


@dataclass(frozen=True)
class HeadKernels:
    """Every launch of one head for one set of gradient-active terms."""

    launches: tuple[LaunchBinding, ...]
    terms: int
    dense: int


_REGISTRY: dict[str, HeadKernels] = {}


def register_head(launches: tuple[Launch, ...], head: HeadPlan, active: tuple[bool, ...]) -> str:
    """Register the kernels of a head and return the key the fused op looks them up by."""
    dense_names = [t.name for t in head.teachers if isinstance(t, DenseTarget)]
    topk_names = [t.name for t in head.teachers if isinstance(t, TopKTarget)]
    term_keys = [term.key for term in head.terms]
    temperatures = head_temperatures(head)
    bindings = []
    for launch in launches:
        term_indices = tuple(term_keys.index(term.key) for term in launch.terms)
        spec = launch.kernel_spec(tuple(active[i] for i in term_indices))
        bindings.append(
            LaunchBinding(
                spec=spec,
                terms=term_indices,
                dense=tuple(dense_names.index(t.name) for t in launch.dense),
                topk=tuple(topk_names.index(t.name) for t in launch.topk),
                temperatures=tuple(temperatures.index(temperature_key(v)) for v in launch.slots),
            )
        )
    kernels = HeadKernels(tuple(bindings), len(head.terms), len(dense_names))
    key = repr(kernels)
    _REGISTRY.setdefault(key, kernels)
    return key


def head_temperatures(head: HeadPlan) -> list[tuple[str, object]]:
    """Distinct temperature keys of a head, plus the fixed 1 (for z_loss and top-k buckets)."""
    keys = [("constant", 1.0)]
    for term in head.terms:
        key = temperature_key(term.temperature)
        if key not in keys:
            keys.append(key)
    return keys


def _run_launches(
    key: str,
    logits: torch.Tensor,
    grad: torch.Tensor,
    row_scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    dense: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    topk_logprobs: list[torch.Tensor],
    inverse_temperatures: list[float],
    weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    kernels = _REGISTRY[key]
    rows = logits.shape[0]
    values = torch.zeros((rows, kernels.terms), dtype=torch.float32, device=logits.device)
    prediction = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    teacher_predictions = [torch.zeros(rows, dtype=torch.int64, device=logits.device) for _ in dense]
    for binding in kernels.launches:
        active = [t for t, kt in zip(binding.terms, binding.spec.terms) if kt.active]
        launch_values, launch_prediction, launch_teachers = launch_kernel(
            binding.spec,
            logits=logits,
            grad=grad,
            row_scale=row_scale,
            labels=labels,
            dense=[dense[i] for i in binding.dense],
            topk=[(topk_indices[i], topk_logprobs[i]) for i in binding.topk],
            inverse_temperatures=[inverse_temperatures[i] for i in binding.temperatures],
            weights=[weights[t] for t in active],
        )
        values[:, list(binding.terms)] = launch_values
        prediction = launch_prediction
        for local, head_index in enumerate(binding.dense):
            teacher_predictions[head_index] = launch_teachers[local]
    return values, prediction, teacher_predictions


@torch.library.custom_op("lossgraph::fused_head", mutates_args=())
def fused_head(
    key: str,
    logits: torch.Tensor,
    row_scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    dense: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    topk_logprobs: list[torch.Tensor],
    inverse_temperatures: list[float],
    weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """All launches of a head: (gradient [N, V] in the logits dtype, per-row term values [N, terms],
    student argmax [N], teacher argmaxes [N] each)."""
    grad = torch.empty_like(logits)
    values, prediction, teachers = _run_launches(
        key, logits, grad, row_scale, labels, dense, topk_indices, topk_logprobs, inverse_temperatures, weights
    )
    return grad, values, prediction, teachers


@fused_head.register_fake
def _fused_head_fake(key, logits, row_scale, labels, dense, topk_indices, topk_logprobs, inverse_temperatures, weights):
    kernels = _REGISTRY[key]
    rows = logits.shape[0]
    return (
        torch.empty_like(logits),
        logits.new_empty((rows, kernels.terms), dtype=torch.float32),
        logits.new_empty((rows,), dtype=torch.int64),
        [logits.new_empty((rows,), dtype=torch.int64) for _ in dense],
    )


@torch.library.custom_op("lossgraph::fused_head_inplace", mutates_args=("logits",))
def fused_head_inplace(
    key: str,
    logits: torch.Tensor,
    row_scale: torch.Tensor,
    labels: Optional[torch.Tensor],
    dense: list[torch.Tensor],
    topk_indices: list[torch.Tensor],
    topk_logprobs: list[torch.Tensor],
    inverse_temperatures: list[float],
    weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Like `fused_head`, but the gradient overwrites the logits (one N x V buffer saved)."""
    return _run_launches(
        key, logits, logits, row_scale, labels, dense, topk_indices, topk_logprobs, inverse_temperatures, weights
    )


@fused_head_inplace.register_fake
def _fused_head_inplace_fake(
    key, logits, row_scale, labels, dense, topk_indices, topk_logprobs, inverse_temperatures, weights
):
    kernels = _REGISTRY[key]
    rows = logits.shape[0]
    return (
        logits.new_empty((rows, kernels.terms), dtype=torch.float32),
        logits.new_empty((rows,), dtype=torch.int64),
        [logits.new_empty((rows,), dtype=torch.int64) for _ in dense],
    )


class FusedHeadLoss(torch.autograd.Function):
    """Connects a loss computed together with its gradient to autograd.

    forward returns the loss unchanged and keeps the gradient; backward multiplies the kept gradient
    by the incoming scalar (in place: the buffer is used once) and hands it to the logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along the vocab, as the kernel addresses them."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def fused_head_evaluator(graph, device: torch.device):
    """The per-head evaluator of the fused backend for tensors on `device`."""
    import importlib.util

    from .runtime import HeadResult, reference_head

    if importlib.util.find_spec("triton") is None:
        raise BackendError("backend='triton' needs the triton package; install it, or use backend='torch'")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            "backend='triton' runs Triton kernels, which need a CUDA device; set TRITON_INTERPRET=1 to run "
            "them on the CPU (slow; for tests), or use backend='torch'"
        )

    def run(head: HeadPlan, batch: HeadBatch, steps) -> HeadResult:
        logits = batch.logits
        if logits.dtype not in _SUPPORTED_DTYPES:
            if graph.backend == "auto":
                return reference_head(head, batch, steps)
            raise BackendError(
                f"the fused kernel takes float32, bfloat16 or float16 logits, got {logits.dtype} for head "
                f"{head.name!r}; use backend='torch' for float64"
            )
        launches = graph.fusion.for_head(head.name)
        active = tuple(step.weight != 0.0 for step in steps)
        key = register_head(launches, head, active)
        temperatures = head_temperatures(head)
        inverse = [1.0] * len(temperatures)
        for term, step in zip(head.terms, steps):
            inverse[temperatures.index(temperature_key(term.temperature))] = 1.0 / step.temperature
        # what the kernel multiplies dl/ds by: weight x scale x ds/dz (= 1/T)
        weights = [step.weight * step.scale / step.temperature for step in steps]
        row_scale = batch.mask.to(torch.float32) / batch.normalizer
        topk = list(batch.topk.values())
        arguments = (
            row_scale,
            batch.labels,
            [_rows(t) for t in batch.teachers.values()],
            [t.indices.contiguous() for t in topk],
            [t.logprobs.contiguous() for t in topk],
            inverse,
            weights,
        )
        if graph.inplace_grad and len(launches) == 1:
            grad = logits.detach()
            if grad.stride(-1) != 1:
                raise BackendError(f"inplace_grad needs logits of head {head.name!r} with unit stride on the vocab")
            values, prediction, teacher_predictions = fused_head_inplace(key, grad, *arguments)
        else:
            grad, values, prediction, teacher_predictions = fused_head(key, _rows(logits.detach()), *arguments)
        sums = (values * row_scale[:, None]).sum(0)
        scaled = torch.stack([sums[t] * step.scale for t, step in enumerate(steps)])
        loss = sum((scaled[t] * step.weight for t, step in enumerate(steps) if active[t]), torch.zeros_like(sums[0]))
        loss = FusedHeadLoss.apply(logits, loss, grad)
        names = [t.name for t in head.teachers if isinstance(t, DenseTarget)]
        teachers = dict(zip(names, teacher_predictions))
        for name, value in batch.topk.items():
            best = value.logprobs.argmax(-1, keepdim=True)
            teachers[name] = value.indices.gather(1, best).squeeze(1).long()
        return HeadResult(loss, scaled.detach(), prediction, teachers)

    return run
