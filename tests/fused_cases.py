"""Shared pieces of the fused-backend tests: where they run, tolerances, inputs, and a side-by-side runner.

The fused backend (`backend="triton"`) is compared with the reference backend (`backend="torch"`) run on
the *same* inputs upcast to float64: the fused side gets logits and teachers in the dtype under test,
the reference gets exactly those values as float64 (so input rounding is not part of the comparison,
only the kernel's float32 math and the rounding of the gradient it writes in the logits dtype).

The fused kernels run on a CUDA device when there is one, else on the CPU through Triton's interpreter
(`TRITON_INTERPRET=1`, which the Makefile's `make test` sets; setting it from a test module is too late
once triton is imported). Without either, the fused tests skip with `FUSED_SKIP_REASON`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from helpers import assert_close, random_labels, random_logits, random_topk

import lossgraph
from lossgraph.compiler.plan import DenseTarget, TopKTarget
from lossgraph.kinds.sources.rollout import RolloutTarget

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

if not HAS_TRITON:
    FUSED_SKIP_REASON = "the fused backend needs the triton package"
elif not (HAS_CUDA or INTERPRETED):
    FUSED_SKIP_REASON = (
        "the fused backend needs a CUDA device, or TRITON_INTERPRET=1 in the environment before Python starts "
        "(run `make test`, or `TRITON_INTERPRET=1 .venv/bin/python -m pytest ...`)"
    )
else:
    FUSED_SKIP_REASON = ""

requires_fused = pytest.mark.skipif(bool(FUSED_SKIP_REASON), reason=FUSED_SKIP_REASON or "runs")


def requires_gpu(test):
    """Marks a test `gpu` (what only a GPU shows: memory high-water marks, NCCL) and skips it without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


# numpy noise of Triton's interpreter (masked lanes evaluate -inf - -inf, then get discarded by tl.where)
interpreter_warnings = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------------------
# Tolerances of the fused backend against the float64 reference, by logits dtype.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedTolerance:
    """How close the fused backend must be to the float64 reference.

    Values (`out.values`, `out.terms`, `out.loss`) are float32 sums in both dtypes' kernels: compared with
    `value_rtol` and `value_atol`. Gradients are compared element-wise with `grad_rtol` and an absolute
    tolerance of `grad_atol` x max |reference gradient| of that head (a gradient entry far below the
    largest one carries no meaning past the largest one's precision).
    """

    value_rtol: float
    value_atol: float
    grad_rtol: float
    grad_atol: float


# Where the numbers come from:
# - fp32: the kernel works in float32 on float32 inputs. A value is a sum over V of terms each correct to
#   a few ulps (2^-24 = 6e-8 relative), so its relative error grows like sqrt(V) x 6e-8, well below 1e-5
#   for the vocabularies tested. A gradient entry q_j - p_j comes from exp(s_j - lse), whose relative
#   error is about |s_j - lse| x 6e-8; 1e-5 of the largest entry covers it.
# - bf16 / fp16: values come back in float32 from the same float32 math (a little slack for the mixed
#   row sums only), but the gradient is stored in the logits dtype, rounded once to nearest even
#   (kernels/primitives.py round_to): bf16 keeps 8 significant bits, so an entry is off by at most half
#   a step, 2^-8 = 3.9e-3 relative; fp16 keeps 11 (2^-11 = 4.9e-4; entries below 6.1e-5 lose bits as
#   subnormals, which the absolute part absorbs). A split head's second launch reads the first one's
#   rounded gradient back and rounds the sum again, which could double that bound (not seen here).
#   The bf16 tolerances are the unit roundoff (until 2026-12-06 they were twice it: the interpreter
#   truncated, a full step); fp16's are 2x its unit roundoff.
# Worst measured error / tolerance over this suite: values 0.16 (all dtypes, in float32); gradients 0.42
# (fp32), 0.49 (bf16, the split head; truncated, it was 0.72 of 8e-3), 0.36 (fp16).
FUSED_TOLERANCES: dict[torch.dtype, FusedTolerance] = {
    torch.float32: FusedTolerance(value_rtol=1e-5, value_atol=1e-6, grad_rtol=1e-5, grad_atol=1e-5),
    torch.bfloat16: FusedTolerance(value_rtol=3e-5, value_atol=3e-6, grad_rtol=4e-3, grad_atol=4e-3),
    torch.float16: FusedTolerance(value_rtol=3e-5, value_atol=3e-6, grad_rtol=1e-3, grad_atol=1e-3),
}


