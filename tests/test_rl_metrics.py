"""policy_gradient's metrics in GraphOutput.metrics (docs/rl.md, "Metrics"): both backends against float64
formulas written here and tests/rl_reference.py's `clip_fractions` (TRL's definitions), fp32, bf16 and fp16, masked
rows, ratios exactly on the clip bounds (strict comparisons), on-policy, CISPO, a graph without a policy
gradient, and vocab parallel on 2 gloo ranks."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fused_cases import interpreter_warnings, requires_fused
from helpers import assert_close, free_port
from lossgraph.kernels.codegen import KernelGenerator
from lossgraph.kernels.layout import kernel_layout
from rl_reference import clip_fractions

import lossgraph
from lossgraph import Rollout
from lossgraph.document import check_text
from lossgraph.kinds.losses.policy_gradient import policy_metrics

pytestmark = interpreter_warnings

B, S, V = 3, 6, 40
T = 0.7
BACKENDS = ["torch", pytest.param("triton", marks=requires_fused)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CLIP = ", epsilon_low: 0.2, epsilon_high: 0.28, delta: 1.3"
PG_METRICS = {"entropy", "ratio/mean", "ratio/min", "ratio/max", "approxkl", "masked_fraction"}
CLIP_METRICS = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}


def graph(pg: str = CLIP, *, old: bool = True, ref: bool = True, policy: bool = True) -> str:
    losses = "  lm: {type: cross_entropy, heads: [next], target: labels, weight: 0.1}\n"
    rollouts = ""
    if policy:
        losses += f"  policy: {{type: policy_gradient, heads: [next], target: rollouts, temperature: {T}{pg}}}\n"
        rollouts = (
            f"  rollouts: {{type: rollout, old_logprobs: {str(old).lower()}, ref_logprobs: {str(ref).lower()}}}\n"
        )
    return (
        f"version: 1\nvocab_size: {V}\nheads: {{next: {{offset: 1}}}}\n"
        f"sources:\n  labels: {{type: labels}}\n{rollouts}losses:\n{losses}"
    )


def inputs(dtype: torch.dtype, seed: int = 0):
    """Logits in `dtype` (row 0: a prompt of 2 positions; row 1: 4 masked positions), labels, old and reference
    log-probs spread around the student's (ratios on both sides of the clip range) and advantages of both signs."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, S, V, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=generator)
    labels[0, :2] = -100
    labels[1, 2:] = -100
    lq = student(logits, labels)[1]
    old = (lq + 0.4 * torch.randn(B, S, generator=generator, dtype=torch.float64)).clamp(max=0.0).float()
    ref = (lq + 0.4 * torch.randn(B, S, generator=generator, dtype=torch.float64)).clamp(max=0.0).float()
    advantages = torch.randn(B, generator=generator)
    return logits, labels, old, ref, advantages


