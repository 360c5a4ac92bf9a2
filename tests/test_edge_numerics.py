"""Hard numerics on both backends, against float64 math written here (not the reference backend).

The grid covers the regimes where a float32 kernel is tempted to form a quantity that underflows or
cancels: a top-k `tail: bucket` term under a confident student (the tail mass far below the stored
mass), the JSD mixture of probabilities that underflow (low temperatures, large logits), and teachers
that are not distributions (NaN, +inf, nothing finite). Wherever the true value is finite both backends
must agree with it; a broken teacher gives a non-finite loss *and* a non-finite gradient on both,
never a finite loss that hides it.
"""

from __future__ import annotations

import math

import pytest
import torch
from fused_cases import DEVICE, interpreter_warnings, requires_fused
from helpers import assert_close
from kind_table import TARGET_KINDS, target_value, truth, yaml_fields

import lossgraph
from lossgraph import TopK
from lossgraph.errors import InputError

pytestmark = [requires_fused, *interpreter_warnings]

BACKENDS = ("torch", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The kernels compute in float32 whatever the logits dtype; the gradient is stored in the logits dtype,
# rounded once to nearest (bf16: at most 2^-8 relative off).
VALUE_RTOL = 2e-5
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float64: 1e-9}


def graph(losses: str, sources: str, vocab: int) -> lossgraph.CompiledGraph:
    text = f"""
version: 1
vocab_size: {vocab}
heads: {{next: {{offset: 1}}}}
sources: {{{sources}}}
losses: {{{losses}}}
"""
    return lossgraph.loads(text)


def run(spec, backend: str, logits: torch.Tensor, teachers: dict, *, check_inputs: bool = False, labels=None):
    """(loss, gradient of the logits, per-term values) of one call; float64 logits for the reference backend."""
    dtype = torch.float64 if backend == "torch" else logits.dtype
    device = torch.device("cpu") if backend == "torch" else DEVICE
    z = logits.detach().to(device=device, dtype=dtype).requires_grad_()
    moved = {
        name: TopK(t.indices.to(device), t.logprobs.to(device))
        if isinstance(t, TopK)
        else t.to(device=device, dtype=dtype)
        for name, t in teachers.items()
    }
    compiled = lossgraph.compile(spec, backend=backend, check_inputs=check_inputs)
    out = compiled({"next": z}, teachers=moved, labels=None if labels is None else labels.to(device))
    out.loss.backward()
    values = {key: value.detach().double().cpu() for key, value in out.values.items()}
    return out.loss.detach().double().cpu(), z.grad.double().cpu(), values


# --------------------------------------------------------------------------------------------------
# Float64 truth, from first principles (each kind's formula: tests/kind_table.py).
# --------------------------------------------------------------------------------------------------


def bucket_truth(kind: str, logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor):
    """(mean loss, gradient) of a `tail: bucket` term: k stored buckets and the tail of each side."""
    z = logits.detach().double().requires_grad_()
    lse = torch.logsumexp(z, -1, keepdim=True)
    stored = torch.zeros_like(z, dtype=torch.bool).scatter(1, indices, True)
    log_q_tail = torch.logsumexp(z.masked_fill(stored, -math.inf), -1, keepdim=True) - lse
    log_q = torch.cat([z.gather(1, indices) - lse, log_q_tail], -1)
    p_top = logprobs.double().exp()
    p_tail = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)
    log_p = torch.cat([logprobs.double(), p_tail.log()], -1)
    loss = target_value(kind, log_p, log_q).mean()
    loss.backward()
    return loss.detach(), z.grad


def dense_truth(kind: str, logits: torch.Tensor, teacher: torch.Tensor, temperature: float, **fields: float):
    """(mean loss, gradient) of a dense-teacher term at `temperature`, in float64."""
    z = logits.detach().double().requires_grad_()
    log_q = torch.log_softmax(z / temperature, -1)
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    loss = target_value(kind, log_p, log_q, **fields).mean()
    loss.backward()
    return loss.detach(), z.grad


def assert_matches_truth(loss, grad, truth, dtype: torch.dtype, what: str, temperature: float = 1.0) -> None:
    """Finite, and close to the float64 truth. Gradient entries are compared to the dtype's tolerance
    of the largest one, or of 1 / (T N), the scale of a softmax gradient, when every entry nearly
    vanishes (disjoint distributions): float32 rounding of q_j ~ 1 is noise at that scale."""
    true_loss, true_grad = truth
    assert torch.isfinite(loss), f"{what}: loss {float(loss)}, truth {float(true_loss)}"
    assert torch.isfinite(grad).all(), f"{what}: {int((~torch.isfinite(grad)).sum())} non-finite gradient entries"
    assert_close(loss, true_loss, rtol=VALUE_RTOL, atol=1e-6, what=f"{what} loss")
    scale = max(float(true_grad.abs().max()), 1.0 / (temperature * grad.shape[0]))
    assert_close(grad, true_grad, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * scale, what=f"{what} gradient")


# --------------------------------------------------------------------------------------------------
# 1. Top-k `tail: bucket` with a confident student.
# --------------------------------------------------------------------------------------------------

