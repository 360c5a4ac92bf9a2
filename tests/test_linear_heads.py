"""Hidden-input heads (`input: hidden`): losses from hidden states and weights, chunk by chunk.

The chunked evaluation (reference math or the fused kernel) must give the same loss, values and
gradients with respect to hidden states, weight and bias as the reference on materialized logits,
and its peak extra memory must be bounded by the chunk, not by N x V. The fused side runs on
`fused_cases.DEVICE` (CUDA when there is one), the float64 reference on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fused_cases import DEVICE, interpreter_warnings, requires_fused
from helpers import assert_close, random_labels

import lossgraph

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 300

GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads:
  next: {{offset: 1, input: hidden}}
  mtp2: {{offset: 2, input: hidden}}
sources:
  labels: {{type: labels}}
  teacher: {{type: teacher}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], target: labels}}
  kd: {{type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}}
  z: {{type: z_loss, heads: [next], weight: 1.0e-3}}
"""
LOGITS_GRAPH = GRAPH.replace(", input: hidden", "")

B, S, H, TEACHER_H = 2, 9, 16, 12


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    return {
        "hidden": randn(B, S, H),
        "weight": randn(VOCAB, H, scale=0.4),
        "bias": randn(VOCAB, scale=0.1),
        "mtp_weight": randn(VOCAB, H, scale=0.4),
        "teacher_hidden": randn(B, S, TEACHER_H),
        "teacher_weight": randn(VOCAB, TEACHER_H, scale=0.4),
        "labels": random_labels(B, S, vocab=VOCAB, seed=seed + 1),
    }


def reference(data, *, shared: bool):
    """float64 reference on materialized logits; returns (output, grads by name)."""
    graph = lossgraph.compile(lossgraph.loads(LOGITS_GRAPH), backend="torch")
    hidden = data["hidden"].clone().requires_grad_()
    weight = data["weight"].clone().requires_grad_()
    bias = data["bias"].clone().requires_grad_()
    mtp_weight = weight if shared else data["mtp_weight"].clone().requires_grad_()
    logits = {
        "next": torch.nn.functional.linear(hidden, weight, bias),
        "mtp2": torch.nn.functional.linear(hidden, mtp_weight, bias),
    }
    teacher = data["teacher_hidden"] @ data["teacher_weight"].T
    out = graph(logits, labels=data["labels"], teachers={"teacher": teacher})
    out.loss.backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad, "bias": bias.grad}
    if not shared:
        grads["mtp_weight"] = mtp_weight.grad
    return out, grads


def chunked(
    data,
    *,
    backend: str,
    dtype: torch.dtype,
    shared: bool,
    chunk_size,
    teacher_as_linear: bool = True,
    device: torch.device | None = None,
):
    """The graph on hidden states; on DEVICE for the fused backend, on the CPU for the reference."""
    device = device or (DEVICE if backend == "triton" else torch.device("cpu"))
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend=backend, chunk_size=chunk_size)
    leaves = {
        name: data[name].to(device=device, dtype=dtype).clone().requires_grad_()
        for name in ("hidden", "weight", "bias", "mtp_weight")
    }
    mtp_weight = leaves["weight"] if shared else leaves["mtp_weight"]
    teacher_hidden = data["teacher_hidden"].to(device=device, dtype=dtype)
    teacher_weight = data["teacher_weight"].to(device=device, dtype=dtype)
    teacher = (
        lossgraph.Linear(teacher_hidden, teacher_weight) if teacher_as_linear else teacher_hidden @ teacher_weight.T
    )
    out = graph(
        {
            "next": lossgraph.Linear(leaves["hidden"], leaves["weight"], leaves["bias"]),
            "mtp2": lossgraph.Linear(leaves["hidden"], mtp_weight, leaves["bias"]),
        },
        labels=data["labels"].to(device),
        teachers={"teacher": teacher},
    )
    out.loss.backward()
    grads = {name: leaves[name].grad for name in ("hidden", "weight", "bias")}
    if not shared:
        grads["mtp_weight"] = leaves["mtp_weight"].grad
    return out, grads