def student(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 entropy and log q of the label at temperature T, per position."""
    log_q = torch.log_softmax(logits.double() / T, -1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    return entropy, log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0]


def expected(logits, labels, old, ref, advantages, *, cispo: bool = False, **clip) -> dict[str, float]:
    """The metrics in float64, written out: means over the active (labelled) tokens."""
    mask = labels != -100
    entropy, lq = student(logits, labels)
    log_ratio = lq - old.double() if old is not None else torch.zeros_like(lq)
    ratio = log_ratio.exp()
    a = advantages.double()[:, None].expand(B, S)

    def mean(values):
        return float(values.double()[mask].mean())

    found = {
        "entropy": mean(entropy),
        "ratio/mean": mean(ratio),
        "ratio/min": float(ratio[mask].min()),
        "ratio/max": float(ratio[mask].max()),
        "approxkl": mean(0.5 * log_ratio**2),  # PPO's approxkl: old vs new
        "masked_fraction": 1.0 - float(mask.sum()) / mask.numel(),
    }
    if ref is not None:  # TRL's `kl`: k3 against the reference
        delta = ref.double() - lq
        found["kl"] = mean(delta.exp() - delta - 1)
    if cispo:  # TRL: (coef_1 > epsilon_high) & (A > 0)
        found["cispo_clip_ratio"] = mean((ratio > clip["epsilon_high"]) & (a > 0))
    else:
        fractions = clip_fractions(ratio, advantages.double(), mask, **clip)
        found |= {f"clip_ratio/{name}_mean": float(value) for name, value in fractions.items()}
    return found


def metrics(text: str, backend: str, logits, labels, rollout: Rollout, **call) -> dict[str, torch.Tensor]:
    graph_ = lossgraph.compile(lossgraph.loads(text), backend)
    x = logits.detach().clone().requires_grad_(True)
    out = graph_({"next": x}, labels=labels, teachers={"rollouts": rollout}, **call)
    out.loss.backward()
    return out.metrics["next"]


def check(got: dict[str, torch.Tensor], want: dict[str, float], tolerance: float) -> None:
    policy = {key.removeprefix("policy/"): value for key, value in got.items() if key.startswith("policy/")}
    assert set(policy) == set(want)
    for name, value in want.items():
        assert policy[name].dtype == torch.float32 and policy[name].dim() == 0, name
        assert_close(policy[name].double(), torch.tensor(value, dtype=torch.float64), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_equal_the_formulas(backend, dtype):
    logits, labels, old, ref, advantages = inputs(dtype)
    got = metrics(graph(), backend, logits, labels, Rollout(advantages, old, ref))
    want = expected(logits, labels, old, ref, advantages, epsilon_low=0.2, epsilon_high=0.28, delta=1.3)
    assert 0 < want["clip_ratio/region_mean"] < 1 and want["ratio/max"] > 1.3  # the data clips, past delta
    check(got, want, 2e-5)
    assert set(got) == {"tokens", "accuracy"} | {f"policy/{name}" for name in PG_METRICS | CLIP_METRICS | {"kl"}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_reports_its_clip_ratio(backend):
    logits, labels, old, _, advantages = inputs(torch.float32, seed=1)
    text = graph(", objective: cispo, epsilon_high: 1.1", ref=False)
    got = metrics(text, backend, logits, labels, Rollout(advantages, old))
    want = expected(logits, labels, old, None, advantages, cispo=True, epsilon_high=1.1)
    assert 0 < want["cispo_clip_ratio"] < 1
    check(got, want, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_ratios_lie_on_both_bounds_and_clip_nothing(backend):
    """On-policy r = 1 exactly; with epsilon_low = epsilon_high = 0 it lies on both clip bounds, which TRL's
    strict comparisons do not count: every fraction 0, the ratio's mean, min and max 1, the approximate KL 0."""
    logits, labels, _, _, advantages = inputs(torch.float32, seed=2)
    text = graph(", epsilon_low: 0.0, epsilon_high: 0.0", old=False, ref=False)
    got = metrics(text, backend, logits, labels, Rollout(advantages))
    for name in CLIP_METRICS | {"approxkl"}:
        assert float(got[f"policy/{name}"]) == 0.0, name
    for name in ("mean", "min", "max"):
        assert float(got[f"policy/ratio/{name}"]) == 1.0, name
    check(got, expected(logits, labels, None, None, advantages, epsilon_low=0.0, epsilon_high=0.0), 2e-5)


def test_ratios_exactly_on_the_bounds_are_not_clipped():
    """Ratios equal to 1 - epsilon_low (A < 0) and 1 + epsilon_high (A > 0) in float32, where both backends
    compare them (from their `logprob` diagnostics): TRL's strict comparisons count neither; ratios past the
    bounds count. The metrics of rows given directly, as `LossKind.metrics` takes them."""
    logprob = torch.tensor([-0.5, 0.25, -0.6, 0.3, 0.0])
    ratio = logprob.exp()  # as policy_metrics takes it: exp(logprob - old), old = 0
    low, high = 1.0 - float(ratio[0]), float(ratio[1]) - 1.0  # 1 - low and 1 + high are ratio[0], ratio[1] exactly
    advantages = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0])
    mask = torch.tensor([True, True, True, True, False])  # the last row, far below the bound, is masked
    term = SimpleNamespace(
        constants=(("epsilon_low", low), ("epsilon_high", high), ("delta", 0.0), ("cispo", 0.0)),
        target=SimpleNamespace(rows=lambda batch, dtype: (advantages, torch.zeros(5), None)),
    )
    rows = SimpleNamespace(row_weight=lambda: mask.float())
    got = policy_metrics(term, {"entropy": torch.zeros(5), "logprob": logprob}, rows)
    want = clip_fractions(ratio[None], advantages[:, None].T, mask[None], low, high)
    assert float(got["clip_ratio/low_mean"]) == float(want["low"]) == 0.25
    assert float(got["clip_ratio/high_mean"]) == float(want["high"]) == 0.25
    assert float(got["clip_ratio/region_mean"]) == float(want["region"]) == 0.5
    assert float(got["masked_fraction"]) == pytest.approx(0.2)


