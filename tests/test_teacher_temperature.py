"""teacher_temperature: the target's teacher logits read at a temperature of their own.

The student is read at the loss node's `temperature` (s = z / T), the target's teachers at its
`teacher_temperature` (p = softmax(z_teacher / T_t); a top-k teacher's stored log-probs renormalized
over the stored tokens at T_t); labels have no temperature. `temperature_scaling` multiplies by the
student's T^2. Checked against a float64 formula written here, on both backends; against today's
workaround (pre-dividing the teacher tensor); and against Fast-LLM's `teacher_softmax_temperature`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fused_cases import (
    DEVICE,
    FUSED_TOLERANCES,
    call,
    graph_yaml,
    interpreter_warnings,
    low_precision,
    make_inputs,
    requires_fused,
    spec_of,
    upcast,
)
from helpers import assert_close, assert_ranks_match, free_port, random_labels, random_logits
from kind_table import TARGET_KINDS, target_value, truth, yaml_fields
from lossgraph.kernels.codegen import generate

import lossgraph
from lossgraph.document import check_text

pytestmark = interpreter_warnings

VOCAB = 40
LEAD = (6,)
T, TT = 2.0, 0.7  # the student's temperature and the teacher's
MIXTURE_WEIGHTS = (0.5, 0.3, 0.2)  # teacher, other, labels

SOURCES = {
    "dense": "teacher: {type: teacher}",
    "topk": "cached: {type: topk_teacher, k: 6}",
    "mixture": (
        "labels: {type: labels}\nteacher: {type: teacher}\nother: {type: teacher}\n"
        f"ensemble: {{type: mixture, sources: [teacher, other, labels], weights: {list(MIXTURE_WEIGHTS)}}}"
    ),
}
TARGET_NAME = {"dense": "teacher", "topk": "cached", "mixture": "ensemble"}


def graph(kind: str, target: str, *, scaling: bool = False, teacher: object = TT, student: float = T) -> str:
    extra = yaml_fields(kind)
    teacher_field = "" if teacher is None else f", teacher_temperature: {teacher}"
    loss = (
        f"d: {{type: {kind}, heads: [next], target: {TARGET_NAME[target]}, temperature: {student}"
        f"{teacher_field}, temperature_scaling: {str(scaling).lower()}{extra}}}"
    )
    return graph_yaml(loss, vocab=VOCAB, sources=SOURCES[target])


# --------------------------------------------------------------------------------------------------
# The formula, in float64.
# --------------------------------------------------------------------------------------------------


def formula(kind: str, target: str, inputs, *, student: float, teacher: float, scaling: bool, logits=None):
    """The loss in float64: mean over the counted positions of the divergence between q = softmax(z / T)
    and p (the target's teachers at T_t), times T^2 with temperature_scaling."""
    z = (inputs.logits["next"] if logits is None else logits).double()
    labels = inputs.labels
    mask = (labels != -100) if labels is not None else inputs.loss_mask.bool()
    s = z / student
    if target == "topk":
        stored = inputs.teachers["cached"]
        log_q = torch.log_softmax(s.gather(-1, stored.indices.long()), dim=-1)
        log_p = torch.log_softmax(stored.logprobs.double() / teacher, dim=-1)  # renormalized at T_t
    elif target == "dense":
        log_q = torch.log_softmax(s, dim=-1)
        log_p = torch.log_softmax(inputs.teachers["teacher"].double() / teacher, dim=-1)
    else:
        log_q = torch.log_softmax(s, dim=-1)
        w_teacher, w_other, w_labels = MIXTURE_WEIGHTS
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), VOCAB).double()  # no temperature
        p = (
            w_teacher * torch.softmax(inputs.teachers["teacher"].double() / teacher, dim=-1)
            + w_other * torch.softmax(inputs.teachers["other"].double() / teacher, dim=-1)
            + w_labels * onehot
        )
        log_p = p.log()
    rows = torch.where(mask, target_value(kind, log_p, log_q, **truth(kind).fields), 0.0)
    loss = rows.sum() / mask.sum()
    return loss * (student * student if scaling else 1.0)


def formula_and_gradient(kind, target, inputs, **settings):
    z = inputs.logits["next"].double().clone().requires_grad_()
    loss = formula(kind, target, inputs, logits=z, **settings)
    loss.backward()
    return loss.detach(), z.grad


