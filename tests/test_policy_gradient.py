"""policy_gradient and kl_estimate on a rollout: both backends against float64 formulas (tests/kind_table.py's
and TRL's loss, tests/rl_reference.py), every option, the clip boundaries, ragged and all-masked sequences,
and the one launch they share with cross-entropy and an exact KL on one head."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fused_cases import FUSED_TOLERANCES, LOW_PRECISION, interpreter_warnings, requires_fused
from helpers import assert_close, assert_ranks_match, free_port
from kind_table import ROLLOUT_KINDS, truth
from rl_reference import grpo_loss

import lossgraph
from lossgraph import Rollout
from lossgraph.document import check_text

pytestmark = interpreter_warnings

B, S, V = 3, 6, 40
MAX_COMPLETION_LENGTH = 8


def graph(pg: str = "", kl: str = "", *, old: bool = True, ref: bool = True, extra: str = "") -> str:
    losses = f"  pg: {{type: policy_gradient, heads: [next], target: rollouts{pg}}}\n"
    if kl is not None:
        losses += f"  kl: {{type: kl_estimate, heads: [next], target: rollouts, weight: 0.04{kl}}}\n"
    return (
        f"version: 1\nvocab_size: {V}\nheads: {{next: {{offset: 1}}}}\n"
        f"sources:\n  labels: {{type: labels}}\n"
        f"  rollouts: {{type: rollout, old_logprobs: {str(old).lower()}, ref_logprobs: {str(ref).lower()}}}\n"
        f"{extra}losses:\n{losses}"
    )


def batch(seed: int = 0):
    """Logits, labels (row 0: a prompt of 2 positions; row 1: every position masked, a sequence that adds
    0 and still counts), and the student's float64 log-prob of each label at temperature 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, S), generator=generator)
    labels[0, :2] = -100
    labels[1, :] = -100
    mask = labels != -100
    lq = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = (lq + 0.4 * torch.randn(B, S, generator=generator, dtype=torch.float64)).clamp(max=0.0)
    ref = (lq + 0.4 * torch.randn(B, S, generator=generator, dtype=torch.float64)).clamp(max=0.0)
    advantages = torch.randn(B, generator=generator, dtype=torch.float64)
    # the batch keeps a rollout's values in float32: the formulas take them as rounded
    return logits, labels, mask, old.float().double(), ref.float().double(), advantages.float().double()


def run(text: str, logits, labels, rollout: Rollout, backend: str, **call):
    """The loss and the gradient of the logits."""
    graph_ = lossgraph.compile(lossgraph.loads(text), backend)
    x = logits.detach().clone().requires_grad_(True)
    out = graph_({"next": x}, labels=labels, teachers={"rollouts": rollout}, **call)
    out.loss.backward()
    return out, x.grad


def trl(logits, labels, mask, old, ref, advantages, **options):
    """TRL's loss (tests/rl_reference.py, plain k3 without the bias correction) and its gradient."""
    x = logits.detach().clone().requires_grad_(True)
    lq = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    loss = grpo_loss(
        lq, old, advantages, mask, ref_per_token_logps=ref, beta=0.04, use_bias_correction_kl=False, **options
    )
    loss.backward()
    return loss.detach(), x.grad


# (TRL's options, the graph's fields, the rollout declares old log-probs)
TRL_CASES = {
    "grpo": (dict(loss_type="grpo"), ", aggregation: sequence_mean", True),
    "bnpo": (dict(loss_type="bnpo"), "", True),
    "dapo_clip_higher": (dict(loss_type="dapo", epsilon_high=0.28), ", epsilon_high: 0.28", True),
    "dr_grpo": (
        dict(loss_type="dr_grpo", max_completion_length=MAX_COMPLETION_LENGTH),
        f", aggregation: constant, max_completion_length: {MAX_COMPLETION_LENGTH}",
        True,
    ),
    "delta": (dict(loss_type="bnpo", delta=1.1), ", delta: 1.1", True),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.3), ", objective: cispo, epsilon_high: 1.3", True),
    "on_policy": (dict(loss_type="grpo"), ", aggregation: sequence_mean", False),
}