def test_a_graph_without_a_policy_gradient_reports_no_rl_metrics():
    logits, labels, *_ = inputs(torch.float32)
    graph_ = lossgraph.compile(lossgraph.loads(graph(policy=False)), "torch")
    out = graph_({"next": logits}, labels=labels)
    assert set(out.metrics["next"]) == {"tokens", "accuracy"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_without_gradient_are_the_same(backend):
    """Under torch.no_grad the value-only kernels write the same row diagnostics."""
    logits, labels, old, ref, advantages = inputs(torch.float32)
    graph_ = lossgraph.compile(lossgraph.loads(graph()), backend)
    rollout = Rollout(advantages, old, ref)
    with torch.no_grad():
        quiet = graph_({"next": logits}, labels=labels, teachers={"rollouts": rollout}).metrics["next"]
    loud = metrics(graph(), backend, logits, labels, rollout)
    for name, value in loud.items():
        assert torch.equal(quiet[name], value), name


def test_all_masked_batch_reports_nan_extremes_and_zero_means():
    logits, labels, old, ref, advantages = inputs(torch.float32)
    labels = torch.full_like(labels, -100)
    got = metrics(graph(), "torch", logits, labels, Rollout(advantages, old, ref))
    assert float(got["policy/masked_fraction"]) == 1.0
    assert float(got["policy/entropy"]) == 0.0 and float(got["policy/ratio/mean"]) == 0.0
    assert math.isnan(float(got["policy/ratio/min"])) and math.isnan(float(got["policy/ratio/max"]))


def _vocab_parallel_worker(rank: int, world: int, port: int, backend: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, labels, old, ref, advantages = inputs(torch.float32)
        width = V // world
        graph_ = lossgraph.compile(lossgraph.loads(graph()), backend, vocab_parallel_group=dist.group.WORLD)
        x = logits[..., rank * width : (rank + 1) * width].clone().requires_grad_()
        out = graph_({"next": x}, labels=labels, teachers={"rollouts": Rollout(advantages, old, ref)})
        out.loss.backward()
        torch.save(dict(out.metrics["next"]), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py's workers: no interpreter teardown once the results are saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_metrics_equal_one_process(backend, tmp_path):
    """The entropy needs the whole row: the kernel takes it from the combined statistics of the ranks."""
    world = 2
    mp.spawn(_vocab_parallel_worker, args=(world, free_port(), backend, str(tmp_path)), nprocs=world)
    logits, labels, old, ref, advantages = inputs(torch.float32)
    whole = metrics(graph(), backend, logits, labels, Rollout(advantages, old, ref))
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in whole.items():
            assert_close(got[name].double(), value.double(), rtol=1e-5, atol=1e-6, what=f"rank {rank} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_row_diagnostics_no_rl_metrics_and_the_same_loss(backend):
    logits, labels, old, ref, advantages = inputs(torch.float32)
    rollout = Rollout(advantages, old, ref)
    graph_ = lossgraph.compile(lossgraph.loads(graph()), backend, row_diagnostics=False)
    x = logits.clone().requires_grad_()
    out = graph_({"next": x}, labels=labels, teachers={"rollouts": rollout})
    out.loss.backward()
    assert set(out.metrics["next"]) == {"tokens", "accuracy"}
    full = lossgraph.compile(lossgraph.loads(graph()), backend)
    y = logits.clone().requires_grad_()
    with_metrics = full({"next": y}, labels=labels, teachers={"rollouts": rollout})
    with_metrics.loss.backward()
    assert torch.equal(out.loss, with_metrics.loss) and torch.equal(x.grad, y.grad)


def test_the_kernel_keeps_the_moment_only_for_the_diagnostics():
    """policy_gradient's value needs no moment; its entropy diagnostic does: without row diagnostics the
    kernel is the one of a kind that declares none (no moment, values [N, terms + 1])."""
    (launch,) = check_text(graph(), "metrics.yaml").context.fusion.launches
    spec = launch.kernel_spec()
    quiet = replace(spec, row_diagnostics=False)
    assert spec.diagnostics == ((1, "entropy"), (1, "logprob")) and spec.value_columns == 5
    assert kernel_layout(spec).moment_slots and not kernel_layout(quiet).moment_slots
    assert quiet.diagnostics == () and quiet.value_columns == 3
    source, quiet_source = KernelGenerator(spec).source(), KernelGenerator(quiet).source()
    assert "loss_ptr + row * 5 + 4," in source and "loss_ptr + row * 5" not in quiet_source


@requires_fused
def test_a_head_split_into_launches_reports_the_same_metrics():
    """Five dense teachers split the head into two launches; the policy gradient's diagnostics land in the
    head's columns from whichever launch holds it."""
    teachers = [f"t{i}" for i in range(5)]
    text = graph().replace("losses:\n", "".join(f"  {t}: {{type: teacher}}\n" for t in teachers) + "losses:\n")
    text += "".join(f"  kd{t}: {{type: forward_kl, heads: [next], target: {t}, weight: 0.1}}\n" for t in teachers)
    assert len(check_text(text, "split.yaml").context.fusion.launches) == 2
    logits, labels, old, ref, advantages = inputs(torch.float32)
    generator = torch.Generator().manual_seed(5)
    given = {t: torch.randn(B, S, V, generator=generator) for t in teachers} | {
        "rollouts": Rollout(advantages, old, ref)
    }
    got = {}
    for backend in ("torch", "triton"):
        graph_ = lossgraph.compile(lossgraph.loads(text), backend)
        got[backend] = graph_({"next": logits.clone().requires_grad_()}, labels=labels, teachers=given).metrics["next"]
    assert {name for name in got["triton"] if name.startswith("policy/")} == {
        f"policy/{n}" for n in PG_METRICS | CLIP_METRICS | {"kl"}
    }
    for name, value in got["torch"].items():
        assert_close(got["triton"][name].double(), value.double(), rtol=2e-5, atol=2e-6, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hidden_input_head_in_chunks_reports_the_metrics_of_its_logits(backend):
    """A head declared `input: hidden`, evaluated 5 rows at a time: the chunks' diagnostics are joined."""
    logits, labels, old, ref, advantages = inputs(torch.float32)
    generator = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(B, S, 16, generator=generator), torch.randn(V, 16, generator=generator)
    rollout = Rollout(advantages, old, ref)
    text = graph().replace("next: {offset: 1}", "next: {offset: 1, input: hidden}")
    chunked = lossgraph.compile(lossgraph.loads(text), backend, chunk_size=5)
    got = chunked({"next": lossgraph.Linear(hidden, weight)}, labels=labels, teachers={"rollouts": rollout})
    whole = lossgraph.compile(lossgraph.loads(graph()), backend)
    want = whole({"next": hidden @ weight.T}, labels=labels, teachers={"rollouts": rollout})
    assert {name for name in got.metrics["next"] if name.startswith("policy/")} == {
        f"policy/{name}" for name in PG_METRICS | CLIP_METRICS | {"kl"}
    }
    for name, value in want.metrics["next"].items():
        assert_close(got.metrics["next"][name].double(), value.double(), rtol=2e-5, atol=2e-6, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_under_torch_compile_fullgraph(backend):
    """No host sync and no graph break: torch.compile(fullgraph=True) traces the metrics with the loss."""
    logits, labels, old, ref, advantages = inputs(torch.float32)
    graph_ = lossgraph.compile(lossgraph.loads(graph()), backend)

    def step(x):
        out = graph_({"next": x}, labels=labels, teachers={"rollouts": Rollout(advantages, old, ref)})
        return out.loss, out.metrics["next"]

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        _, got = compiled(logits.clone().requires_grad_())
    finally:
        torch._dynamo.reset()
    _, want = step(logits.clone().requires_grad_())
    assert set(got) == set(want)
    for name, value in want.items():
        assert_close(got[name].double(), value.double(), rtol=1e-6, atol=1e-7, what=name)