def compare(out, grads, expected_out, expected_grads, dtype):
    tolerance = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for key, value in expected_out.values.items():
        assert_close(out.values[key], value, dtype=dtype, what=f"value {key}", **tolerance)
    assert_close(out.loss.detach(), expected_out.loss.detach(), dtype=dtype, what="loss", **tolerance)
    for name, value in expected_grads.items():
        scale = float(value.abs().max())
        assert_close(
            grads[name],
            value,
            dtype=dtype,
            what=f"grad {name}",
            rtol=tolerance["rtol"],
            atol=tolerance["atol"] * max(scale, 1.0),
        )
    for head, metrics in expected_out.metrics.items():
        for name, value in metrics.items():
            assert torch.equal(out.metrics[head][name].to("cpu", value.dtype), value), (head, name)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-weight", "own-weights"])
@pytest.mark.parametrize(
    "dtype, chunk_size",
    [(torch.float64, 4), (torch.float32, 5), (torch.float32, None)],
    ids=["fp64-4", "fp32-5", "fp32-auto"],
)
def test_reference_chunks_equal_materialized_logits(shared, dtype, chunk_size):
    data = inputs()
    expected_out, expected_grads = reference(data, shared=shared)
    out, grads = chunked(data, backend="torch", dtype=dtype, shared=shared, chunk_size=chunk_size)
    compare(out, grads, expected_out, expected_grads, dtype)