# --------------------------------------------------------------------------------------------------
# Graphs and inputs.
# --------------------------------------------------------------------------------------------------


def graph_yaml(
    losses: str,
    *,
    vocab: int,
    sources: str = "labels: {type: labels}",
    heads: str = "next: {offset: 1}",
) -> str:
    """A version-1 document from the lines of its `heads`, `sources` and `losses` mappings."""
    indent = "\n  "

    def block(name: str, lines: str) -> str:
        return f"{name}:" + "".join(indent + line for line in lines.strip().splitlines()) + "\n"

    return (
        f"version: 1\nvocab_size: {vocab}\n"
        + block("heads", heads)
        + block("sources", sources)
        + block("losses", losses)
    )


_SPECS: dict[str, lossgraph.LossGraphSpec] = {}


def spec_of(text_or_path: str | Path) -> lossgraph.LossGraphSpec:
    """The validated spec of YAML text (or of a file), cached."""
    key = str(text_or_path)
    if key not in _SPECS:
        _SPECS[key] = lossgraph.load(text_or_path) if isinstance(text_or_path, Path) else lossgraph.loads(text_or_path)
    return _SPECS[key]


@dataclass
class Inputs:
    """Master inputs of one call, in float64 (top-k log-probs in float32, as they are stored)."""

    logits: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    teachers: dict[str, torch.Tensor | lossgraph.TopK] = field(default_factory=dict)
    loss_mask: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    num_items: object = None


def make_inputs(
    spec: lossgraph.LossGraphSpec,
    lead: tuple[int, ...] = (8,),
    *,
    seed: int = 0,
    scale: float = 3.0,
    ignore_fraction: float = 0.2,
) -> Inputs:
    """Random logits for every head with terms, labels, and every teacher the graph reads.

    With `ignore_fraction` > 0, about that fraction of the positions is masked (labels = -100, or
    loss_mask = 0 when the graph has no labels), always including position 1 and never position 0.
    """
    graph = lossgraph.compile(spec, backend="torch")
    plan = graph.plan
    logits = {
        head.name: random_logits(*lead, head.vocab_size, scale=scale, dtype=torch.float64, seed=seed + 10 * i)
        for i, head in enumerate(plan.heads)
        if head.terms
    }
    vocab = plan.heads[0].vocab_size
    labels = random_labels(*lead, vocab=vocab, ignore_fraction=ignore_fraction, seed=seed + 1) if plan.labels else None
    teachers: dict[str, torch.Tensor | lossgraph.TopK] = {}
    for i, (name, target) in enumerate(sorted(plan.teachers.items())):
        if isinstance(target, DenseTarget):
            teachers[name] = random_logits(
                *lead, target.vocab_size, scale=scale, dtype=torch.float64, seed=seed + 100 + i
            )
        elif isinstance(target, RolloutTarget):  # advantages, and log-probs <= 0 where the source declares them
            generator = torch.Generator().manual_seed(seed + 300 + i)
            old, ref = (
                -torch.rand(lead, generator=generator) if declared else None
                for declared in (target.old_logprobs, target.ref_logprobs)
            )
            teachers[name] = lossgraph.Rollout(torch.randn(lead, generator=generator), old, ref)
        else:
            assert isinstance(target, TopKTarget)
            teachers[name] = random_topk(*lead, vocab=target.vocab_size, k=target.k, seed=seed + 200 + i)
    loss_mask = None
    if labels is None:  # no labels source: mask about `ignore_fraction` of the positions with loss_mask
        generator = torch.Generator().manual_seed(seed + 2)
        loss_mask = (torch.rand(lead, generator=generator) >= ignore_fraction).to(torch.int64)
    if ignore_fraction > 0:  # whatever the seed: position 0 counts, position 1 does not
        if labels is not None:
            labels.view(-1)[0] = labels.view(-1)[0].clamp(min=0)
            labels.view(-1)[1] = -100
        else:
            loss_mask.view(-1)[0], loss_mask.view(-1)[1] = 1, 0
    return Inputs(logits, labels, teachers, loss_mask=loss_mask)


