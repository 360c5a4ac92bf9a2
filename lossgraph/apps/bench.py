"""`lossgraph bench`: forward+backward time and peak extra memory, side by side with the peers.

Every implementation computes the same loss from the same logits and teachers, and is timed in the
same process: lossgraph's fused backend (one kernel per head), its reference backend, the usual user
code in torch eager (float32 upcast, `F.cross_entropy` and `F.kl_div`), `torch.compile` of that code,
and Liger-Kernel's cross-entropy and KL-divergence when it is installed. Case f (reinforcement learning)
compares with TRL's GRPO loss code instead (`rl_loss`). The floor is the time a perfect implementation
would need to move its bytes (each logits and teacher row read once, each gradient row written once) at
the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compiler.fusion import DTYPE_BYTES, floor_bytes_per_token
from ..errors import LossGraphError
from ..kinds.sources.rollout import Rollout
from ..runtime.compiled import CompiledGraph, compile

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Term:
    """One loss term of a benchmark case, as plain data for the peers' user code."""

    kind: str  # cross_entropy | forward_kl | z_loss | policy_gradient | reverse_kl
    head: str
    teacher: str | None = None
    temperature: float = 1.0
    weight: float = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    heads: tuple[str, ...]
    teachers: tuple[str, ...]
    terms: tuple[Term, ...]
    tokens: int
    vocab: int

    def yaml(self) -> str:
        """The case as a loss graph."""
        heads = ", ".join(f"{name}: {{offset: {index + 1}}}" for index, name in enumerate(self.heads))
        sources = ["labels: {type: labels}", *[f"{t}: {{type: teacher}}" for t in self.teachers]]
        if any(term.kind == "policy_gradient" for term in self.terms):
            sources.append(f"{ROLLOUTS}: {{type: rollout, old_logprobs: true}}")
        losses = []
        for index, term in enumerate(self.terms):
            target = {"cross_entropy": "labels", "policy_gradient": ROLLOUTS}.get(term.kind, term.teacher)
            parts = [f"type: {term.kind}", f"heads: [{term.head}]", f"weight: {term.weight}"]
            if target:
                parts.append(f"target: {target}")
            if term.kind == "policy_gradient":
                parts += [f"epsilon_low: {RL_EPSILON_LOW}", f"epsilon_high: {RL_EPSILON_HIGH}"]
            if term.temperature != 1.0:
                parts.append(f"temperature: {term.temperature}")
            losses.append(f"  t{index}: {{{', '.join(parts)}}}")
        return "\n".join(
            [
                "version: 1",
                f"vocab_size: {self.vocab}",
                f"heads: {{{heads}}}",
                "sources:",
                *[f"  {source}" for source in sources],
                "losses:",
                *losses,
            ]
        )


def standard_cases(tokens: int | None = None, vocab: int | None = None, *, small: bool = False) -> list[Case]:
    """Cases (a)-(d) of the benchmark suite; `tokens`/`vocab` replace their sizes (for small runs).

    `small` gives the CPU sizes: 16 times fewer tokens and about 32 times smaller vocabs, so that the
    cases keep their proportions (case b: twice the tokens of case a and a quarter of its vocab).
    """

    def case(name, description, heads, teachers, terms, sizes):
        n, v = SMALL_SIZES[name] if small else sizes
        return Case(name, description, heads, teachers, tuple(terms), tokens or n, vocab or v)

    kd = Term("forward_kl", "next", "teacher", 1.0)
    return [
        case(
            "a",
            "CE + forward KL, one head, large vocab",
            ("next",),
            ("teacher",),
            [Term("cross_entropy", "next"), kd],
            (8192, 128256),
        ),
        case(
            "b",
            "CE + forward KL, one head, more tokens and a smaller vocab",
            ("next",),
            ("teacher",),
            [Term("cross_entropy", "next"), kd],
            (16384, 32000),
        ),
        case(
            "c",
            "MTP: CE on 3 heads; head 1 also forward KL (T=2) and z-loss",
            ("next", "mtp2", "mtp3"),
            ("teacher",),
            [
                Term("cross_entropy", "next"),
                Term("forward_kl", "next", "teacher", 2.0),
                Term("z_loss", "next", weight=1e-4),
                Term("cross_entropy", "mtp2"),
                Term("cross_entropy", "mtp3"),
            ],
            (8192, 128256),
        ),
        case(
            "d",
            "two teachers on one head: CE + forward KL from each",
            ("next",),
            ("teacher", "teacher2"),
            [Term("cross_entropy", "next"), kd, Term("forward_kl", "next", "teacher2", 1.0, 0.5)],
            (8192, 128256),
        ),
    ]