GAPS = (0.0, 20.0, 40.0, 60.0, 100.0)  # how far the student's favourite stored token leads the rest


def confident_student(vocab: int, k: int, dtype: torch.dtype):
    """One row per gap: random logits, with a stored token raised `gap` above the rest; the teacher
    stores probabilities 0.5, 0.2, 0.1, 0.05 (or fewer, for small k) and leaves the rest to the tail."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(GAPS), vocab, generator=generator, dtype=torch.float64)
    indices = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in GAPS])
    for row, gap in enumerate(GAPS):
        logits[row, indices[row, row % k]] = logits[row].max() + gap
    mass = torch.tensor([0.5, 0.2, 0.1, 0.05][:k], dtype=torch.float64)
    if k == 1:
        mass = torch.tensor([0.7], dtype=torch.float64)
    logprobs = mass.log().expand(len(GAPS), k).to(torch.float32)
    return logits.to(dtype), TopK(indices, logprobs.contiguous())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("vocab,k", [(2, 1), (64, 4), (1000, 4)], ids=["V2", "V64", "V1000"])
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_bucket_tail_under_a_confident_student(kind, vocab, k, dtype):
    logits, topk = confident_student(vocab, k, dtype)
    expected = bucket_truth(kind, logits.double(), topk.indices, topk.logprobs)
    spec = graph(
        f"kd: {{type: {kind}, heads: [next], target: cached}}",
        f"cached: {{type: topk_teacher, k: {k}, tail: bucket}}",
        vocab,
    )
    for backend in BACKENDS:
        loss, grad, _ = run(spec, backend, logits, {"cached": topk})
        grad_dtype = torch.float64 if backend == "torch" else dtype
        assert_matches_truth(loss, grad, expected, grad_dtype, f"{backend} {kind} V={vocab}")


# --------------------------------------------------------------------------------------------------
# 2. Mixtures of probabilities that underflow: JSD (and its neighbours) at low temperature, large logits.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("temperature,scale", [(0.05, 3.0), (1.0, 60.0), (1.0, 3.0)], ids=["T0.05", "large", "plain"])
@pytest.mark.parametrize("vocab", [2, 127, 512])
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_dense_teacher_with_underflowing_probabilities(kind, vocab, temperature, scale, dtype):
    generator = torch.Generator().manual_seed(vocab + int(scale))
    logits = (torch.randn(6, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(6, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    expected = dense_truth(kind, logits.double(), teacher.double(), temperature, **truth(kind).fields)
    spec = graph(
        f"kd: {{type: {kind}, heads: [next], target: teacher, temperature: {temperature}{yaml_fields(kind)}}}",
        "teacher: {type: teacher}",
        vocab,
    )
    for backend in BACKENDS:
        loss, grad, _ = run(spec, backend, logits, {"teacher": teacher})
        grad_dtype = torch.float64 if backend == "torch" else dtype
        assert_matches_truth(
            loss, grad, expected, grad_dtype, f"{backend} {kind} V={vocab} T={temperature}", temperature
        )


def test_jsd_of_a_teacher_in_float32_subnormal_range_is_exact():
    """Student [0, -200], teacher [0, -103]: the true JSD rounds to 0 in float32."""
    spec = graph("kd: {type: jsd, heads: [next], target: teacher}", "teacher: {type: teacher}", 2)
    for backend in BACKENDS:
        loss, grad, _ = run(spec, backend, torch.tensor([[0.0, -200.0]]), {"teacher": torch.tensor([[0.0, -103.0]])})
        assert float(loss) == pytest.approx(0.0, abs=1e-30)
        assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------
# 3. Teachers that are not distributions.
# --------------------------------------------------------------------------------------------------

BROKEN_DENSE = {
    "nan": lambda row: row.index_fill(0, torch.tensor([3]), math.nan),
    "+inf": lambda row: row.index_fill(0, torch.tensor([5]), math.inf),
    "all -inf": lambda row: torch.full_like(row, -math.inf),
}


@pytest.mark.parametrize("broken", BROKEN_DENSE)
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_broken_dense_teacher_is_never_hidden(kind, broken):
    """Unchecked: loss and gradient both non-finite on both backends (the broken row's gradient);
    checked: an InputError that names the teacher."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 16, generator=generator)
    teacher = torch.randn(4, 16, generator=generator)
    teacher[2] = BROKEN_DENSE[broken](teacher[2])
    spec = graph(
        f"kd: {{type: {kind}, heads: [next], target: teacher, temperature: 2.0}}", "teacher: {type: teacher}", 16
    )
    for backend in BACKENDS:
        loss, grad, _ = run(spec, backend, logits, {"teacher": teacher})
        assert not torch.isfinite(loss), f"{backend}: finite loss {float(loss)} from a broken teacher"
        assert not torch.isfinite(grad[2]).all(), f"{backend}: the broken row's gradient is finite"
        assert torch.isfinite(grad[[0, 1, 3]]).all(), f"{backend}: the broken row spilled into others"
        with pytest.raises(InputError, match="teacher 'teacher' holds"):
            run(spec, backend, logits, {"teacher": teacher}, check_inputs=True)


@pytest.mark.parametrize("broken", BROKEN_DENSE)
def test_broken_teacher_of_a_weight_zero_term_is_reported_not_applied(broken):
    """A weight-0 term (a schedule that starts at 0) takes no part in the loss or the gradient, so a
    broken teacher behind it leaves both finite; its own value is reported as NaN."""
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 16, generator=generator)
    teacher = torch.randn(4, 16, generator=generator)
    teacher[2] = BROKEN_DENSE[broken](teacher[2])
    spec = graph(
        "lm: {type: cross_entropy, heads: [next], target: labels}, "
        "kd: {type: forward_kl, heads: [next], target: teacher, weight: 0.0}",
        "labels: {type: labels}, teacher: {type: teacher}",
        16,
    )
    labels = torch.randint(0, 16, (4,), generator=generator)
    for backend in BACKENDS:
        loss, grad, values = run(spec, backend, logits, {"teacher": teacher}, labels=labels)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), backend
        assert not torch.isfinite(values["kd/next"]), f"{backend}: the broken term's value is finite"


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_bucket_tail_under_a_confident_teacher(kind):
    """The teacher stores all but ~1e-9 of its mass: its tail is below what float32 resolves next to 1."""
    generator = torch.Generator().manual_seed(9)
    teacher = torch.randn(5, 64, generator=generator, dtype=torch.float64) * 16
    top = torch.log_softmax(teacher, -1).topk(8, dim=-1)
    topk = TopK(top.indices, top.values.to(torch.float32))
    logits = (torch.randn(5, 64, generator=generator, dtype=torch.float64) * 3).float()
    expected = bucket_truth(kind, logits.double(), topk.indices, topk.logprobs)
    spec = graph(
        f"kd: {{type: {kind}, heads: [next], target: cached}}", "cached: {type: topk_teacher, k: 8, tail: bucket}", 64
    )
    for backend in BACKENDS:
        loss, grad, _ = run(spec, backend, logits, {"cached": topk})
        grad_dtype = torch.float64 if backend == "torch" else torch.float32
        assert_matches_truth(loss, grad, expected, grad_dtype, f"{backend} {kind} confident teacher")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("broken", ["all -inf", "nan"])