@dataclass
class Run:
    """One call of a compiled graph: its output and the gradient of every head's logits."""

    out: lossgraph.GraphOutput
    grads: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]  # the leaf tensors the call got (with inplace_grad: the gradient buffers)


def _teacher_as(value, dtype: torch.dtype, device: torch.device):
    if isinstance(value, lossgraph.Rollout):  # per-position values, read in float32 by both backends
        return lossgraph.Rollout(*(None if part is None else part.to(device) for part in value))
    if isinstance(value, lossgraph.TopK):
        logprobs = value.logprobs.to(device)
        return lossgraph.TopK(value.indices.to(device), logprobs.double() if dtype == torch.float64 else logprobs)
    return value.to(device=device, dtype=dtype)


def low_precision(
    inputs: Inputs, dtype: torch.dtype, device: torch.device = DEVICE, teacher_dtype: torch.dtype | None = None
) -> Inputs:
    """The inputs the fused backend gets: logits and dense teachers rounded to `dtype`, on `device`."""
    return replace(
        inputs,
        logits={name: x.to(device=device, dtype=dtype) for name, x in inputs.logits.items()},
        labels=None if inputs.labels is None else inputs.labels.to(device),
        teachers={name: _teacher_as(t, teacher_dtype or dtype, device) for name, t in inputs.teachers.items()},
        loss_mask=None if inputs.loss_mask is None else inputs.loss_mask.to(device),
        document_ids=None if inputs.document_ids is None else inputs.document_ids.to(device),
    )


def upcast(inputs: Inputs) -> Inputs:
    """The same values as float64 on the CPU: what the reference gets."""
    return low_precision(inputs, torch.float64, torch.device("cpu"))