@requires_fused
@pytest.mark.parametrize("teacher_as_linear", [True, False], ids=["teacher-hidden", "teacher-logits"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-weight", "own-weights"])
def test_fused_chunks_equal_materialized_logits(shared, teacher_as_linear):
    data = inputs(seed=3)
    expected_out, expected_grads = reference(data, shared=shared)
    out, grads = chunked(
        data, backend="triton", dtype=torch.float32, shared=shared, chunk_size=4, teacher_as_linear=teacher_as_linear
    )
    compare(out, grads, expected_out, expected_grads, torch.float32)


@requires_fused
def test_fused_chunks_in_bfloat16_with_fp32_weight_accumulation():
    data = inputs(seed=5)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton", chunk_size=3, accumulate_fp32=True)

    def bf16(name: str) -> torch.Tensor:
        return data[name].to(device=DEVICE, dtype=torch.bfloat16)

    hidden, weight = bf16("hidden").requires_grad_(), bf16("weight").requires_grad_()
    teacher = lossgraph.Linear(bf16("teacher_hidden"), bf16("teacher_weight"))
    linear = lossgraph.Linear(hidden, weight)
    expected_graph = lossgraph.compile(lossgraph.loads(LOGITS_GRAPH), backend="torch")
    h64 = hidden.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    logits = h64 @ w64.T
    t64 = teacher.hidden.cpu().double() @ teacher.weight.cpu().double().T
    expected = expected_graph({"next": logits, "mtp2": logits}, labels=data["labels"], teachers={"teacher": t64})
    expected.loss.backward()
    out = graph({"next": linear, "mtp2": linear}, labels=data["labels"].to(DEVICE), teachers={"teacher": teacher})
    out.loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    for key, value in expected.values.items():
        assert_close(out.values[key], value, dtype=torch.bfloat16, what=key, rtol=2e-2, atol=1e-2)
    assert_close(hidden.grad, h64.grad, dtype=torch.bfloat16, what="grad hidden", rtol=5e-2, atol=2e-2)
    assert_close(weight.grad, w64.grad, dtype=torch.bfloat16, what="grad weight", rtol=5e-2, atol=2e-2)


def test_head_input_mismatches_are_clear_errors():
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")
    data = inputs()
    linear = lossgraph.Linear(data["hidden"], data["weight"])
    with pytest.raises(lossgraph.InputError, match="lossgraph.Linear"):
        graph(
            {"next": torch.zeros(B, S, VOCAB), "mtp2": linear},
            labels=data["labels"],
            teachers={"teacher": torch.zeros(B, S, VOCAB)},
        )
    with pytest.raises(lossgraph.InputError, match=r"weight has shape \(300, 8\)"):
        graph(
            {"next": lossgraph.Linear(data["hidden"], data["weight"][:, :8]), "mtp2": linear},
            labels=data["labels"],
            teachers={"teacher": torch.zeros(B, S, VOCAB)},
        )
    logits_graph = lossgraph.compile(lossgraph.loads(LOGITS_GRAPH), backend="torch")
    with pytest.raises(lossgraph.InputError, match="declare it input: hidden"):
        logits_graph(
            {"next": linear, "mtp2": linear}, labels=data["labels"], teachers={"teacher": torch.zeros(B, S, VOCAB)}
        )
    with pytest.raises(lossgraph.InputError, match="chunk_size"):
        lossgraph.compile(lossgraph.loads(GRAPH), chunk_size=0)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    import lossgraph
    torch.set_num_threads(1)
    mode, rows, vocab, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    graph_text = '''
    version: 1
    vocab_size: VOCAB
    heads: {next: {input: HEAD_INPUT}}
    sources: {labels: {type: labels}}
    losses: {lm: {type: cross_entropy, heads: [next], target: labels}}
    '''.replace("VOCAB", str(vocab)).replace("HEAD_INPUT", "hidden" if mode == "chunked" else "logits")
    graph = lossgraph.compile(lossgraph.loads(graph_text), backend="torch", chunk_size=64)
    h = torch.randn(rows, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (rows,))
    def step(n):
        if mode == "chunked":
            out = graph({"next": lossgraph.Linear(h[:n], w)}, labels=labels[:n])
        else:
            out = graph({"next": h[:n] @ w.T}, labels=labels[:n])
        out.loss.backward()
    step(64)  # warm up: libraries, allocator pools
    h.grad = None; w.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(rows)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_bytes": (after - before) * 1024}))
    """
)


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_chunk_not_by_n_times_v(tmp_path):
    """On the CPU, ru_maxrss of a fresh process: chunked stays far below one N x V float32 buffer,
    materialized logits take several."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    rows, vocab, hidden = 8192, 8192, 32
    logits_bytes = rows * vocab * 4

    # glibc's malloc otherwise raises its mmap threshold after the first large free and keeps freed
    # chunks in its heap, so the process's peak would measure the allocator, not the program
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def extra(mode: str) -> int:
        result = subprocess.run(
            [sys.executable, str(script), mode, str(rows), str(vocab), str(hidden)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=environment,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]

    chunked_extra = extra("chunked")
    materialized_extra = extra("materialized")
    assert materialized_extra > logits_bytes, (materialized_extra, logits_bytes)
    assert chunked_extra < logits_bytes / 16, (
        f"chunked evaluation grew the process by {chunked_extra / 2**20:.0f} MiB; one N x V buffer is "
        f"{logits_bytes / 2**20:.0f} MiB"
    )


def test_plan_reports_chunking_and_peak_memory(tmp_path):
    from typer.testing import CliRunner

    from lossgraph.cli.app import app

    path = tmp_path / "hidden.yaml"
    path.write_text(GRAPH.replace(f"vocab_size: {VOCAB}", "vocab_size: 128256"))
    result = CliRunner().invoke(app, ["plan", str(path), "--hidden", "4096", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    chunking = report["launches"][0]["chunking"]
    # one chunk of student + teacher logits in bf16 fits 256 MiB: 512 rows of 2 x 128256 x 2 bytes
    assert chunking["chunk_rows"] == 512 and chunking["chunks"] == 16
    expected = 8192 * 4096 * 2 + 128256 * 4096 * 2 + 512 * 2 * (2 * 128256)
    assert chunking["peak_extra_bytes"] == expected
    assert chunking["matmul_flop"] == 2 * 8192 * 4096 * (3 * 128256 + 128256)
    text = CliRunner().invoke(app, ["plan", str(path), "--hidden", "4096"]).output
    assert "16 chunk(s) of 512 rows" in text and "peak extra memory" in text


pytestmark = interpreter_warnings


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_an_empty_batch_gives_zero_loss_and_empty_gradients(backend):
    device = DEVICE if backend == "triton" else torch.device("cpu")
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend=backend)
    weight = torch.randn(VOCAB, H, device=device, requires_grad=True)
    # offset-2 heads need [B, S] positions: empty sequences
    hidden = torch.zeros(2, 0, H, device=device, requires_grad=True)
    teacher = lossgraph.Linear(
        torch.zeros(2, 0, TEACHER_H, device=device), torch.randn(VOCAB, TEACHER_H, device=device)
    )
    out = graph(
        {"next": lossgraph.Linear(hidden, weight), "mtp2": lossgraph.Linear(hidden, weight)},
        labels=torch.zeros(2, 0, dtype=torch.long, device=device),
        teachers={"teacher": teacher},
    )
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and hidden.grad.shape == (2, 0, H)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def _products(function) -> list[tuple[int, ...]]:
    """The output shape of every matrix product (aten mm / addmm, in place or not) `function` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: list[tuple[int, ...]] = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
                shapes.append(tuple(out.shape))
            return out

    with Products():
        function()
    return shapes


FROZEN = ["frozen-weight", "frozen-hidden", "no_grad"]


@pytest.mark.parametrize("frozen", FROZEN)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_only_the_gradients_autograd_asks_for_are_computed(backend, frozen):
    """A frozen weight (requires_grad=False) costs no grad_weight product, hidden states that need no
    gradient no grad_hidden product, torch.no_grad neither; the gradients that are asked for are the
    same as when everything trains."""
    device = DEVICE if backend == "triton" else torch.device("cpu")
    data = inputs(seed=11)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend=backend, chunk_size=4)

    def leaves(train_hidden: bool, train_weight: bool):
        hidden = data["hidden"].to(device, torch.float32).requires_grad_(train_hidden)
        weight = data["weight"].to(device, torch.float32).requires_grad_(train_weight)
        bias = data["bias"].to(device, torch.float32).requires_grad_(train_weight)
        return hidden, weight, bias

    def run(hidden, weight, bias, *, grad: bool = True):
        teacher = lossgraph.Linear(
            data["teacher_hidden"].to(device, torch.float32), data["teacher_weight"].to(device, torch.float32)
        )
        head = lossgraph.Linear(hidden, weight, bias)
        with torch.set_grad_enabled(grad):
            out = graph({"next": head, "mtp2": head}, labels=data["labels"].to(device), teachers={"teacher": teacher})
        if out.loss.requires_grad:
            out.loss.backward()
        return out

    trained = leaves(True, True)
    expected = run(*trained)
    hidden, weight, bias = leaves(frozen != "frozen-hidden", frozen != "frozen-weight")
    shapes = _products(lambda: run(hidden, weight, bias, grad=frozen != "no_grad"))
    logits_shapes = [shape for shape in shapes if shape[-1] == VOCAB]  # student and teacher logits per chunk
    assert len(logits_shapes) == 3 * 5, shapes  # 2 heads and the teacher of one, 18 rows in chunks of 4
    weight_products = [shape for shape in shapes if shape == (VOCAB, H)]
    hidden_products = [shape for shape in shapes if shape[-1] == H and shape[0] != VOCAB]  # [rows, H]
    assert len(weight_products) == (2 * 5 if frozen == "frozen-hidden" else 0), shapes
    assert len(hidden_products) == (2 * 5 if frozen == "frozen-weight" else 0), shapes
    assert_close(expected.loss.detach(), run(hidden, weight, bias, grad=False).loss, rtol=1e-6, what="loss")
    if frozen == "frozen-weight":
        assert weight.grad is None and bias.grad is None
        assert_close(hidden.grad, trained[0].grad, rtol=1e-5, atol=1e-7, what="grad hidden")
    elif frozen == "frozen-hidden":
        assert hidden.grad is None
        assert_close(weight.grad, trained[1].grad, rtol=1e-5, atol=1e-7, what="grad weight")
        assert_close(bias.grad, trained[2].grad, rtol=1e-5, atol=1e-7, what="grad bias")
    else:
        assert hidden.grad is None and weight.grad is None and bias.grad is None
