"""The one spelling of a generated kernel's parameters: `KernelSignature` writes the `def` (the code
generator calls it) and binds a launch's arguments (the launcher calls it).

Each parameter is a name and where a call's value comes from (`Call`). The parameters of the target
forms (labels, class weights, dense teachers, top-k teachers) come from one function,
`target_parameters`, which a target-form interface can supply. No torch import: the generator (and
`lossgraph kernel`) run without torch.

Per-call numbers (each slot's 1/T, each term's gradient weight, value scale and loss weight) are plain
float arguments: Triton passes them as fp32 by value, so a launch reads no host tensor and a CUDA-graph
capture records them with the launch (docs/kernels.md, "Per-call numbers").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from . import names
from .layout import effective, kernel_layout
from .signature import KernelSpec

if TYPE_CHECKING:
    import torch

CONSTEXPRS = ("BLOCK_V", "VEC")  # the tile: columns per tile, contiguous columns of one lane


class Inputs(NamedTuple):
    """What every phase of a fused launch reads."""

    logits: torch.Tensor  # [N, V] (this rank's columns under vocab parallel), unit stride on V
    row_scale: torch.Tensor  # [N] float32: mask / normalizer
    labels: torch.Tensor | None  # [N] int64 global ids
    # the kernel arguments of the launch's targets by name (pointers, strides, sizes of dense teachers,
    # top-k pairs and other forms), as each leaf form binds them (`LeafForm.kernel_tensors`)
    target_arguments: dict[str, object]
    inverse_temperatures: list[float]
    # per class-weight vector of the spec (`cw{c}_ptr`): the [V_total] float32 weights and their 0-d sum
    class_weights: list[tuple[torch.Tensor, torch.Tensor]] = []


class TermNumbers(NamedTuple):
    """The run-time numbers of a launch's terms (each a list over the launch's terms, in order)."""

    gradient: list[float]  # per active term only: weight x head weight x scale / T, what multiplies dl/ds
    value_scale: list[float]  # what each term's per-row value is reported times (T^2 where asked, else 1)
    loss: list[float]  # each term's weight in the head's loss; 0 leaves it out, even when not finite


class Call(NamedTuple):
    """Everything one launch of one phase passes: its inputs and per-call numbers, its output buffers
    (None where the phase has none) and, under vocab parallel, where its slice lies."""

    inputs: Inputs
    numbers: TermNumbers | None = None  # single and apply
    grad: torch.Tensor | None = None  # dl/dz [N, V] (the logits themselves when in place)
    values: torch.Tensor | None = None  # [N, terms + 1]
    prediction: torch.Tensor | None = None  # [N] student argmax (single)
    teacher_predictions: torch.Tensor | None = None  # [dense teachers, N] (single)
    floats: torch.Tensor | None = None  # [N, float statistics] float64 (stats writes, reduce/apply read)
    ints: torch.Tensor | None = None  # [N, int statistics] (stats)
    topk_logits: list[torch.Tensor] | None = None  # per top-k source (stats writes, apply reads)
    reductions: torch.Tensor | None = None  # [N, reduction statistics] (reduce writes, apply reads)
    vocab_start: int = 0
    vocab_total: int = 0


Value = Callable[[Call], Any]


class Parameter(NamedTuple):
    name: str
    value: Value


def _stride(tensor: torch.Tensor) -> int:
    return tensor.stride(0)


def _target_argument(name: str) -> Parameter:
    """A parameter bound by a leaf form (`Inputs.target_arguments`)."""
    return Parameter(name, lambda call: call.inputs.target_arguments[name])


def target_parameters(spec: KernelSpec, phase: str) -> list[Parameter]:
    """The parameters of the run-time tensors the spec's target forms read, form after form: labels,
    class-weight vectors, dense teachers (and, in one launch, their argmaxes), top-k teachers, then the
    arguments of other forms' targets (`KernelSpec.target_arguments`). The leaf forms bind the
    teachers' values (`LeafForm.kernel_tensors`)."""
    parameters = []
    if spec.uses_labels:
        parameters.append(Parameter("label_ptr", lambda call: call.inputs.labels))
    for c in range(len(spec.class_weight_vectors)):  # [V_total] float32 by global token id, and its sum (0-d)
        parameters += [
            Parameter(f"cw{c}_ptr", lambda call, c=c: call.inputs.class_weights[c][0]),
            Parameter(f"cw_sum{c}_ptr", lambda call, c=c: call.inputs.class_weights[c][1]),
        ]
    for i in range(len(spec.dense)):
        parameters += [_target_argument(name) for name in (f"t{i}_ptr", f"stride_t{i}", f"vocab_t{i}")]
        if phase == "single":
            parameters.append(Parameter(f"tpred{i}_ptr", lambda call, i=i: call.teacher_predictions[i]))
    for i in range(len(spec.topk)):
        names = (f"k{i}_index_ptr", f"stride_k{i}_index", f"k{i}_logp_ptr", f"stride_k{i}_logp")
        parameters += [_target_argument(name) for name in names]
    parameters += [_target_argument(name) for name in spec.target_arguments]
    return parameters


