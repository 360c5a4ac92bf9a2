"""GSPO (`importance_sampling: sequence`) and `top_entropy_quantile` on policy_gradient: both backends against
TRL's loss in float64 (tests/rl_reference.py), ragged and packed sequences, an all-masked sequence, ratios on
the clip bounds, vocab parallel over 2 gloo ranks, the plan's phases, and no host sync between the phases."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fused_cases import FUSED_TOLERANCES, LOW_PRECISION, interpreter_warnings, requires_fused
from helpers import assert_close, assert_ranks_match, free_port
from rl_reference import fast_llm_policy_gradient_loss, grpo_loss

import lossgraph
from lossgraph import Rollout
from lossgraph.document import check_text
from lossgraph.kinds.losses.policy_gradient import batch_quantile
from lossgraph.runtime import fused

pytestmark = interpreter_warnings

B, S, V = 3, 6, 40
MAX_COMPLETION_LENGTH = 8


def graph(fields: str, *, old: bool = True, temperature: float | None = None, head: str = "") -> str:
    tempered = "" if temperature is None else f", temperature: {temperature}"
    return (
        f"version: 1\nvocab_size: {V}\nheads: {{next: {{offset: 1{head}}}}}\n"
        f"sources:\n  labels: {{type: labels}}\n"
        f"  rollouts: {{type: rollout, old_logprobs: {str(old).lower()}}}\n"
        f"losses:\n  pg: {{type: policy_gradient, heads: [next], target: rollouts{tempered}{fields}}}\n"
    )


def batch(seed: int = 0):
    """Logits (spread out, so that the entropies are far apart), labels (row 0: a prompt of 2 positions;
    row 1: every position masked, a sequence that adds 0 and still counts), old log-probs and one
    advantage per row, the rollout's values rounded to float32 as the batch keeps them."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 4, B * S).reshape(
        B, S, 1
    )
    labels = torch.randint(0, V, (B, S), generator=generator)
    labels[0, :2] = -100
    labels[1, :] = -100
    lq = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = (lq + 0.2 * torch.randn(B, S, generator=generator, dtype=torch.float64)).clamp(max=0.0)
    advantages = torch.randn(B, generator=generator, dtype=torch.float64)
    return logits, labels, old.float().double(), advantages.float().double()


def run(text: str, logits, labels, rollout: Rollout, backend: str, **call):
    """The graph's output and the gradient of the logits."""
    graph_ = lossgraph.compile(lossgraph.loads(text), backend, **call)
    x = logits.detach().clone().requires_grad_(True)
    out = graph_({"next": x}, labels=labels, teachers={"rollouts": rollout})
    out.loss.backward()
    return out, x.grad


def trl(logits, labels, old, advantages, temperature: float = 1.0, **options):
    """TRL's loss in float64 from the logits (the entropies TRL computes at the same temperature) and its
    gradient."""
    x = logits.detach().double().clone().requires_grad_(True)
    log_q = torch.log_softmax(x / temperature, -1)
    lq = log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    entropies = -(log_q.exp() * log_q).sum(-1).detach()
    loss = grpo_loss(lq, old, advantages, labels != -100, entropies=entropies, **options)
    loss.backward()
    return loss.detach(), x.grad


# (TRL's options, the graph's fields, the rollout declares old log-probs, temperature)
CASES = {
    "gspo_grpo": (dict(loss_type="grpo", importance_sampling_level="sequence"), ", aggregation: sequence_mean"),
    "gspo_bnpo": (
        dict(loss_type="bnpo", importance_sampling_level="sequence", epsilon_high=0.28),
        ", epsilon_high: 0.28",
    ),
    "gspo_dr_grpo": (
        dict(loss_type="dr_grpo", importance_sampling_level="sequence", max_completion_length=MAX_COMPLETION_LENGTH),
        f", aggregation: constant, max_completion_length: {MAX_COMPLETION_LENGTH}",
    ),
    "gspo_delta": (dict(loss_type="bnpo", importance_sampling_level="sequence", delta=1.05), ", delta: 1.05"),
    "gspo_cispo": (
        dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.1),
        ", objective: cispo, epsilon_high: 1.1",
    ),
    "gspo_token": (
        dict(loss_type="grpo", importance_sampling_level="sequence_token"),
        ", aggregation: sequence_mean",
    ),
    # the entropy mask makes a sequence's tokens differ, where GSPO's and GSPO-token's gradients part
    "gspo_token_entropy": (
        dict(loss_type="grpo", importance_sampling_level="sequence_token", top_entropy_quantile=0.5),
        ", aggregation: sequence_mean, top_entropy_quantile: 0.5",
    ),
    "entropy": (dict(loss_type="bnpo", top_entropy_quantile=0.4), ", top_entropy_quantile: 0.4"),
    "entropy_grpo": (
        dict(loss_type="grpo", top_entropy_quantile=0.3),
        ", top_entropy_quantile: 0.3, aggregation: sequence_mean",
    ),
    "entropy_cispo": (
        dict(loss_type="cispo", epsilon_high=1.1, top_entropy_quantile=0.5),
        ", objective: cispo, epsilon_high: 1.1, top_entropy_quantile: 0.5",
    ),
    "gspo_entropy": (
        dict(loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.5),
        ", aggregation: sequence_mean, top_entropy_quantile: 0.5",
    ),
}
FIELDS = {case: fields for case, (_, fields) in CASES.items()}
for _case in CASES:
    CASES[_case][0].setdefault("epsilon_high", 0.2)


