"""A new leaf target form is one module: the test-only `token_pair` form (tests/leaf_form_plugin.py), a
new kind of run-time tensor, registered here, goes through validation, `lossgraph plan`, the input
checks, both backends against a float64 formula, and a two-rank vocab-parallel split."""

from __future__ import annotations

import os
from pathlib import Path

import leaf_form_plugin as plugin
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fused_cases import interpreter_warnings, requires_fused
from helpers import assert_close, free_port
from test_plugins import run_lossgraph

import lossgraph

pytestmark = interpreter_warnings

VOCAB = 64
B, S = 2, 5
DOCUMENT = f"""\
version: 1
vocab_size: {VOCAB}
heads:
  next: {{offset: 1}}
sources:
  labels: {{type: labels}}
  pair: {{type: token_pair}}
losses:
  ce: {{type: cross_entropy, heads: [next], target: pair, weight: 0.7}}
  kl: {{type: forward_kl, heads: [next], target: pair, temperature: 2.0, weight: 0.3}}
"""


@pytest.fixture
def token_pair():
    plugin.register()
    yield
    plugin.unregister()


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, VOCAB, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, VOCAB, (B, S), generator=generator)
    ids = torch.randint(0, VOCAB, (B, S, 2), generator=generator)
    ids[0, 0, 1] = ids[0, 0, 0]  # one position whose two tokens are the same: all its mass on one token
    weight = torch.rand(B, S, generator=generator)
    weight[1, 2] = 1.0  # and one whose second token has no mass
    return logits, labels, plugin.TokenPair(ids, weight)


def _expected(logits: torch.Tensor, pair: plugin.TokenPair) -> tuple[torch.Tensor, torch.Tensor]:
    """The graph's loss and gradient in float64, from the formulas in the plugin module."""
    z = logits.detach().clone().requires_grad_()
    loss = 0.7 * plugin.reference_value(z, pair, 1.0, "cross_entropy")
    loss = loss + 0.3 * plugin.reference_value(z, pair, 2.0, "forward_kl")
    loss.backward()
    return loss.detach(), z.grad


def test_unregistered_form_is_an_unknown_type():
    with pytest.raises(lossgraph.ConfigError, match="token_pair"):
        lossgraph.loads(DOCUMENT)


def test_document_validates_and_plans(token_pair, tmp_path):
    spec = lossgraph.loads(DOCUMENT)
    graph = lossgraph.compile(spec, backend="torch")
    assert list(graph.plan.teachers) == ["pair"]
    path = tmp_path / "pair.yaml"
    path.write_text(DOCUMENT)
    # the command line, in a process of its own, with the form's module as a plugin
    for command in ("validate", "plan"):
        result = run_lossgraph("--plugin", "leaf_form_plugin:register", command, str(path))
        assert result.returncode == 0, result.stderr
    assert "1 fused launch" in result.stdout


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)], ids=["reference", "fused"])
def test_both_backends_match_the_float64_formula(token_pair, backend):
    logits, labels, pair = _inputs()
    expected_loss, expected_grad = _expected(logits, pair)
    dtype = torch.float64 if backend == "torch" else torch.float32
    student = logits.to(dtype).requires_grad_()
    graph = lossgraph.compile(lossgraph.loads(DOCUMENT), backend=backend)
    out = graph({"next": student}, labels=labels, teachers={"pair": pair})
    out.loss.backward()
    tolerance = 1e-12 if backend == "torch" else 2e-6
    assert_close(out.loss.double(), expected_loss, atol=tolerance, rtol=tolerance)
    assert_close(student.grad.double(), expected_grad, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda pair: pair.ids, "pass TokenPair"),
        (lambda pair: plugin.TokenPair(pair.ids[..., :1], pair.weight), r"ids of 'pair' has shape \(2, 5, 1\)"),
        (lambda pair: plugin.TokenPair(pair.ids.float(), pair.weight), "must be integers"),
        (lambda pair: plugin.TokenPair(pair.ids + VOCAB, pair.weight), r"fall outside \[0, 64\)"),
        (lambda pair: plugin.TokenPair(pair.ids, pair.weight + 1.5), r"at position 0 \(flattened\)"),
    ],
    ids=["type", "shape", "dtype", "range", "weight"],
)
def test_the_forms_input_checks_are_located(token_pair, change, message):
    logits, labels, pair = _inputs()
    graph = lossgraph.compile(lossgraph.loads(DOCUMENT), backend="torch")
    with pytest.raises(lossgraph.InputError, match=message):
        graph({"next": logits}, labels=labels, teachers={"pair": change(pair)})


def _vocab_parallel_worker(rank: int, world: int, port: int, backend: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plugin.register()
        logits, labels, pair = _inputs()
        width = VOCAB // world
        student = logits[..., rank * width : (rank + 1) * width].float().clone().requires_grad_()
        graph = lossgraph.compile(lossgraph.loads(DOCUMENT), backend=backend, vocab_parallel_group=dist.group.WORLD)
        out = graph({"next": student}, labels=labels, teachers={"pair": pair})
        out.loss.backward()
        torch.save({"loss": out.loss.detach(), "grad": student.grad}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py's workers: no interpreter teardown once the results are saved


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)], ids=["reference", "fused"])
def test_two_rank_vocab_split_matches_the_formula(backend, tmp_path):
    world = 2
    mp.spawn(_vocab_parallel_worker, args=(world, free_port(), backend, str(tmp_path)), nprocs=world)
    logits, _, pair = _inputs()
    expected_loss, expected_grad = _expected(logits, pair)
    width = VOCAB // world
    for rank in range(world):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(found["loss"].double(), expected_loss, atol=2e-6, rtol=2e-6)
        columns = expected_grad[..., rank * width : (rank + 1) * width]
        assert_close(found["grad"].double(), columns, atol=2e-6, rtol=2e-6)
