"""The backend interface: what computes one head's terms, and the types every backend shares.

A backend is built once per compiled graph from a frozen `BackendOptions` and the graph's plan objects
(each head's `HeadPlan`, and the fused kernel launches `lossgraph.compiler.fusion.Launch` where it runs
kernels); it never sees the `CompiledGraph`. Per call, `evaluate(head, batch, steps)` takes the head's
plan, its inputs laid out by `lossgraph.runtime.inputs` and each term's settings at the step, and returns
a `HeadResult`.

Two backends implement it: `ReferenceBackend` (lossgraph.runtime.reference_backend: the reference math,
gradients by autograd) and `FusedBackend` (lossgraph.runtime.fused: one generated Triton kernel per head).
This module sits below both, and below the compiled graph that picks one: it imports no other backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from ..compiler.plan import HeadPlan, Term
from ..errors import BackendError, InputError
from ..kinds import loss_kind
from .inputs import HeadBatch

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class BackendOptions:
    """The settings of one compiled graph: `lossgraph.compile(graph, options=BackendOptions(...))`, or the
    same names as keywords of `compile` (see its docstring for what each does). The one list of them."""

    backend: str = "auto"  # "auto", "torch" or "triton"
    inplace_grad: bool = False  # the fused backend writes the gradient over the logits
    check_inputs: bool | None = None  # the input checks that synchronize with the device (None: CPU only)
    chunk_size: int | None = None  # rows per chunk of a hidden-input head (None: chosen from V)
    accumulate_fp32: bool = False  # a hidden-input head accumulates its weight gradient in float32
    vocab_parallel_group: Any = None  # torch.distributed group the vocab is split over
    normalize_across: Any = None  # torch.distributed group the token counts are summed over
    row_diagnostics: bool = True  # the kinds' row diagnostics and their metrics (policy_gradient's); off: none

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BackendError(f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        size = self.chunk_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise InputError(f"chunk_size must be a positive number of rows, got {size!r}")

    def with_settings(self, **settings: Any) -> BackendOptions:
        """These options with some replaced by keyword (the shortcuts `lossgraph.compile` takes)."""
        names = [field.name for field in fields(self)]
        unknown = [name for name in settings if name not in names]
        if unknown:
            raise InputError(f"unknown option {unknown[0]!r}; the options are {', '.join(names)}")
        return replace(self, **settings) if settings else self


class TermStep(NamedTuple):
    """A term's settings at one step: weight x head weight, temperature, and the T^2 factor (or 1); the
    teacher temperature where the loss node gives one (None: the target is read at `temperature`)."""

    weight: float
    temperature: float
    scale: float
    teacher_temperature: float | None = None

    @property
    def target_temperature(self) -> float:
        """The temperature the target's teachers are read at."""
        return self.temperature if self.teacher_temperature is None else self.teacher_temperature


class HeadResult(NamedTuple):
    """What a backend returns for one head."""

    loss: torch.Tensor  # differentiable: sum over terms of weight x scale x value (weight-0 terms left out)
    values: torch.Tensor  # [terms] detached: each term's normalized value x scale, before the weight
    prediction: torch.Tensor  # [N] student argmax
    teacher_predictions: dict[str, torch.Tensor]  # [N] argmax of each teacher on the head's vocab
    per_token: torch.Tensor | None = None  # [N, terms] detached: each term's value at each position x scale
    diagnostics: torch.Tensor | None = None  # [N, diagnostic columns] detached (`diagnostic_columns`), 0 masked


class ChunkResult(NamedTuple):
    """What evaluating a block of rows gives (one chunk of a hidden-input head)."""

    grad: torch.Tensor | None  # dl/dlogits of these rows, in the logits dtype (None: no gradient asked for)
    values: torch.Tensor  # [terms] each term's share of its normalized value (x T^2 where asked)
    prediction: torch.Tensor  # [rows] student argmax
    teacher_predictions: dict[str, torch.Tensor]  # [rows] argmax of each teacher
    in_place: bool = False  # `grad` is the logits' own storage
    grad_scale: torch.Tensor | None = None  # a factor left out of `grad`, for backward to apply
    per_token: torch.Tensor | None = None  # [rows, terms] each term's value at each row x scale (detached)
    loss: torch.Tensor | None = None  # sum_t weight_t x values[t] (weight 0 left out), where the backend has it
    diagnostics: torch.Tensor | None = None  # [rows, diagnostic columns] the terms' row diagnostics (detached)


# `evaluate_rows(chunk, gradient)`: a chunk's terms, with the logits gradient when `gradient`
RowsEvaluator = Callable[[HeadBatch, bool], ChunkResult]


@runtime_checkable
class HeadBackend(Protocol):
    """What evaluates the terms of one head."""

    name: str  # "torch" or "triton", as `lossgraph.compile(backend=...)` names it

    def evaluate(self, head: HeadPlan, batch: HeadBatch, steps: Sequence[TermStep]) -> HeadResult:
        """The head's loss (differentiable), its terms' values and the argmaxes for the metrics."""
        ...


def diagnostic_columns(terms: Sequence[Term]) -> tuple[tuple[int, str], ...]:
    """(term index, name) of each row diagnostic of a head's terms (`LossKind.diagnostics`), in the order
    of the columns of `HeadResult.diagnostics` (the fused kernels write them so, term after term)."""
    return tuple((t, name) for t, term in enumerate(terms) for name in loss_kind(term.kind).diagnostics(term))


def weighted_sum(values: torch.Tensor, steps: Sequence[TermStep]) -> torch.Tensor:
    """sum_t weight_t x values[t] over the terms whose weight is not 0 (a weight-0 term may be inf)."""
    active = [values[t] * s.weight for t, s in enumerate(steps) if s.weight != 0.0]
    return torch.stack(active).sum() if active else values.new_zeros(())