def test_broken_topk_row_is_never_hidden(tail, broken):
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 32, generator=generator)
    indices = torch.stack([torch.randperm(32, generator=generator)[:4] for _ in range(4)])
    logprobs = torch.log(torch.tensor([0.4, 0.3, 0.1, 0.1])).expand(4, 4).clone()
    logprobs[1] = -math.inf if broken == "all -inf" else logprobs[1].index_fill(0, torch.tensor([2]), math.nan)
    spec = graph(
        "kd: {type: forward_kl, heads: [next], target: cached}",
        f"cached: {{type: topk_teacher, k: 4, tail: {tail}}}",
        32,
    )
    for backend in BACKENDS:
        loss, grad, _ = run(spec, backend, logits, {"cached": TopK(indices, logprobs)})
        assert not torch.isfinite(loss), f"{backend}: finite loss {float(loss)} from a broken top-k row"
        assert not torch.isfinite(grad[1]).all(), f"{backend}: the broken row's gradient is finite"
        assert torch.isfinite(grad[[0, 2, 3]]).all()
        with pytest.raises(InputError, match="TopK logprobs of teacher 'cached'"):
            run(spec, backend, logits, {"cached": TopK(indices, logprobs)}, check_inputs=True)


# --------------------------------------------------------------------------------------------------
# 4. Stored top-k log-probs that are no distribution.
# --------------------------------------------------------------------------------------------------


def test_topk_logprobs_summing_past_one_are_refused_with_the_row():
    indices = torch.arange(4).expand(3, 4).contiguous()
    logprobs = torch.log(torch.tensor([0.4, 0.3, 0.1, 0.1])).expand(3, 4).clone()
    logprobs[2] = 0.0  # four tokens of probability 1 each
    spec = graph(
        "kd: {type: forward_kl, heads: [next], target: cached}", "cached: {type: topk_teacher, k: 4, tail: bucket}", 8
    )
    for backend in BACKENDS:
        with pytest.raises(InputError, match=r"teacher 'cached' at position 2 .* probability 4"):
            run(spec, backend, torch.randn(3, 8), {"cached": TopK(indices, logprobs)}, check_inputs=True)


def test_topk_logprobs_of_a_real_teacher_pass_in_every_dtype():
    """log_softmax over the whole vocab, then the top k, rounded to the stored dtype: within the slack."""
    generator = torch.Generator().manual_seed(7)
    teacher = torch.randn(16, 50, generator=generator, dtype=torch.float64) * 0.1  # nearly uniform
    top = torch.log_softmax(teacher, -1).topk(50, dim=-1)  # k = V: the stored mass is 1 up to rounding
    spec = graph(
        "kd: {type: forward_kl, heads: [next], target: cached}",
        "cached: {type: topk_teacher, k: 50, tail: renormalize}",
        50,
    )
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        stored = TopK(top.indices, top.values.to(dtype))
        run(spec, "torch", torch.randn(16, 50, generator=generator), {"cached": stored}, check_inputs=True)