def rl_case(tokens: int | None = None, vocab: int | None = None, *, small: bool = False) -> Case:
    """Case (f), reinforcement learning on one head: cross-entropy on the sampled completions (an LM
    term; every row is a rollout, since `policy_gradient` takes all of a head's targets), GRPO's clipped
    policy gradient with DAPO's clip-higher and token-mean aggregation (TRL's default `loss_type`,
    `dapo`), and the exact reverse KL to a reference model's logits."""
    n, v = SMALL_SIZES["f"] if small else RL_SIZES
    terms = (
        Term("cross_entropy", "next", weight=RL_LM_WEIGHT),
        Term("policy_gradient", "next"),
        Term("reverse_kl", "next", "reference", weight=RL_BETA),
    )
    description = "RL: CE + GRPO (DAPO clip, token mean) + exact reverse KL to a reference, one head"
    return Case("f", description, ("next",), ("reference",), terms, tokens or n, vocab or v)


# (tokens, vocab) of each case on a CPU, where the harness is smoke-tested rather than measured.
SMALL_SIZES = {
    "a": (512, 4096),
    "b": (1024, 1024),
    "c": (512, 4096),
    "d": (512, 4096),
    "e": (512, 4096),
    "f": (512, 4096),
}
SMALL_HIDDEN = 64
# Case e at full size.
LINEAR_SIZES = (8192, 128256)
LINEAR_HIDDEN = 4096
# Tokens of a loss-graph file's case (its vocab is the graph's).
FILE_TOKENS, SMALL_FILE_TOKENS = 8192, 512
# Case f at full size, and its settings: TRL's names and DAPO's clip-higher.
RL_SIZES = (8192, 128256)
RL_EPSILON_LOW, RL_EPSILON_HIGH = 0.2, 0.28  # TRL's epsilon and epsilon_high
RL_BETA = 0.04  # TRL's beta: the weight of the KL to the reference model
RL_LM_WEIGHT = 0.1  # the cross-entropy term's weight
RL_SEQUENCES = 16  # completions in the batch, each a contiguous run of the one sequence of logits
RL_OLD_LOGPROB_NOISE = 0.1  # old log-probs = current ones + this x N(0, 1): ratios on both sides of the clip
RL_REFERENCE_NOISE = 0.3  # the reference's logits = the policy's + this x N(0, 1)
ROLLOUTS = "rollouts"  # the rollout source's name in case f's graph


# --------------------------------------------------------------------------------------------------
# The implementations.
# --------------------------------------------------------------------------------------------------

Inputs = dict[str, torch.Tensor]
LossFunction = Callable[[dict[str, torch.Tensor], torch.Tensor, Inputs], torch.Tensor]


def eager_loss(case: Case) -> LossFunction:
    """The usual user code: upcast to float32, one PyTorch call per term."""

    def loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, teachers: Inputs) -> torch.Tensor:
        total = 0.0
        for term in case.terms:
            z = logits[term.head].float().reshape(-1, case.vocab)
            if term.kind == "cross_entropy":
                total = total + term.weight * F.cross_entropy(z, _shift(labels, case.heads.index(term.head)))
            elif term.kind == "z_loss":
                total = total + term.weight * torch.logsumexp(z, -1).pow(2).mean()
            else:
                t = term.temperature
                log_q = torch.log_softmax(z / t, -1)
                log_p = torch.log_softmax(teachers[term.teacher].float().reshape(-1, case.vocab) / t, -1)
                total = total + term.weight * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        return total

    return loss