def _importance(case: str) -> str:
    if case.startswith("gspo_token"):
        return ", importance_sampling: sequence_token"
    return ", importance_sampling: sequence" if case.startswith("gspo") else ""


@pytest.mark.parametrize("temperature", [None, 0.7])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_trl(case, temperature):
    options, fields = CASES[case]
    logits, labels, old, advantages = batch()
    expected_loss, expected_grad = trl(logits, labels, old, advantages, temperature or 1.0, **options)
    text = graph(_importance(case) + fields, temperature=temperature)
    out, grad = run(text, logits, labels, Rollout(advantages, old), "torch")
    assert_close(out.loss.detach(), expected_loss, rtol=1e-6, atol=1e-12, what=f"{case} loss")
    assert_close(grad, expected_grad, rtol=1e-6, atol=1e-12, what=f"{case} gradient")


@requires_fused
@pytest.mark.parametrize("case", list(CASES))
def test_fused_fp32_equals_trl(case):
    options, fields = CASES[case]
    logits, labels, old, advantages = batch(1)
    expected_loss, expected_grad = trl(logits.float(), labels, old, advantages, **options)
    out, grad = run(
        graph(_importance(case) + fields), logits.float(), labels, Rollout(advantages.float(), old.float()), "triton"
    )
    tol = FUSED_TOLERANCES[torch.float32]
    assert_close(out.loss.detach().double(), expected_loss, rtol=tol.value_rtol, atol=tol.value_atol, what=case)
    magnitude = float(expected_grad.abs().max())
    assert_close(grad.double(), expected_grad, rtol=tol.grad_rtol, atol=tol.grad_atol * magnitude, what=case)


@requires_fused
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", ["gspo_grpo", "gspo_cispo", "gspo_token", "gspo_entropy", "entropy"])
def test_fused_equals_reference(case, dtype):
    """Both backends on the same rounded logits (the reference in float64), at a temperature."""
    logits, labels, old, advantages = batch(2)
    rounded = logits.to(dtype)
    rollout = Rollout(advantages.float(), old.float())
    text = graph(_importance(case) + FIELDS[case], temperature=0.8)
    fused_out, fused_grad = run(text, rounded, labels, rollout, "triton")
    reference, reference_grad = run(text, rounded.double(), labels, rollout, "torch")
    tol = FUSED_TOLERANCES[dtype]
    assert_close(fused_out.loss.detach().double(), reference.loss.detach(), rtol=tol.value_rtol, atol=tol.value_atol)
    magnitude = float(reference_grad.abs().max())
    assert_close(fused_grad.double(), reference_grad, rtol=tol.grad_rtol, atol=tol.grad_atol * magnitude, what=case)