def run(text: str, backend: str, inputs, dtype: torch.dtype, step: int = 0):
    """(the graph's inputs as the formula should see them, loss, gradient)."""
    spec = spec_of(text)
    given = low_precision(inputs, dtype) if backend == "triton" else upcast(inputs)
    result = call(lossgraph.compile(spec, backend=backend), given, step=step)
    return upcast(given), result.out.loss.detach().double().cpu(), result.grads["next"].double().cpu()


def assert_matches(expected_loss, expected_grad, loss, grad, dtype, what):
    tol = FUSED_TOLERANCES.get(dtype)
    if tol is None:  # float64 reference backend
        assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12, what=f"{what} loss")
        assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12, what=f"{what} gradient")
        return
    assert_close(loss, expected_loss, rtol=tol.value_rtol, atol=tol.value_atol, what=f"{what} loss")
    magnitude = float(expected_grad.abs().max())
    assert_close(grad, expected_grad, rtol=tol.grad_rtol, atol=tol.grad_atol * magnitude, what=f"{what} gradient")


BACKENDS = [
    pytest.param("torch", torch.float64, id="reference"),
    pytest.param("triton", torch.float32, id="fused-fp32", marks=requires_fused),
]


@pytest.mark.parametrize("scaling", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("target", ["dense", "topk", "mixture"])
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize(("backend", "dtype"), BACKENDS)
def test_student_and_teacher_read_at_their_own_temperatures(backend, dtype, kind, target, scaling):
    text = graph(kind, target, scaling=scaling)
    inputs = make_inputs(spec_of(text), LEAD, seed=3)
    seen, loss, grad = run(text, backend, inputs, dtype)
    expected_loss, expected_grad = formula_and_gradient(kind, target, seen, student=T, teacher=TT, scaling=scaling)
    assert_matches(expected_loss, expected_grad, loss, grad, dtype, f"{kind} on {target}")
    # and the teacher temperature matters: at the student's temperature the loss differs
    other = formula(kind, target, seen, student=T, teacher=T, scaling=scaling)
    assert abs(float(other) - float(expected_loss)) > 1e-3 * abs(float(expected_loss))


@requires_fused
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_bf16_logits(kind):
    text = graph(kind, "dense", scaling=True)
    inputs = make_inputs(spec_of(text), LEAD, seed=5)
    seen, loss, grad = run(text, "triton", inputs, torch.bfloat16)
    expected_loss, expected_grad = formula_and_gradient(kind, "dense", seen, student=T, teacher=TT, scaling=True)
    assert_matches(expected_loss, expected_grad, loss, grad, torch.bfloat16, f"{kind} bf16")


@pytest.mark.parametrize(("backend", "dtype"), BACKENDS)
def test_teacher_temperature_at_one_and_student_elsewhere(backend, dtype):
    """A teacher slot that is the constant 1 (no multiply) beside a run-time student slot, and a
    student at 1 with a run-time teacher slot."""
    for student, teacher in [(2.5, 1.0), (1.0, 1.8)]:
        text = graph("reverse_kl", "dense", student=student, teacher=teacher)
        inputs = make_inputs(spec_of(text), LEAD, seed=7)
        seen, loss, grad = run(text, backend, inputs, dtype)
        expected = formula_and_gradient("reverse_kl", "dense", seen, student=student, teacher=teacher, scaling=False)
        assert_matches(*expected, loss, grad, dtype, f"T {student}, teacher T {teacher}")


# --------------------------------------------------------------------------------------------------
# Today's workaround: the teacher tensor pre-divided.
# --------------------------------------------------------------------------------------------------


def predivided(inputs, target: str):
    """The teachers scaled so that the graph's division by T reads them at T_t: z_t x T / T_t."""
    factor = T / TT
    teachers = {}
    for name, value in inputs.teachers.items():
        if isinstance(value, lossgraph.TopK):
            teachers[name] = lossgraph.TopK(value.indices, value.logprobs.double() * factor)
        else:
            teachers[name] = value * factor
    return type(inputs)(inputs.logits, inputs.labels, teachers, loss_mask=inputs.loss_mask)


@pytest.mark.parametrize("target", ["dense", "topk", "mixture"])
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize(("backend", "dtype"), BACKENDS)
def test_equals_predividing_the_teacher(backend, dtype, kind, target):
    text = graph(kind, target, scaling=True)
    inputs = make_inputs(spec_of(text), LEAD, seed=11)
    _, loss, grad = run(text, backend, inputs, dtype)
    workaround = graph(kind, target, scaling=True, teacher=None)
    _, old_loss, old_grad = run(workaround, backend, predivided(inputs, target), dtype)
    assert_matches(old_loss, old_grad, loss, grad, dtype, f"{kind} on {target} vs pre-divided teacher")


def test_teacher_temperature_equal_to_temperature_is_todays_kernel():
    """Given and equal to `temperature` (or not given), the kernel is the same source as without."""
    sources = []
    for teacher in (None, T, TT):
        spec = spec_of(graph("reverse_kl", "dense", teacher=teacher))
        (launch,) = lossgraph.compile(spec, backend="torch").fusion.launches
        sources.append(generate(launch.kernel_spec()))
    assert sources[0] == sources[1]
    assert sources[0] != sources[2]


# --------------------------------------------------------------------------------------------------
# Fast-LLM.
# --------------------------------------------------------------------------------------------------


def fast_llm_forward_kl(logits, target, scale: float, teacher_temperature: float, grad_output: float = 1.0):
    """Fast-LLM's forward KL, written out from `_fused_cross_entropy_forward_backward` in
    fast_llm/functional/cross_entropy.py (ServiceNow/Fast-LLM; `forward_kl_forward_backward` calls it
    with return_kl_loss=True), target_format logits, no loss mask, one process: the student's logits
    times logits_scale_factor, the teacher's times logits_scale_factor / teacher_softmax_temperature;
    the loss is the mean over the rows of the cross-entropy minus the teacher's entropy (no T^2), the
    gradient (softmax - p) x grad_output / rows x logits_scale_factor."""
    logits, target = logits.double(), target.double()
    scaled = logits * scale
    logits_norm = scaled - scaled.max(-1, keepdim=True).values
    exp_logits = logits_norm.exp()
    sum_exp_logits = exp_logits.sum(-1, keepdim=True)
    teacher = target * (scale / teacher_temperature)
    target_logits = teacher - teacher.max(-1, keepdim=True).values
    exp_target = target_logits.exp()
    sum_exp_target = exp_target.sum(-1, keepdim=True)
    p = exp_target / sum_exp_target
    grad = (exp_logits - sum_exp_logits * p) * ((grad_output / logits.shape[0]) / sum_exp_logits) * scale
    per_sample_loss = sum_exp_logits.log() - (p * logits_norm).sum(-1, keepdim=True)
    loss = per_sample_loss.mean()
    teacher_log_prob = target_logits - sum_exp_target.log()
    target_entropy = (-(p * teacher_log_prob).sum(-1)).mean()
    return loss - target_entropy, grad


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize(("backend", "dtype"), BACKENDS)
def test_fast_llm_teacher_softmax_temperature(backend, dtype, scale):
    """Fast-LLM's teacher_softmax_temperature T_t with logits_scale_factor a is lossgraph's forward_kl
    at temperature 1 / a and teacher_temperature T_t / a, without temperature_scaling."""
    teacher_temperature = 1.6
    text = graph("forward_kl", "dense", student=1.0 / scale, teacher=teacher_temperature / scale)
    inputs = make_inputs(spec_of(text), LEAD, seed=13, ignore_fraction=0.0)
    seen, loss, grad = run(text, backend, inputs, dtype)
    expected_loss, expected_grad = fast_llm_forward_kl(
        seen.logits["next"], seen.teachers["teacher"], scale, teacher_temperature
    )
    assert_matches(expected_loss, expected_grad, loss, grad, dtype, f"Fast-LLM, logits_scale_factor {scale}")


# --------------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------------

SCHEDULE = "{schedule: linear, start: 1.0, end: 3.0, steps: 10}"


@pytest.mark.parametrize(("backend", "dtype"), BACKENDS)
def test_scheduled_teacher_temperature(backend, dtype):
    text = graph("jsd", "mixture", teacher=SCHEDULE, scaling=True)
    inputs = make_inputs(spec_of(text), LEAD, seed=17)
    for step, teacher in [(0, 1.0), (5, 2.0), (20, 3.0)]:
        seen, loss, grad = run(text, backend, inputs, dtype, step=step)
        expected = formula_and_gradient("jsd", "mixture", seen, student=T, teacher=teacher, scaling=True)
        assert_matches(*expected, loss, grad, dtype, f"step {step}")


def test_show_and_plan_print_the_teacher_temperature():
    spec = spec_of(graph("jsd", "mixture", teacher=SCHEDULE))
    compiled = lossgraph.compile(spec, backend="torch")
    (launch,) = compiled.fusion.launches
    states = [(state.tensor, state.temperature) for state in launch.softmaxes]
    assert ("student", "2") in states
    assert ("teacher", "linear 1 -> 3 over 10 steps") in states
    assert ("other", "linear 1 -> 3 over 10 steps") in states
    from lossgraph.spec.describe import loss_summary

    assert "teacher T linear 1 -> 3 over 10 steps" in loss_summary(spec, "d")


# --------------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------------


def errors(text: str) -> list[tuple[str, str]]:
    return [(d.path, d.message) for d in check_text(text, "graph.yaml").diagnostics if d.severity == "error"]


@pytest.mark.parametrize(
    ("sources", "target"),
    [
        ("labels: {type: labels}", "labels"),
        ("labels: {type: labels}\nsmooth: {type: label_smoothing, source: labels, epsilon: 0.1}", "smooth"),
        (
            "labels: {type: labels}\nsmooth: {type: label_smoothing, source: labels, epsilon: 0.1}\n"
            "both: {type: mixture, sources: [labels, smooth]}",
            "both",
        ),
    ],
    ids=["labels", "label_smoothing", "mixture-of-labels"],
)
def test_teacher_temperature_needs_a_teacher(sources, target):
    text = graph_yaml(
        f"ce: {{type: cross_entropy, heads: [next], target: {target}, teacher_temperature: 2.0}}",
        vocab=VOCAB,
        sources=sources,
    )
    ((path, message),) = errors(text)
    assert path == "losses.ce.teacher_temperature"
    assert f"target '{target}' reads no teacher" in message and "remove it" in message


def test_bucket_tail_needs_teacher_temperature_one():
    sources = "cached: {type: topk_teacher, k: 6, tail: bucket}"
    bad = graph_yaml(
        "d: {type: forward_kl, heads: [next], target: cached, teacher_temperature: 2.0}", vocab=VOCAB, sources=sources
    )
    ((path, message),) = errors(bad)
    assert path == "losses.d.teacher_temperature"
    assert "tail: bucket" in message and "use teacher_temperature 1" in message
    fine = graph_yaml(
        "d: {type: forward_kl, heads: [next], target: cached, teacher_temperature: 1.0}", vocab=VOCAB, sources=sources
    )
    assert errors(fine) == []


def test_teacher_temperature_range_and_schedule_ends():
    text = graph_yaml(
        "a: {type: forward_kl, heads: [next], target: teacher, teacher_temperature: 0.0001}\n"
        "b: {type: forward_kl, heads: [next], target: teacher, "
        "teacher_temperature: {schedule: cosine, start: 0.0, end: 2000.0, steps: 5}}",
        vocab=VOCAB,
        sources="teacher: {type: teacher}",
    )
    found = dict(errors(text))
    assert "losses.a.teacher_temperature" in found
    assert found["losses.b.teacher_temperature.start"] == "teacher_temperature must be > 0, got 0"
    assert found["losses.b.teacher_temperature.end"] == "teacher_temperature must be between 0.001 and 1000, got 2000"


def test_kinds_without_a_target_take_no_teacher_temperature():
    text = graph_yaml("z: {type: z_loss, heads: [next], teacher_temperature: 2.0}", vocab=VOCAB)
    ((path, _),) = errors(text)
    assert path.startswith("losses.z")


def test_constant_teacher_schedule_warns():
    text = graph_yaml(
        "d: {type: forward_kl, heads: [next], target: teacher, "
        "teacher_temperature: {schedule: linear, start: 2.0, end: 2.0, steps: 5}}",
        vocab=VOCAB,
        sources="teacher: {type: teacher}",
    )
    warnings = [d.path for d in check_text(text, "graph.yaml").diagnostics if d.severity == "warning"]
    assert "losses.d.teacher_temperature" in warnings


@pytest.mark.parametrize(("backend", "dtype"), BACKENDS)
def test_hidden_input_head(backend, dtype):
    """A head given as hidden states (chunked) reads its teacher at the teacher temperature too."""
    text = graph("reverse_kl", "dense", scaling=True).replace("next: {offset: 1}", "next: {offset: 1, input: hidden}")
    generator = torch.Generator().manual_seed(31)
    hidden = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 8, generator=generator, dtype=torch.float64) * 0.5
    teacher = torch.randn(6, VOCAB, generator=generator, dtype=torch.float64) * 3.0
    device = torch.device("cpu") if backend == "torch" else DEVICE
    leaves = [x.to(device=device, dtype=dtype).requires_grad_() for x in (hidden, weight)]
    out = lossgraph.compile(lossgraph.loads(text), backend=backend, chunk_size=4)(
        {"next": lossgraph.Linear(*leaves)},
        teachers={"teacher": teacher.to(device=device, dtype=dtype)},
        loss_mask=torch.ones(6, dtype=torch.int64, device=device),
    )
    out.loss.backward()
    h, w = (x.detach().double().cpu().requires_grad_() for x in leaves)
    seen = SimpleNamespace(
        logits={"next": h @ w.T},
        labels=None,
        loss_mask=torch.ones(6, dtype=torch.int64),
        teachers={"teacher": teacher.to(dtype).double()},
    )
    expected = formula("reverse_kl", "dense", seen, student=T, teacher=TT, scaling=True)
    expected.backward()
    tol = FUSED_TOLERANCES.get(dtype)
    rtol = 1e-10 if tol is None else 1e-5
    assert_close(out.loss.detach().double().cpu(), expected.detach(), rtol=rtol, atol=rtol, what="loss")
    assert_close(leaves[1].grad.double().cpu(), w.grad, rtol=rtol * 10, atol=rtol * 10, what="weight gradient")