def _gradient(call: Call) -> torch.Tensor:
    if call.grad is None:
        raise ValueError("a kernel that writes the gradient needs a gradient buffer")
    return call.grad


def _parameters(spec: KernelSpec, phase: str) -> list[Parameter]:
    """Every parameter of the kernel for `spec` and `phase`, in the order of its `def`."""
    writes = phase in ("single", "apply")  # the phases that write values (and the gradient)
    parameters = [
        Parameter("z_ptr", lambda call: call.inputs.logits),
        Parameter("stride_z", lambda call: _stride(call.inputs.logits)),
        Parameter("row_scale_ptr", lambda call: call.inputs.row_scale),
    ]
    if writes and spec.gradient:
        parameters += [
            Parameter("grad_ptr", _gradient),
            Parameter("stride_grad", lambda call: _stride(_gradient(call))),
        ]
    if writes:
        parameters.append(Parameter("loss_ptr", lambda call: call.values))
    if phase == "single":
        parameters.append(Parameter("pred_ptr", lambda call: call.prediction))
    parameters += target_parameters(spec, phase)
    if writes:
        parameters += [_target_argument(names.row_input(t, name)) for t, name in spec.row_inputs]
    if phase != "single":
        parameters.append(Parameter("statf_ptr", lambda call: call.floats))
    if phase == "stats":
        parameters.append(Parameter("stati_ptr", lambda call: call.ints))
    if phase in ("stats", "apply"):
        parameters += [Parameter(f"topz{i}_ptr", lambda call, i=i: call.topk_logits[i]) for i in range(len(spec.topk))]
    if phase == "reduce" or (phase == "apply" and kernel_layout(spec).reduction_terms):
        parameters.append(Parameter("red_ptr", lambda call: call.reductions))
    parameters += [
        Parameter(names.inverse_temperature(s), lambda call, s=s: float(call.inputs.inverse_temperatures[s]))
        for s in range(len(spec.slot_is_one))
    ]
    if writes:
        active = [t for t, term in enumerate(spec.terms) if term.active]
        parameters += [
            Parameter(names.weight(t), lambda call, k=k: float(call.numbers.gradient[k])) for k, t in enumerate(active)
        ]
        parameters += [
            Parameter(names.value_scale(t), lambda call, t=t: float(call.numbers.value_scale[t]))
            for t in range(len(spec.terms))
        ]
        parameters += [
            Parameter(names.loss_weight(t), lambda call, t=t: float(call.numbers.loss[t]))
            for t in range(len(spec.terms))
        ]
    parameters.append(Parameter("V", lambda call: call.inputs.logits.shape[1]))
    if phase != "single":
        parameters += [
            Parameter("vocab_start", lambda call: call.vocab_start),
            Parameter("V_total", lambda call: call.vocab_total),
        ]
    return parameters


@dataclass(frozen=True)
class KernelSignature:
    """The parameters of the kernel for one spec and phase."""

    parameters: tuple[Parameter, ...]

    def definition(self) -> list[str]:
        """The parameters as the kernel's `def` lists them (the tile's constexprs last)."""
        return [p.name for p in self.parameters] + [f"{name}: tl.constexpr" for name in CONSTEXPRS]

    def bind(self, call: Call, block: int, vec: int) -> dict[str, object]:
        """The keyword arguments of a launch: every parameter's value for `call`, and the tile."""
        arguments = {p.name: p.value(call) for p in self.parameters}
        arguments.update(zip(CONSTEXPRS, (block, vec)))
        return arguments


def kernel_signature(spec: KernelSpec, phase: str = "single") -> KernelSignature:
    """The signature of the kernel the generator writes for `spec` and `phase`."""
    return KernelSignature(tuple(_parameters(effective(spec), phase)))