def _kl_fields(pg_fields: str) -> str:
    """The KL node aggregates like the policy term (TRL adds beta * k3 before its one aggregation)."""
    parts = pg_fields.split(", ")
    return "".join(", " + part for part in parts if part.startswith(("aggregation", "max_completion")))


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_reference_equals_trl(case):
    options, fields, declared_old = TRL_CASES[case]
    logits, labels, mask, old, ref, advantages = batch()
    old = old if declared_old else None
    expected_loss, expected_grad = trl(logits, labels, mask, old, ref, advantages, **options)
    out, grad = run(
        graph(fields, _kl_fields(fields), old=declared_old), logits, labels, Rollout(advantages, old, ref), "torch"
    )
    # a sequence's weight 1 / n is a float32 row scale, as every term group's (relative error 6e-8)
    assert_close(out.loss.detach(), expected_loss, rtol=1e-6, atol=1e-12, what=f"{case} loss")
    assert_close(grad, expected_grad, rtol=1e-6, atol=1e-12, what=f"{case} gradient")


@requires_fused
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", ["grpo", "dr_grpo", "delta", "cispo", "on_policy"])
def test_fused_equals_reference(case, dtype):
    _, fields, declared_old = TRL_CASES[case]
    logits, labels, _, old, ref, advantages = batch(1)
    rounded = logits.to(dtype)
    rollout = Rollout(advantages.float(), old.float() if declared_old else None, ref.float())
    text = graph(fields, _kl_fields(fields), old=declared_old)
    fused, fused_grad = run(text, rounded, labels, rollout, "triton")
    reference, reference_grad = run(text, rounded.double(), labels, rollout, "torch")
    tol = FUSED_TOLERANCES[dtype]
    for key in reference.values:
        assert_close(
            fused.values[key], reference.values[key].float(), rtol=tol.value_rtol, atol=tol.value_atol, what=key
        )
    magnitude = float(reference_grad.abs().max())
    assert_close(
        fused_grad.double(), reference_grad, rtol=tol.grad_rtol, atol=tol.grad_atol * magnitude, what=f"{case} gradient"
    )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_equal_their_formula(estimator, backend):
    logits, labels, mask, _, ref, advantages = batch(2)
    text = graph(", weight: 0.0", f", estimator: {estimator}", old=False)
    out, grad = run(
        text, logits.float() if backend == "triton" else logits, labels, Rollout(advantages, None, ref), backend
    )
    x = logits.detach().clone().requires_grad_(True)
    lq = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    per_token = truth("kl_estimate").value(lq, advantages, None, ref, estimator=estimator)
    expected = (per_token * mask).sum() / mask.sum()
    (0.04 * expected).backward()
    tolerance = 1e-5 if backend == "triton" else 1e-12
    assert_close(out.values["kl/next"].double(), expected.detach(), rtol=tolerance, atol=tolerance)
    assert_close(grad.double(), x.grad, rtol=tolerance, atol=tolerance * float(x.grad.abs().max()))


def test_every_rollout_kind_has_a_formula():
    assert set(ROLLOUT_KINDS) == {"policy_gradient", "kl_estimate"}
    for kind in ROLLOUT_KINDS:
        truth(kind)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_ratios_exactly_at_the_clip_bounds_keep_the_gradient(backend):
    """On-policy the ratio is exactly 1; with epsilon_low = epsilon_high = 0 it lies on both bounds. clamp
    passes the gradient at its bounds and min splits it at the tie: dl/dlq = -A, as TRL's expression gives."""
    logits, labels, mask, _, _, advantages = batch(3)
    logits = logits if backend == "torch" else logits.float()
    text = graph(", epsilon_low: 0.0, epsilon_high: 0.0", kl=None, old=False, ref=False)
    out, grad = run(text, logits, labels, Rollout(advantages), backend)
    expected_loss, _ = trl(
        logits.double(),
        labels,
        mask,
        None,
        torch.zeros(B, S, dtype=torch.float64),
        advantages,
        loss_type="bnpo",
        epsilon_low=0.0,
        epsilon_high=0.0,
    )
    x = logits.double().detach().clone().requires_grad_(True)
    lq = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    (-(advantages[:, None] * lq * mask).sum() / mask.sum()).backward()  # d/dlq = -A
    tolerance = 1e-12 if backend == "torch" else 1e-5
    assert_close(
        out.loss.detach().double(), -(advantages[:, None] * mask).sum() / mask.sum(), rtol=tolerance, atol=tolerance
    )
    assert_close(grad.double(), x.grad, rtol=tolerance, atol=tolerance * float(x.grad.abs().max()))
    # the TRL loss without its KL term: the same value, -A per token
    assert math.isfinite(float(expected_loss))