def _packed_expected(logits, labels, old, advantages, ids):
    """GSPO with sequence_mean, written out per run of ids within each row (float64)."""
    x = logits.detach().clone().requires_grad_(True)
    lq = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = labels != -100
    means = []
    for row in range(B):
        for value in dict.fromkeys(ids[row].tolist()):
            span = (ids[row] == value) & mask[row]
            n = int(span.sum())
            log_ratio = ((lq[row] - old[row]) * span).sum() / max(n, 1)
            ratio = torch.exp(log_ratio)
            a = advantages[row][span] if n else advantages[row][:0]
            loss = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
            means.append(loss.sum() / max(n, 1))
    expected = torch.stack(means).mean()
    expected.backward()
    return expected.detach(), x.grad


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_packed_ragged_sequences_take_their_own_ratio(backend):
    """Row 2 packs two sequences (ids 7, 7, 9, 9, 9, 9), each with its own ratio and per-token advantages;
    row 1 is all masked: ratio 1, no gradient, and it still counts in the mean over sequences."""
    logits, labels, old, advantages = batch(3)
    ids = torch.tensor([[0] * S, [0] * S, [7, 7, 9, 9, 9, 9]])
    per_token = advantages[:, None].expand(B, S).clone()
    per_token[2, 2:] = -0.7
    per_token[2, 4] = 0.9  # advantages differ within a sequence: each token's branch of the clip differs
    expected_loss, expected_grad = _packed_expected(logits, labels, old, per_token, ids)
    logits = logits if backend == "torch" else logits.float()
    text = graph(", importance_sampling: sequence, aggregation: sequence_mean")
    out, grad = run(text, logits, labels, Rollout(per_token.float(), old.float(), None, ids), backend)
    tolerance = 1e-6 if backend == "torch" else 1e-5
    assert_close(out.loss.detach().double(), expected_loss, rtol=tolerance, atol=1e-9)
    assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * float(expected_grad.abs().max()))
    assert float(grad[1].abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_sequence_ratio_on_the_clip_bounds_keeps_the_gradient(backend):
    """On-policy the sequence ratio is exactly 1, on both bounds with epsilon 0: clamp passes the gradient
    and min splits it at the tie, so dL/dlq_u = -(1 / n_s) sum_{t in s} w_t A = -w_u A (one advantage and
    one weight per sequence): the token-level gradient, as TRL's expression gives."""
    logits, labels, _, advantages = batch(4)
    logits = logits if backend == "torch" else logits.float()
    text = graph(", importance_sampling: sequence, epsilon_low: 0.0, epsilon_high: 0.0", old=False)
    out, grad = run(text, logits, labels, Rollout(advantages.float()), backend)
    expected_loss, expected_grad = trl(
        logits,
        labels,
        None,
        advantages,
        loss_type="bnpo",
        importance_sampling_level="sequence",
        epsilon_low=0.0,
        epsilon_high=0.0,
    )
    tolerance = 1e-12 if backend == "torch" else 1e-5
    assert_close(out.loss.detach().double(), expected_loss, rtol=tolerance, atol=tolerance)
    assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * float(expected_grad.abs().max()))


def test_batch_quantile_is_torch_quantile_of_the_active_values():
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(37, generator=generator)
    values[5] = values[9]  # a tie
    for count in (1, 2, 7, 37):
        active = torch.zeros(37, dtype=torch.bool)
        active[torch.randperm(37, generator=generator)[:count]] = True
        for q in (0.0, 0.3, 0.5, 0.6, 0.95, 1.0):
            assert float(batch_quantile(values, active, q)) == float(torch.quantile(values[active], q)), (count, q)
    assert float(batch_quantile(values, torch.zeros(37, dtype=torch.bool), 0.5)) == float("inf")


class HostSync(AssertionError):
    pass