# --------------------------------------------------------------------------------------------------
# Vocab parallel: the teacher's states at its own temperature, combined across ranks.
# --------------------------------------------------------------------------------------------------

PARALLEL_GRAPH = graph_yaml(
    "fkl: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, teacher_temperature: 0.7, "
    "temperature_scaling: true}\n"
    "rkl: {type: reverse_kl, heads: [next], target: teacher, temperature: 2.0, teacher_temperature: 1.5, "
    "weight: 0.3}\n"
    "jsd: {type: jsd, heads: [next], target: ensemble, teacher_temperature: 0.7, weight: 0.5}",
    vocab=VOCAB,
    sources="labels: {type: labels}\nteacher: {type: teacher}\n"
    "ensemble: {type: mixture, sources: [teacher, labels], weights: [0.8, 0.2]}",
)


def _parallel_inputs():
    return {
        "logits": random_logits(2, 5, VOCAB, seed=21),
        "labels": random_labels(2, 5, vocab=VOCAB, seed=22),
        "teacher": random_logits(2, 5, VOCAB, seed=23),
    }


def _parallel_worker(rank: int, world: int, port: int, backend: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _parallel_inputs()
        width = VOCAB // world
        columns = slice(rank * width, (rank + 1) * width)
        logits = data["logits"][..., columns].clone().requires_grad_()
        spec = lossgraph.loads(PARALLEL_GRAPH)
        graph = lossgraph.compile(spec, backend=backend, vocab_parallel_group=dist.group.WORLD)
        out = graph({"next": logits}, labels=data["labels"], teachers={"teacher": data["teacher"][..., columns]})
        out.loss.backward()
        result = {"loss": out.loss.detach(), "values": out.values, "grad": logits.grad}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in tests/test_distributed.py: no interpreter teardown once the results are saved


@pytest.mark.parametrize(
    "backend", [pytest.param("torch", id="reference"), pytest.param("triton", id="fused", marks=requires_fused)]
)
def test_vocab_parallel_two_ranks(backend, tmp_path):
    world = 2
    mp.spawn(_parallel_worker, args=(world, free_port(), backend, str(tmp_path)), nprocs=world)
    data = _parallel_inputs()
    logits = data["logits"].clone().requires_grad_()
    graph = lossgraph.compile(lossgraph.loads(PARALLEL_GRAPH), backend=backend)
    out = graph({"next": logits}, labels=data["labels"], teachers={"teacher": data["teacher"]})
    out.loss.backward()
    for rank, got in enumerate(assert_ranks_match(tmp_path, world, out.loss.detach(), logits.grad)):
        for key, value in out.values.items():
            assert_close(got["values"][key], value, rtol=1e-5, atol=1e-6, what=f"rank {rank} {key}")
    # and the one-process values are the formula's (rows flattened)
    flat = SimpleNamespace(
        logits={"next": data["logits"].reshape(-1, VOCAB)},
        labels=data["labels"].reshape(-1),
        loss_mask=None,
        teachers={"teacher": data["teacher"].reshape(-1, VOCAB)},
    )
    for key, kind, teacher, scaling in [("fkl", "forward_kl", 0.7, True), ("rkl", "reverse_kl", 1.5, False)]:
        expected = formula(kind, "dense", flat, student=2.0, teacher=teacher, scaling=scaling)
        value = out.values[f"{key}/next"].double()
        assert_close(value, expected, rtol=1e-5, atol=1e-6, what=f"{key} against the formula")