def call(
    graph: lossgraph.CompiledGraph,
    inputs: Inputs,
    *,
    step: int = 0,
    grad_output: float = 1.0,
    backward: bool = True,
    layout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Run:
    """Call `graph` on fresh leaf copies of the inputs' logits and backpropagate `grad_output`.

    `layout` maps each leaf to the tensor the graph gets (a view of it, say); gradients are the leaves'.
    """
    leaves = {name: x.detach().clone().requires_grad_(True) for name, x in inputs.logits.items()}
    out = graph(
        {name: layout(x) if layout else x for name, x in leaves.items()},
        labels=inputs.labels,
        teachers=dict(inputs.teachers),
        step=step,
        loss_mask=inputs.loss_mask,
        document_ids=inputs.document_ids,
        num_items=inputs.num_items,
    )
    grads: dict[str, torch.Tensor] = {}
    if backward:
        (out.loss * grad_output).backward()
        grads = {name: x.grad for name, x in leaves.items()}
    return Run(out, grads, leaves)


@dataclass
class Pair:
    """The fused backend and the float64 reference on the same inputs."""

    fused: Run
    reference: Run
    dtype: torch.dtype


def run_pair(
    spec: lossgraph.LossGraphSpec | str | Path,
    inputs: Inputs,
    dtype: torch.dtype,
    *,
    step: int = 0,
    inplace_grad: bool = False,
    grad_output: float = 1.0,
    teacher_dtype: torch.dtype | None = None,
    layout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Pair:
    """Evaluate `spec` with backend="triton" on `inputs` in `dtype` and with backend="torch" on float64.

    `teacher_dtype`: dense teachers in another dtype than the logits. `layout`: applied to the fused
    side's logits and dense teachers (same values, e.g. a non-contiguous view).
    """
    if not isinstance(spec, lossgraph.LossGraphSpec):
        spec = spec_of(spec)
    fused_inputs = low_precision(inputs, dtype, teacher_dtype=teacher_dtype)
    reference_inputs = upcast(fused_inputs)  # taken before the fused call (inplace_grad overwrites logits)
    if layout is not None:
        fused_inputs.teachers = {
            name: t if isinstance(t, (lossgraph.TopK, lossgraph.Rollout)) else layout(t)
            for name, t in fused_inputs.teachers.items()
        }
    fused = call(
        lossgraph.compile(spec, backend="triton", inplace_grad=inplace_grad),
        fused_inputs,
        step=step,
        grad_output=grad_output,
        layout=layout,
    )
    reference = call(lossgraph.compile(spec, backend="torch"), reference_inputs, step=step, grad_output=grad_output)
    return Pair(fused, reference, dtype)


def assert_values_match(pair: Pair, *, what: str = "") -> None:
    """values, terms, weights and loss of the fused backend equal the reference's."""
    tol = FUSED_TOLERANCES[pair.dtype]
    fused, reference = pair.fused.out, pair.reference.out
    assert list(fused.values) == list(reference.values), what
    assert fused.weights == reference.weights, what
    kwargs = {"rtol": tol.value_rtol, "atol": tol.value_atol}
    for key in reference.values:
        assert fused.values[key].dtype == torch.float32, key
        assert_close(fused.values[key], reference.values[key], **kwargs, what=f"{what} value {key}")
        assert_close(fused.terms[key], reference.terms[key], **kwargs, what=f"{what} term {key}")
    assert_close(fused.loss.detach(), reference.loss.detach(), **kwargs, what=f"{what} loss")


def assert_grads_match(pair: Pair, *, what: str = "") -> None:
    """The gradient of every head's logits equals the reference's (dtype and device as the logits)."""
    tol = FUSED_TOLERANCES[pair.dtype]
    assert set(pair.fused.grads) == set(pair.reference.grads)
    for name, expected in pair.reference.grads.items():
        actual = pair.fused.grads[name]
        assert actual is not None, f"{what} head {name}: no gradient"
        assert actual.dtype == pair.dtype and actual.device.type == DEVICE.type, (actual.dtype, actual.device)
        magnitude = float(expected.abs().max()) if expected.numel() else 0.0
        assert_close(
            actual,
            expected,
            rtol=tol.grad_rtol,
            atol=tol.grad_atol * max(magnitude, 1e-30),
            what=f"{what} gradient of head {name}",
        )


def assert_pair_matches(pair: Pair, *, what: str = "") -> None:
    """Values, terms, loss and every head's gradient match the reference's."""
    assert_values_match(pair, what=what)
    assert_grads_match(pair, what=what)


def assert_metrics_match(pair: Pair) -> None:
    """tokens, accuracy and agreement/<teacher> of every head are equal (the argmaxes agree exactly); the
    metrics a kind reports from its row diagnostics (`<node>/<metric>`) agree to float32 rounding."""
    fused, reference = pair.fused.out.metrics, pair.reference.out.metrics
    assert set(fused) == set(reference)
    for head, expected in reference.items():
        assert set(fused[head]) == set(expected), head
        for name, value in expected.items():
            got = float(fused[head][name])
            if name in ("tokens", "accuracy") or name.startswith("agreement/"):
                assert got == float(value), (head, name, got, float(value))
            else:
                assert math.isclose(got, float(value), rel_tol=1e-4, abs_tol=1e-5) or (
                    math.isnan(got) and math.isnan(float(value))
                ), (head, name, got, float(value))