def _no_host_sync(monkeypatch):
    """Make every way a tensor's values reach the host (and a boolean index, whose size is data) fail."""

    def refuse(name):
        def method(*args, **kwargs):
            raise HostSync(f"torch.Tensor.{name} between the phases")

        return method

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    getitem = torch.Tensor.__getitem__

    def index(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
            raise HostSync("a boolean index between the phases")
        return getitem(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", index)


@requires_fused
def test_the_fused_path_makes_no_host_sync_between_the_phases(monkeypatch):
    """Everything between the stats and the apply phase (`fused._with_row_inputs`) runs with the ways of
    syncing with the host patched to fail; the guard itself catches TRL's `entropies[mask]` quantile."""
    logits, labels, old, advantages = batch(5)
    calls = []
    original = fused._with_row_inputs

    def guarded(*args):
        with pytest.MonkeyPatch.context() as patch:
            _no_host_sync(patch)
            calls.append(original(*args))
            with pytest.raises(HostSync):
                torch.quantile(args[2][:, 0][args[2][:, 0] > 0], 0.5)
        return calls[-1]

    monkeypatch.setattr(fused, "_with_row_inputs", guarded)
    text = graph(", importance_sampling: sequence, top_entropy_quantile: 0.5, aggregation: sequence_mean")
    run(text, logits.float(), labels, Rollout(advantages.float(), old.float()), "triton")
    assert calls


def test_plan_says_the_head_runs_in_phases():
    report = check_text(graph(", importance_sampling: sequence"))
    assert report.ok, [d.format() for d in report.diagnostics]
    (launch,) = report.context.fusion.launches
    assert any("runs in phases" in note for note in launch.notes)
    token = check_text(graph(""))
    assert not any("phases" in note for note in token.context.fusion.launches[0].notes)


@pytest.mark.parametrize("value", ["0.0", "1.5", "-0.1"])
def test_top_entropy_quantile_out_of_range_is_located(value):
    report = check_text(graph(f", top_entropy_quantile: {value}"))
    assert not report.ok
    assert any("top_entropy_quantile" in d.format() for d in report.diagnostics)


def test_a_hidden_input_head_refuses_cross_row_options():
    report = check_text(graph(", importance_sampling: sequence", head=", input: hidden"))
    assert not report.ok
    assert any("input: hidden" in d.format() for d in report.diagnostics)


SPLIT_VOCAB = 32
SPLIT_FIELDS = ", importance_sampling: sequence, top_entropy_quantile: 0.5, aggregation: sequence_mean"


def _split_inputs():
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(2, S, SPLIT_VOCAB, generator=generator) * torch.linspace(0.5, 3, 2 * S).reshape(2, S, 1)
    labels = torch.randint(0, SPLIT_VOCAB, (2, S), generator=generator)
    labels[0, :4] = -100
    lq = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = (lq + 0.3 * torch.randn(2, S, generator=generator)).clamp(max=0.0)
    return logits, labels, Rollout(torch.randn(2, generator=generator), old)


def _split_run(backend, logits, labels, rollout, **options):
    text = graph(SPLIT_FIELDS).replace(f"vocab_size: {V}", f"vocab_size: {SPLIT_VOCAB}")
    out, grad = run(text, logits, labels, rollout, backend, **options)
    return out.loss.detach(), grad


def _vocab_parallel_worker(rank: int, world: int, port: int, backend: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, labels, rollout = _split_inputs()
        width = SPLIT_VOCAB // world
        columns = slice(rank * width, (rank + 1) * width)
        loss, grad = _split_run(backend, logits[..., columns], labels, rollout, vocab_parallel_group=dist.group.WORLD)
        torch.save({"loss": loss, "grad": grad}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py's workers: no interpreter teardown once the results are saved


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_fused)])
def test_vocab_parallel_equals_one_process(backend, tmp_path):
    """The ratios and the entropies come from the combined statistics: every rank computes the same."""
    world = 2
    mp.spawn(_vocab_parallel_worker, args=(world, free_port(), backend, str(tmp_path)), nprocs=world)
    assert_ranks_match(tmp_path, world, *_split_run(backend, *_split_inputs()))


@requires_fused
def test_values_without_a_gradient_are_the_same():
    """Under torch.no_grad the phased launches write no gradient and the same values."""
    logits, labels, old, advantages = batch(6)
    text = graph(", importance_sampling: sequence, top_entropy_quantile: 0.5")
    graph_ = lossgraph.compile(lossgraph.loads(text), "triton")
    call = dict(labels=labels, teachers={"rollouts": Rollout(advantages.float(), old.float())})
    with_gradient = graph_({"next": logits.float().requires_grad_(True)}, **call)
    with torch.no_grad():
        without = graph_({"next": logits.float()}, **call)
    assert float(without.loss) == float(with_gradient.loss.detach())


@requires_fused
def test_torch_compile_fullgraph_matches_eager():
    """Under torch.compile the phases run inside the head's one opaque op: the same loss and gradient."""
    logits, labels, old, advantages = batch(7)
    text = graph(", importance_sampling: sequence, top_entropy_quantile: 0.5, aggregation: sequence_mean")
    graph_ = lossgraph.compile(lossgraph.loads(text), "triton")
    rollout = Rollout(advantages.float(), old.float())

    def step(x):
        return graph_({"next": x}, labels=labels, teachers={"rollouts": rollout}).loss

    torch._dynamo.reset()
    results = []
    for function in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        x = logits.float().clone().requires_grad_(True)
        loss = function(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch._dynamo.reset()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def fast_llm(logits, labels, old, advantages, **options):
    """Fast-LLM's policy-gradient loss (tests/rl_reference.py) in float64 and its gradient; its divisor is the
    batch's number of sequences for gspo (one per batch row here) and its labelled-token count for grpo."""
    x = logits.detach().double().clone().requires_grad_(True)
    lq = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    loss = fast_llm_policy_gradient_loss(lq, old, advantages, labels != -100, **options)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize(
    ("fields", "options"),
    [
        ("", {"importance_sampling_level": "token"}),
        (
            ", importance_sampling: sequence, aggregation: constant, max_completion_length: 1",
            {"importance_sampling_level": "sequence", "divisor": float(B)},
        ),
    ],
    ids=["grpo", "gspo"],
)
def test_fast_llms_convention(fields, options):
    """Fast-LLM's `grpo` is the token mean (TRL's dapo/bnpo: lossgraph's default aggregation); its `gspo`
    weighs each sequence by its length and divides by the sequences (TRL's luspo): the sum over the tokens
    over the sequences, lossgraph's `aggregation: constant` with `max_completion_length: 1`."""
    logits, labels, old, advantages = batch(3)
    rollout = Rollout(advantages, old)
    out, grad = run(graph(fields + ", epsilon_high: 0.28"), logits, labels, rollout, "torch")
    expected, expected_grad = fast_llm(logits, labels, old, advantages, epsilon_high=0.28, **options)
    assert_close(out.loss.detach(), expected, rtol=1e-6, atol=1e-12)
    assert_close(grad, expected_grad, rtol=1e-6, atol=1e-12)