def liger_loss(case: Case) -> LossFunction | None:
    """Liger-Kernel's cross-entropy and KL-divergence (their documented use), or None without Liger."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    cross_entropy = LigerCrossEntropyLoss()
    kl_div = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, teachers: Inputs) -> torch.Tensor:
        total = 0.0
        for term in case.terms:
            z = logits[term.head].reshape(-1, case.vocab)
            if term.kind == "cross_entropy":
                total = total + term.weight * cross_entropy(z, _shift(labels, case.heads.index(term.head)))
            elif term.kind == "z_loss":
                total = total + term.weight * torch.logsumexp(z.float(), -1).pow(2).mean()
            else:
                t = term.temperature
                log_q = torch.log_softmax(z / t, -1)
                log_p = torch.log_softmax(teachers[term.teacher].reshape(-1, case.vocab) / t, -1)
                total = total + term.weight * kl_div(log_q, log_p)
        return total

    return loss


def graph_loss(graph: CompiledGraph, case: Case) -> LossFunction:
    def loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, teachers: Inputs) -> torch.Tensor:
        return graph(logits, labels=labels, teachers=teachers).loss

    return loss


def _shift(labels: torch.Tensor, head_index: int) -> torch.Tensor:
    """Flat labels [N] of the head at `head_index` (offset head_index + 1) from next-token labels [1, N]."""
    labels = labels.reshape(-1)
    if head_index == 0:
        return labels
    shifted = torch.full_like(labels, -100)
    shifted[:-head_index] = labels[head_index:]
    return shifted


@dataclass
class RLInputs:
    """Case f's tensors: the student's logits, the sampled tokens (labels), the reference model's logits,
    and per token what a GRPO step has (TRL's names in the comments)."""

    student: dict[str, torch.Tensor]  # {head: [1, N, V]} that requires grad
    labels: torch.Tensor  # [1, N] the sampled tokens (TRL's completion_ids)
    reference: torch.Tensor  # [1, N, V] the reference model's logits
    advantages: torch.Tensor  # [1, N] float32, one per sequence broadcast over its tokens
    old_logprobs: torch.Tensor  # [1, N] float32 (old_per_token_logps)
    ref_logprobs: torch.Tensor  # [1, N] float32, the reference's log-prob of each token (ref_per_token_logps)
    sequence_ids: torch.Tensor  # [1, N] int64, RL_SEQUENCES contiguous runs
    completion_mask: torch.Tensor  # [1, N] float32, every token a completion token

    def teachers(self) -> dict[str, object]:
        """lossgraph's `teachers=`: the reference logits and the rollout."""
        rollout = Rollout(self.advantages, old_logprobs=self.old_logprobs, sequence_ids=self.sequence_ids)
        return {"reference": self.reference, ROLLOUTS: rollout}


def _label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 log-probs [1, N] of the labels under `logits` [1, N, V] (no gradient)."""
    with torch.no_grad():
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]


def make_rl_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> RLInputs:
    """Deterministic inputs of case f: random logits and tokens as `make_inputs`; a reference model near
    the policy (its logits plus noise, as a policy a few steps from its initialization); advantages normal
    per sequence (GRPO's normalized group rewards); old log-probs near the current ones, so that some
    ratios fall outside the clip range."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(1, case.tokens, case.vocab, generator=generator) * 3
    reference = logits + torch.randn(1, case.tokens, case.vocab, generator=generator) * RL_REFERENCE_NOISE
    labels = torch.randint(0, case.vocab, (1, case.tokens), generator=generator).to(device)
    sequence_ids = torch.arange(case.tokens) * RL_SEQUENCES // case.tokens
    advantages = torch.randn(RL_SEQUENCES, generator=generator)[sequence_ids]
    noise = torch.randn(case.tokens, generator=generator) * RL_OLD_LOGPROB_NOISE
    (head,) = case.heads
    student = logits.to(device=device, dtype=dtype).requires_grad_()
    reference = reference.to(device=device, dtype=dtype)
    return RLInputs(
        student={head: student},
        labels=labels,
        reference=reference,
        advantages=advantages[None].to(device),
        old_logprobs=(_label_logprobs(student, labels) + noise.to(device)).clamp(max=0.0),
        ref_logprobs=_label_logprobs(reference, labels),
        sequence_ids=sequence_ids[None].to(device),
        completion_mask=torch.ones(1, case.tokens, device=device),
    )


def rl_loss(case: Case, *, exact_kl: bool) -> Callable[[RLInputs], torch.Tensor]:
    """TRL's GRPOTrainer loss (1.16, `_compute_loss`, loss_type `dapo`, token-level importance sampling)
    on float32 upcasts, plus the LM term: per-token log-probs by log_softmax over V and a gather, the
    clipped surrogate, beta times the KL, the sum over the completion tokens divided by their count.

    `exact_kl=False`: TRL's KL, k3 from the reference's log-prob of the sampled token, times the ratio
    (`use_bias_correction_kl`, TRL's default). `exact_kl=True`: the exact KL(policy || reference) over the
    vocab, a second log_softmax over V, as lossgraph's `reverse_kl` computes it. The cross-entropy reuses
    the log-probs (`nll_loss`), which spares the peer a third pass over the logits."""

    def loss(inputs: RLInputs) -> torch.Tensor:
        (logits,) = inputs.student.values()
        log_probs = torch.log_softmax(logits.float(), -1)
        per_token_logps = log_probs.gather(-1, inputs.labels[..., None])[..., 0]
        ratio = torch.exp(per_token_logps - inputs.old_logprobs)
        clipped = torch.clamp(ratio, 1 - RL_EPSILON_LOW, 1 + RL_EPSILON_HIGH)
        per_token_loss = -torch.min(ratio * inputs.advantages, clipped * inputs.advantages)
        if exact_kl:
            ref_log_probs = torch.log_softmax(inputs.reference.float(), -1)
            per_token_kl = (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1)
        else:
            log_ratio = inputs.ref_logprobs - per_token_logps
            per_token_kl = (torch.exp(log_ratio) - log_ratio - 1) * ratio
        per_token_loss = per_token_loss + RL_BETA * per_token_kl
        mask = inputs.completion_mask
        policy = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        lm = F.nll_loss(log_probs.reshape(-1, case.vocab), inputs.labels.reshape(-1))
        return policy + RL_LM_WEIGHT * lm

    return loss


def rl_graph_loss(graph: CompiledGraph) -> Callable[[RLInputs], torch.Tensor]:
    def loss(inputs: RLInputs) -> torch.Tensor:
        return graph(inputs.student, labels=inputs.labels, teachers=inputs.teachers()).loss

    return loss


# --------------------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    implementation: str
    median_ms: float | None = None
    min_ms: float | None = None
    peak_extra_bytes: int | None = None
    note: str = ""


@dataclass
class CaseResult:
    case: str
    description: str
    tokens: int
    vocab: int
    floor_bytes: int
    floor_ms: float
    measurements: list[Measurement] = field(default_factory=list)
    floor: str = "bytes / copy bandwidth"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), median of 10."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = []
    for _ in range(10):
        _synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(seconds)


def time_step(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) milliseconds of `step`, after `warmup` calls; CUDA events on a GPU."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), min(times)


def peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one step beyond what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def logits():  # one sequence of `tokens` positions, so MTP heads shift along it
        return (torch.randn(1, case.tokens, case.vocab, generator=generator) * 3).to(device=device, dtype=dtype)

    student = {head: logits().requires_grad_() for head in case.heads}
    teachers = {name: logits() for name in case.teachers}
    labels = torch.randint(0, case.vocab, (1, case.tokens), generator=generator).to(device)
    return student, labels, teachers


def _no_checkpoint(result: CaseResult) -> None:
    return None


def _measure_all(
    result: CaseResult,
    implementations: list[tuple[str, Callable[[], torch.Tensor] | None, str]],
    leaves: list[torch.Tensor],
    device: torch.device,
    repeats: int,
    warmup: int,
    progress: Callable[[str], None],
    checkpoint: Callable[[CaseResult], None] = _no_checkpoint,
) -> CaseResult:
    """Time forward+backward of each implementation (a function returning the loss), in the order
    given; `checkpoint(result)` after each one, so that a run stopped midway keeps what it measured."""
    for name, function, note in implementations:
        progress(f"case {result.case}: {name}")
        if function is None:
            result.measurements.append(Measurement(name, note=note))
            checkpoint(result)
            continue

        def step(function=function):
            function().backward()
            for leaf in leaves:
                leaf.grad = None

        try:
            median, fastest = time_step(step, device, repeats, warmup)
            result.measurements.append(Measurement(name, median, fastest, peak_memory(step, device), note))
        except Exception as error:  # a peer failing (out of memory, compile error) is reported, not fatal
            result.measurements.append(Measurement(name, note=f"failed: {type(error).__name__}: {error}"[:200]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        checkpoint(result)
    return result


def run_case(
    case: Case,
    *,
    dtype: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    bandwidth: float,
    progress: Callable[[str], None] = lambda _: None,
    checkpoint: Callable[[CaseResult], None] = _no_checkpoint,
) -> CaseResult:
    """One standard case. torch.compile goes last: its compilation takes the longest, so a run with a
    time limit loses the fewest columns."""
    graph_spec = compile_case_graph(case)
    floor = floor_bytes_per_token(graph_spec.plan, DTYPE_BYTES[dtype]) * case.tokens
    result = CaseResult(case.name, case.description, case.tokens, case.vocab, floor, floor / bandwidth * 1e3)
    student, labels, teachers = make_inputs(case, DTYPES[dtype], device)
    fused_ok = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    implementations: list[tuple[str, LossFunction | None, str]] = [
        (
            "lossgraph fused",
            graph_loss(compile_case_graph(case, "triton"), case) if fused_ok else None,
            "" if fused_ok else "needs CUDA + Triton",
        ),
        ("lossgraph reference", graph_loss(compile_case_graph(case, "torch"), case), ""),
        ("torch eager (fp32)", eager_loss(case), ""),
    ]
    liger = liger_loss(case) if device.type == "cuda" else None
    implementations.append(("Liger-Kernel CE + KL", liger, "" if liger else "no Liger (or no GPU)"))
    implementations.append(("torch.compile", torch.compile(eager_loss(case)), ""))
    calls = [
        (name, None if function is None else (lambda f=function: f(student, labels, teachers)), note)
        for name, function, note in implementations
    ]
    return _measure_all(result, calls, list(student.values()), device, repeats, warmup, progress, checkpoint)


def run_rl_case(
    case: Case,
    *,
    dtype: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    bandwidth: float,
    progress: Callable[[str], None] = lambda _: None,
    checkpoint: Callable[[CaseResult], None] = _no_checkpoint,
) -> CaseResult:
    """Case (f): lossgraph against TRL's GRPO loss code with its k3 KL estimate, and against the same code
    with the exact KL to the reference, each in torch eager and through torch.compile (last)."""
    graph_spec = compile_case_graph(case)
    floor = floor_bytes_per_token(graph_spec.plan, DTYPE_BYTES[dtype]) * case.tokens
    result = CaseResult(case.name, case.description, case.tokens, case.vocab, floor, floor / bandwidth * 1e3)
    inputs = make_rl_inputs(case, DTYPES[dtype], device)
    fused_ok = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    k3, exact = rl_loss(case, exact_kl=False), rl_loss(case, exact_kl=True)
    k3_note, exact_note = "TRL's loss, k3 KL estimate", "TRL's loss, exact KL (2nd log_softmax)"
    implementations = [
        (
            "lossgraph fused",
            rl_graph_loss(compile_case_graph(case, "triton")) if fused_ok else None,
            "" if fused_ok else "needs CUDA + Triton",
        ),
        ("lossgraph reference", rl_graph_loss(compile_case_graph(case, "torch")), ""),
        ("torch eager (fp32)", k3, k3_note),
        ("torch eager (fp32), exact KL", exact, exact_note),
        ("torch.compile", torch.compile(k3), k3_note),
        ("torch.compile, exact KL", torch.compile(exact), exact_note),
    ]
    calls = [
        (name, None if function is None else (lambda f=function: f(inputs)), note)
        for name, function, note in implementations
    ]
    return _measure_all(result, calls, list(inputs.student.values()), device, repeats, warmup, progress, checkpoint)


def run_graph_file(
    path: Path,
    *,
    tokens: int,
    dtype: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    bandwidth: float,
    progress: Callable[[str], None] = lambda _: None,
    checkpoint: Callable[[CaseResult], None] = _no_checkpoint,
) -> CaseResult:
    """A user's loss graph: lossgraph's fused and reference backends on random inputs of its shapes
    (the peers' user code exists only for the standard cases)."""
    from ..compiler.plan import TopKTarget
    from ..document import load
    from ..runtime.inputs import Linear, TopK

    spec = load(path)
    reference = compile(spec, backend="torch")
    plan = reference.plan
    if any(head.hidden_input for head in plan.heads):
        raise LossGraphError(f"{path}: heads with input: hidden are benchmarked by case e, not from a file")
    generator = torch.Generator().manual_seed(0)
    torch_dtype = DTYPES[dtype]

    def logits(vocab: int) -> torch.Tensor:
        return (torch.randn(1, tokens, vocab, generator=generator) * 3).to(device=device, dtype=torch_dtype)

    student = {head.name: logits(head.vocab_size).requires_grad_() for head in plan.heads if head.terms}
    labels = None
    if plan.labels is not None:
        labels = torch.randint(0, min(h.vocab_size for h in plan.heads), (1, tokens), generator=generator).to(device)
    teachers: dict[str, torch.Tensor | TopK | Linear] = {}
    for name, target in plan.teachers.items():
        if isinstance(target, TopKTarget):
            ids = torch.rand(1, tokens, target.vocab_size, generator=generator).topk(target.k, -1).indices
            logprobs = torch.log_softmax(torch.randn(1, tokens, target.k, generator=generator), -1) - 0.1
            teachers[name] = TopK(ids.to(device), logprobs.to(device))
        else:
            teachers[name] = logits(target.vocab_size)
    floor = floor_bytes_per_token(plan, DTYPE_BYTES[dtype]) * tokens
    result = CaseResult(
        path.name, f"graph {path}", tokens, max(h.vocab_size for h in plan.heads), floor, floor / bandwidth * 1e3
    )
    fused_ok = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    fused = compile(spec, backend="triton") if fused_ok else None

    def call(graph: CompiledGraph):
        return lambda: graph(student, labels=labels, teachers=teachers).loss

    implementations = [
        ("lossgraph fused", call(fused) if fused else None, "" if fused else "needs CUDA + Triton"),
        ("lossgraph reference", call(reference), ""),
    ]
    return _measure_all(result, implementations, list(student.values()), device, repeats, warmup, progress, checkpoint)


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a large matrix product in `dtype` on `device` (median of 10), on random data."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    median, _ = time_step(lambda: a @ b, device, repeats=10, warmup=2)
    return 2 * size**3 / (median / 1e3)


def run_linear_case(
    *,
    tokens: int,
    vocab: int,
    hidden: int,
    dtype: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    progress: Callable[[str], None] = lambda _: None,
    checkpoint: Callable[[CaseResult], None] = _no_checkpoint,
) -> CaseResult:
    """Case (e): CE + forward KL from hidden states and head weights (student and teacher), against
    the four matrix products any implementation does (student logits, its two gradients, teacher
    logits) at the matmul rate measured in the same run."""
    from ..document import loads
    from ..runtime.inputs import Linear

    torch_dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=torch_dtype)

    states, weight = tensor(tokens, hidden).requires_grad_(), tensor(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    teacher_states, teacher_weight = tensor(tokens, hidden), tensor(vocab, hidden, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    text = (
        f"version: 1\nvocab_size: {vocab}\nheads: {{next: {{input: hidden}}}}\n"
        "sources: {labels: {type: labels}, teacher: {type: teacher}}\n"
        "losses: {lm: {type: cross_entropy, heads: [next], target: labels},\n"
        "         kd: {type: forward_kl, heads: [next], target: teacher}}\n"
    )
    spec = loads(text, "case-e.yaml")
    matmuls = 4 * 2 * tokens * vocab * hidden
    rate = matmul_rate(torch_dtype, device)
    result = CaseResult(
        "e",
        f"fused-linear CE + forward KL from hidden states, H={hidden}",
        tokens,
        vocab,
        0,
        matmuls / rate * 1e3,
        floor="four matmuls / matmul rate",
    )

    def lossgraph_call(backend: str):
        graph = compile(spec, backend=backend)
        teacher = Linear(teacher_states, teacher_weight)
        return lambda: graph({"next": Linear(states, weight)}, labels=labels, teachers={"teacher": teacher}).loss

    def eager() -> torch.Tensor:
        logits = (states @ weight.T).float()
        with torch.no_grad():
            teacher_logits = (teacher_states @ teacher_weight.T).float()
        kd = F.kl_div(
            torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean"
        )
        return F.cross_entropy(logits, labels) + kd

    fused_ok = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    implementations = [
        ("lossgraph fused", lossgraph_call("triton") if fused_ok else None, "" if fused_ok else "needs CUDA + Triton"),
        ("lossgraph reference", lossgraph_call("torch"), "chunked"),
        ("torch eager (fp32)", eager, "materializes the logits"),
    ]
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.5)
        implementations.append(
            (
                "Liger fused-linear JSD",
                lambda: jsd(states, weight, teacher_states, teacher_weight, labels),
                "JSD, not KL",
            )
        )
    else:
        implementations.append(("Liger fused-linear JSD", None, "no Liger (or no GPU)"))
    implementations.append(("torch.compile", torch.compile(eager), ""))  # last: its compilation is the longest
    return _measure_all(result, implementations, [states, weight], device, repeats, warmup, progress, checkpoint)


def compile_case_graph(case: Case, backend: str = "torch") -> CompiledGraph:
    from ..document import loads

    return compile(loads(case.yaml(), f"case-{case.name}.yaml"), backend=backend)


def environment(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "device": str(device)}
    if importlib.util.find_spec("triton") is not None:
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
    else:
        import platform

        info["card"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def write_json(path: Path, info: dict, bandwidth: float, results: list[CaseResult]) -> None:
    payload = {"environment": info, "copy_bandwidth_bytes_per_second": bandwidth, "cases": [asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0 or math.isnan(value):
        return ""
    return f"{value / base:.2f}x"