def test_advantage_zero_gives_zero_loss_and_gradient():
    logits, labels, _, old, _, _ = batch(4)
    out, grad = run(
        graph(kl=None, ref=False), logits, labels, Rollout(torch.zeros(B, dtype=torch.float64), old), "torch"
    )
    assert float(out.loss.detach()) == 0.0
    assert float(grad.abs().max()) == 0.0


def test_packed_sequences_take_their_own_mean():
    """Two sequences packed in row 2 (ids 7, 7, 7, 9, 9, 9): sequence_mean averages each, then the four
    sequences (row 0, row 1 all masked, and the two of row 2)."""
    logits, labels, mask, old, _, advantages = batch(5)
    ids = torch.tensor([[0] * S, [0] * S, [7, 7, 7, 9, 9, 9]])
    per_token_advantages = advantages[:, None].expand(B, S).clone()
    per_token_advantages[2, 3:] = -1.5
    text = graph(", aggregation: sequence_mean", kl=None, ref=False)
    out, grad = run(text, logits, labels, Rollout(per_token_advantages, old, None, ids), "torch")
    x = logits.detach().clone().requires_grad_(True)
    lq = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    per_token = truth("policy_gradient").value(lq, per_token_advantages, old, None)
    spans = [(0, slice(0, S)), (1, slice(0, S)), (2, slice(0, 3)), (2, slice(3, S))]
    means = [(per_token[r, c] * mask[r, c]).sum() / mask[r, c].sum().clamp(min=1) for r, c in spans]
    expected = torch.stack(means).sum() / len(spans)
    expected.backward()
    assert_close(out.loss.detach(), expected.detach(), rtol=1e-6, atol=1e-12)
    assert_close(grad, x.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_document_ids_are_the_sequences_when_the_rollout_gives_none(backend):
    """Packed documents (document_ids) are the rollout's sequences when it gives no sequence_ids."""
    logits, labels, _, old, _, advantages = batch(5)
    logits = logits.float()  # the fused kernel's dtypes
    ids = torch.tensor([[0] * S, [0] * S, [7, 7, 7, 9, 9, 9]])
    text = graph(", aggregation: sequence_mean", kl=None, ref=False)
    by_documents, grad_documents = run(text, logits, labels, Rollout(advantages, old), backend, document_ids=ids)
    by_sequences, grad_sequences = run(
        text, logits, labels, Rollout(advantages, old, None, ids), backend, document_ids=ids
    )
    one_sequence, _ = run(text, logits, labels, Rollout(advantages, old, None, ids * 0), backend, document_ids=ids)
    assert_close(by_documents.loss.detach(), by_sequences.loss.detach(), rtol=1e-6, atol=1e-7)
    assert_close(grad_documents, grad_sequences, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(by_documents.loss, one_sequence.loss)  # the documents split row 2 in two


ONE_HEAD = f"""version: 1
vocab_size: {V}
heads: {{next: {{offset: 1}}}}
sources:
  labels: {{type: labels}}
  teacher: {{type: teacher}}
  reference: {{type: teacher, description: the reference model's logits}}
  rollouts: {{type: rollout, old_logprobs: true}}
losses:
  lm: {{type: cross_entropy, heads: [next], target: labels}}
  distill: {{type: forward_kl, heads: [next], target: teacher, weight: 0.5}}
  pg: {{type: policy_gradient, heads: [next], target: rollouts, epsilon_high: 0.28}}
  kl: {{type: reverse_kl, heads: [next], target: reference, weight: 0.04}}
"""


def test_policy_gradient_and_an_exact_kl_fuse_into_one_launch():
    report = check_text(ONE_HEAD)
    assert report.ok, [d.format() for d in report.diagnostics]
    launches = report.context.fusion.launches
    assert len(launches) == 1
    assert [term.kind for term in launches[0].terms] == ["cross_entropy", "forward_kl", "policy_gradient", "reverse_kl"]


@requires_fused
def test_the_one_launch_runs_and_matches_the_reference():
    logits, labels, _, old, _, advantages = batch(6)
    generator = torch.Generator().manual_seed(7)
    teachers = {
        "teacher": torch.randn(B, S, V, generator=generator),
        "reference": torch.randn(B, S, V, generator=generator),
        "rollouts": Rollout(advantages.float(), old.float()),
    }
    results = {}
    for backend in ("triton", "torch"):
        graph_ = lossgraph.compile(lossgraph.loads(ONE_HEAD), backend)
        x = logits.float().detach().clone().requires_grad_(True)
        out = graph_({"next": x}, labels=labels, teachers=teachers)
        out.loss.backward()
        results[backend] = (out, x.grad)
    (fused, fused_grad), (reference, reference_grad) = results["triton"], results["torch"]
    assert_close(fused.loss.detach(), reference.loss.detach(), rtol=1e-5, atol=1e-6)
    assert_close(fused_grad, reference_grad, rtol=1e-5, atol=1e-5 * float(reference_grad.abs().max()))


# --------------------------------------------------------------------------------------------------
# Across processes (gloo): the vocab split over ranks, and sequences split over data-parallel ranks.
# --------------------------------------------------------------------------------------------------

SPLIT_VOCAB = 48
SPLIT = f"""version: 1
vocab_size: {SPLIT_VOCAB}
heads: {{next: {{offset: 1}}}}
sources:
  labels: {{type: labels}}
  rollouts: {{type: rollout, old_logprobs: true, ref_logprobs: true}}
  reference: {{type: teacher}}
losses:
  lm: {{type: cross_entropy, heads: [next], target: labels, weight: 0.1}}
  pg: {{type: policy_gradient, heads: [next], target: rollouts, epsilon_high: 0.28, aggregation: sequence_mean}}
  k3: {{type: kl_estimate, heads: [next], target: rollouts, weight: 0.04, aggregation: sequence_mean}}
  exact: {{type: reverse_kl, heads: [next], target: reference, weight: 0.04}}
"""


def _split_inputs():
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(2, S, SPLIT_VOCAB, generator=generator)
    labels = torch.randint(0, SPLIT_VOCAB, (2, S), generator=generator)
    labels[0, :4] = -100  # row 0 has far fewer tokens than row 1
    lq = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = (lq + 0.3 * torch.randn(2, S, generator=generator)).clamp(max=0.0)
    ref = (lq + 0.3 * torch.randn(2, S, generator=generator)).clamp(max=0.0)
    rollout = Rollout(torch.randn(2, generator=generator), old, ref)
    return logits, labels, rollout, torch.randn(2, S, SPLIT_VOCAB, generator=generator)


def _split_run(backend, logits, labels, rollout, reference, **options):
    graph_ = lossgraph.compile(lossgraph.loads(SPLIT), backend=backend, **options)
    x = logits.clone().requires_grad_()
    out = graph_({"next": x}, labels=labels, teachers={"rollouts": rollout, "reference": reference})
    out.loss.backward()
    return out.loss.detach(), x.grad


def _vocab_parallel_worker(rank: int, world: int, port: int, backend: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, labels, rollout, reference = _split_inputs()
        width = SPLIT_VOCAB // world
        columns = slice(rank * width, (rank + 1) * width)
        loss, grad = _split_run(
            backend,
            logits[..., columns],
            labels,
            rollout,
            reference[..., columns],
            vocab_parallel_group=dist.group.WORLD,
        )
        torch.save({"loss": loss, "grad": grad}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py's workers: no interpreter teardown once the results are saved


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_vocab_parallel_equals_one_process(backend, tmp_path):
    """The rollout's values are per row, whole on every rank; the label's log-prob crosses the ranks."""
    world = 2
    mp.spawn(_vocab_parallel_worker, args=(world, free_port(), backend, str(tmp_path)), nprocs=world)
    assert_ranks_match(tmp_path, world, *_split_run(backend, *_split_inputs()))


def _data_parallel_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, labels, rollout, reference = _split_inputs()
        rows = slice(rank, rank + 1)
        mine = Rollout(*(None if part is None else part[rows] for part in rollout))
        loss, grad = _split_run(
            "torch", logits[rows], labels[rows], mine, reference[rows], normalize_across=dist.group.WORLD
        )
        torch.save({"loss": loss, "grad": grad}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_sequence_mean_across_data_parallel_ranks_equals_one_process(tmp_path):
    """Each rank holds one sequence: normalize_across sums the sequence counts, so the ranks' shares add up
    to GRPO's mean over every sequence of the global batch (and the token mean of the other terms)."""
    world = 2
    mp.spawn(_data_parallel_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    loss, grad = _split_run("torch", *_split_inputs())
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    assert_close(sum(r["loss"] for r in results), loss, rtol=1e-6, atol=1e-7, what="summed loss")
    for rank, result in enumerate(results):
        assert_close(result["grad"], grad[rank : rank + 1], rtol=1e-6, atol=1e-8, what=f"rank {rank} gradient")
