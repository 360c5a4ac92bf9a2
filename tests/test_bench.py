"""`lossgraph bench`: the implementations it compares compute the same loss, and it runs on a CPU.

Timings are never asserted (they belong to the benchmark's output, not to tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fused_cases import requires_fused
from helpers import assert_close
from rl_reference import grpo_loss
from typer.testing import CliRunner

import lossgraph
from lossgraph.apps.bench import (
    RL_BETA,
    RL_EPSILON_HIGH,
    RL_EPSILON_LOW,
    RL_LM_WEIGHT,
    SMALL_SIZES,
    eager_loss,
    graph_loss,
    make_inputs,
    make_rl_inputs,
    rl_case,
    rl_graph_loss,
    rl_loss,
    standard_cases,
)
from lossgraph.cli.app import app


@pytest.mark.parametrize("case", standard_cases(tokens=64, vocab=300), ids=lambda case: case.name)
def test_every_case_is_a_valid_graph_and_the_peers_compute_the_same_loss(case):
    spec = lossgraph.loads(case.yaml())
    graph = lossgraph.compile(spec, backend="torch")
    student, labels, teachers = make_inputs(case, torch.float32, torch.device("cpu"))
    ours = graph_loss(graph, case)(student, labels, teachers)
    peer = eager_loss(case)(student, labels, teachers)
    assert_close(peer, ours.detach(), dtype=torch.float32, rtol=1e-5, what=f"case {case.name}: eager vs lossgraph")
    ours.backward()
    ours_grads = {head: value.grad.clone() for head, value in student.items()}
    for value in student.values():
        value.grad = None
    peer.backward()
    for head, value in student.items():
        assert_close(value.grad, ours_grads[head], dtype=torch.float32, rtol=1e-4, atol=1e-8, what=f"grad {head}")


def test_case_c_compiles_to_three_launches_and_d_to_one():
    cases = {case.name: case for case in standard_cases(tokens=64, vocab=300)}
    assert len(lossgraph.compile(lossgraph.loads(cases["c"].yaml())).fusion.launches) == 3
    assert len(lossgraph.compile(lossgraph.loads(cases["d"].yaml())).fusion.launches) == 1


def test_bench_runs_on_the_cpu_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "a",
            "e",
            "--device",
            "cpu",
            "--tokens",
            "32",
            "--vocab",
            "256",
            "--hidden",
            "16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(path),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "case (a) CE + forward KL" in result.output and "case (e) fused-linear" in result.output
    assert "floor (bytes / copy bandwidth)" in result.output and "needs CUDA + Triton" in result.output
    payload = json.loads(path.read_text())
    assert payload["environment"]["device"] == "cpu" and payload["copy_bandwidth_bytes_per_second"] > 0
    cases = {case["case"]: case for case in payload["cases"]}
    assert set(cases) == {"a", "e"}
    timed = {m["implementation"]: m for m in cases["a"]["measurements"] if m["median_ms"] is not None}
    assert {"lossgraph reference", "torch eager (fp32)", "torch.compile"} <= set(timed)
    assert cases["a"]["floor_bytes"] == 32 * 3 * 256 * 2  # student, teacher, gradient rows in bf16
    assert cases["e"]["floor"] == "four matmuls / matmul rate"


def test_bench_rejects_unknown_cases_and_a_missing_gpu():
    result = CliRunner().invoke(app, ["bench", "z", "--device", "cpu"])
    assert result.exit_code == 2, result.output  # a usage error, as docs/cli.md says
    assert result.output == "error: unknown case 'z': give a, b, c, d, e, f or the path of a loss-graph file\n"
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["bench", "a", "--device", "cuda"])
        assert result.exit_code == 1 and "no CUDA device" in result.output


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.yaml", "error: missing.yaml: no such file"),
        ("graphs/missing", "error: graphs/missing: no such file"),
        (".", "error: .: is a directory, not a loss-graph file"),
    ],
)
def test_bench_unreadable_file_exits_2_before_measuring(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "a", name, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.output == message + "\n"  # nothing was measured, not even case a
    assert "unknown case" not in result.output and "Traceback" not in result.output


def test_bench_invalid_file_exits_1_with_located_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nvocab_size: 8\nheads: {next: {}}\nlosses: {z: {type: z_loss, heads: [nxt]}}\n")
    result = CliRunner().invoke(app, ["bench", str(path), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert f"{path}:4:36: losses.z.heads[0]: unknown head 'nxt'" in result.output.splitlines()[-1], result.output


def test_cases_have_their_own_titles_and_keep_their_shapes_on_a_cpu():
    for small in (False, True):
        cases = standard_cases(small=small)
        assert len({case.description for case in cases}) == len(cases)
        assert len({(case.tokens, case.vocab, case.terms) for case in cases}) == len(cases)
        a, b = cases[0], cases[1]
        assert (b.tokens, b.vocab * 4) == (2 * a.tokens, a.vocab if small else 128000), (a, b)
    small = {case.name: (case.tokens, case.vocab) for case in standard_cases(small=True)}
    assert small == {"a": (512, 4096), "b": (1024, 1024), "c": (512, 4096), "d": (512, 4096)}
    # --tokens and --vocab still replace every case's size
    assert {(c.tokens, c.vocab) for c in standard_cases(64, 300, small=True)} == {(64, 300)}


def test_bench_on_the_cpu_prints_distinct_cases(tmp_path):
    result = CliRunner().invoke(
        app,
        ["bench", "a", "b", "--device", "cpu", "--vocab", "64", "--repeats", "1", "--warmup", "0"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    titles = [line for line in result.output.splitlines() if line.startswith("case (")]
    assert titles == [
        "case (a) CE + forward KL, one head, large vocab: N=512, V=64",
        "case (b) CE + forward KL, one head, more tokens and a smaller vocab: N=1024, V=64",
    ]


def test_bench_takes_a_loss_graph_file(tmp_path):
    path = tmp_path / "graph.yaml"
    path.write_text((Path(__file__).parent.parent / "examples" / "ensemble.yaml").read_text())
    result = CliRunner().invoke(
        app,
        ["bench", str(path), "--device", "cpu", "--tokens", "16", "--repeats", "1", "--warmup", "0"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "case (graph.yaml)" in result.output and "lossgraph reference" in result.output
    assert "torch eager" not in result.output  # the peers' code exists for the standard cases only


def _gradient(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (gradient,) = torch.autograd.grad(loss, leaf)
    return gradient


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_case_f_is_one_launch_and_its_exact_kl_peer_computes_lossgraphs_loss(backend):
    case = rl_case(tokens=32, vocab=160)
    spec = lossgraph.loads(case.yaml())
    assert len(lossgraph.compile(spec).fusion.launches) == 1
    inputs = make_rl_inputs(case, torch.float32, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    (logits,) = inputs.student.values()
    ours = rl_graph_loss(lossgraph.compile(spec, backend=backend))(inputs)
    peer = rl_loss(case, exact_kl=True)(inputs)
    assert_close(peer, ours.detach(), dtype=torch.float32, rtol=1e-5, what="case f: exact-KL peer vs lossgraph")
    assert_close(
        _gradient(peer, logits), _gradient(ours, logits), dtype=torch.float32, rtol=1e-4, atol=1e-8, what="grad"
    )


def test_case_f_k3_peer_is_trls_dapo_loss_plus_the_lm_term():
    """The k3 peer against tests/rl_reference.py's float64 TRL loss (checked against GRPOTrainer itself)."""
    case = rl_case(tokens=64, vocab=300)
    inputs = make_rl_inputs(case, torch.float64, torch.device("cpu"))
    (logits,) = inputs.student.values()
    log_probs = torch.log_softmax(logits, -1)
    per_token_logps = log_probs.gather(-1, inputs.labels[..., None])[..., 0]
    trl = grpo_loss(
        per_token_logps,
        inputs.old_logprobs.double(),
        inputs.advantages.double(),
        inputs.completion_mask,
        loss_type="dapo",
        epsilon_low=RL_EPSILON_LOW,
        epsilon_high=RL_EPSILON_HIGH,
        beta=RL_BETA,
        ref_per_token_logps=inputs.ref_logprobs.double(),
    )
    expected = trl - RL_LM_WEIGHT * per_token_logps.mean()
    peer = rl_loss(case, exact_kl=False)(inputs)
    assert_close(peer, expected.detach(), dtype=torch.float32, rtol=1e-6, what="case f: k3 peer vs TRL")
    assert_close(_gradient(peer, logits), _gradient(expected, logits), dtype=torch.float32, rtol=1e-5, atol=1e-9)


def test_case_f_inputs_clip_some_ratios_and_keep_the_cpu_proportions():
    case = rl_case(small=True)
    assert (case.tokens, case.vocab) == SMALL_SIZES["f"] == (512, 4096)
    assert (rl_case().tokens, rl_case().vocab) == (8192, 128256)
    inputs = make_rl_inputs(rl_case(tokens=256, vocab=128), torch.float32, torch.device("cpu"))
    (logits,) = inputs.student.values()
    logps = torch.log_softmax(logits.detach(), -1).gather(-1, inputs.labels[..., None])[..., 0]
    ratio = torch.exp(logps - inputs.old_logprobs)
    clipped = (ratio < 1 - RL_EPSILON_LOW) | (ratio > 1 + RL_EPSILON_HIGH)
    assert 0 < clipped.float().mean() < 0.5
    assert inputs.sequence_ids.unique().numel() == 16 and (inputs.old_logprobs <= 0).all()


def test_bench_runs_case_f_on_the_cpu(tmp_path):
    path = tmp_path / "bench.json"
    arguments = "bench f --device cpu --tokens 32 --vocab 128 --repeats 1 --warmup 0 --json".split()
    result = CliRunner().invoke(app, [*arguments, str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "case (f) RL: CE + GRPO" in result.output and "needs CUDA + Triton" in result.output
    (case,) = json.loads(path.read_text())["cases"]
    timed = {m["implementation"] for m in case["measurements"] if m["median_ms"] is not None}
    assert timed == {
        "lossgraph reference",
        "torch eager (fp32)",
        "torch eager (fp32), exact KL",
        "torch.compile",
        "torch.compile, exact KL",
    }
    assert case["floor_bytes"] == 32 * (3 * 128 * 2 + 2 * 4)  # student, reference, gradient rows; 2 floats
