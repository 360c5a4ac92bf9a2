"""The reference backend (`backend="torch"`) against independent formulas, PyTorch and hand-computed numbers.

Every check goes through the public API: a graph built with `lossgraph.loads`, compiled with
`lossgraph.compile(..., backend="torch")` and called like a training step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_labels, random_logits, random_topk
from kind_table import (
    LABEL_KINDS,
    TARGET_KINDS,
    TARGETLESS_KINDS,
    assert_covers_source_kinds,
    takes_temperature,
    target_value,
    truth,
    yaml_fields,
)

import lossgraph

N, V, K = 5, 7, 3
EPSILON = 0.2


def build(yaml_text: str) -> lossgraph.CompiledGraph:
    return lossgraph.compile(lossgraph.loads(yaml_text), backend="torch")


def graph_text(
    losses: str, sources: str = "", vocab: int = V, heads: str = "next: {offset: 1}", extra: str = ""
) -> str:
    indent = lambda block: "\n".join("  " + line for line in block.strip().splitlines())  # noqa: E731
    text = f"version: 1\nvocab_size: {vocab}\n{extra}heads:\n{indent(heads)}\n"
    if sources.strip():
        text += f"sources:\n{indent(sources)}\n"
    return text + f"losses:\n{indent(losses)}\n"


# --------------------------------------------------------------------------------------------------
# Every loss kind x every source kind: value against an independent float64 formula, and gradcheck.
# --------------------------------------------------------------------------------------------------

# source name -> (sources YAML, needs labels, needs teachers)
SOURCES = {
    "teacher": ("teacher: {type: teacher}", False, ("teacher",)),
    "cached_renorm": (f"cached_renorm: {{type: topk_teacher, k: {K}, tail: renormalize}}", False, ("cached_renorm",)),
    "cached_bucket": (f"cached_bucket: {{type: topk_teacher, k: {K}, tail: bucket}}", False, ("cached_bucket",)),
    "smooth": (
        f"labels: {{type: labels}}\nsmooth: {{type: label_smoothing, source: labels, epsilon: {EPSILON}}}",
        True,
        (),
    ),
    "ensemble": (
        "teacher: {type: teacher}\nteacher2: {type: teacher}\n"
        "ensemble: {type: mixture, sources: [teacher, teacher2], weights: [0.6, 0.4]}",
        False,
        ("teacher", "teacher2"),
    ),
    "blend": (
        "labels: {type: labels}\nteacher: {type: teacher}\n"
        "blend: {type: mixture, sources: [teacher, labels], weights: [0.7, 0.3]}",
        True,
        ("teacher",),
    ),
}


def test_the_sources_cover_every_source_kind():
    assert_covers_source_kinds((text for text, _, _ in SOURCES.values()), "SOURCES of tests/test_reference_math.py")


def make_data(seed: int = 0) -> dict:
    labels = random_labels(N, vocab=V, ignore_fraction=0.0, seed=seed + 1)
    labels[3] = -100  # one ignored position
    loss_mask = torch.ones(N, dtype=torch.bool)
    loss_mask[1] = False  # and one position masked by the caller
    return {
        "x": random_logits(N, V, dtype=torch.float64, seed=seed),
        "labels": labels,
        "loss_mask": loss_mask,
        "mask": (labels != -100) & loss_mask,
        "teacher": random_logits(N, V, dtype=torch.float64, seed=seed + 11, scale=2.0),
        "teacher2": random_logits(N, V, dtype=torch.float64, seed=seed + 12, scale=2.0),
        "cached_renorm": random_topk(N, vocab=V, k=K, seed=seed + 13, mass=0.85),
        "cached_bucket": random_topk(N, vocab=V, k=K, seed=seed + 14, mass=0.85),
    }


def expected_distributions(source: str, data: dict, x: torch.Tensor, temperature: float):
    """(p, q) per position in float64, written from the formulas of docs/concepts.md (not from lossgraph)."""
    q = torch.softmax(x / temperature, dim=-1)
    onehot = F.one_hot(data["labels"].clamp(min=0), V).double()
    if source == "teacher":
        return torch.softmax(data["teacher"] / temperature, -1), q
    if source == "ensemble":
        p = 0.6 * torch.softmax(data["teacher"] / temperature, -1) + 0.4 * torch.softmax(
            data["teacher2"] / temperature, -1
        )
        return p, q
    if source == "blend":
        return 0.7 * torch.softmax(data["teacher"] / temperature, -1) + 0.3 * onehot, q
    if source == "smooth":
        return (1 - EPSILON) * onehot + EPSILON / V, q
    topk = data[source]
    logprobs = topk.logprobs.double()
    if source == "cached_renorm":
        p = torch.softmax(logprobs / temperature, -1)
        return p, torch.softmax((x / temperature).gather(1, topk.indices), -1)
    p_top = logprobs.exp()
    q_top = q.gather(1, topk.indices)
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    return p, torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)


def expected_per_position(kind: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return target_value(kind, p.log(), q.log(), **truth(kind).fields)


def target_case(kind: str, source: str):
    sources, needs_labels, teachers = SOURCES[source]
    temperature = 1.0 if source == "cached_bucket" else 1.7
    losses = f"loss: {{type: {kind}, heads: [next], target: {source}, temperature: {temperature}{yaml_fields(kind)}}}"
    graph = build(graph_text(losses, sources))
    return graph, needs_labels, teachers, temperature


def call_kwargs(data: dict, needs_labels: bool, teachers) -> dict:
    kwargs = {"teachers": {name: data[name] for name in teachers}, "loss_mask": data["loss_mask"]}
    if needs_labels:
        kwargs["labels"] = data["labels"]
    return kwargs


def effective_mask(data: dict, needs_labels: bool) -> torch.Tensor:
    return data["mask"] if needs_labels else data["loss_mask"]


TARGET_CASES = [(kind, source) for kind in TARGET_KINDS for source in SOURCES]


@pytest.mark.parametrize(("kind", "source"), TARGET_CASES, ids=[f"{k}-{s}" for k, s in TARGET_CASES])
def test_target_loss_matches_independent_formula(kind, source):
    graph, needs_labels, teachers, temperature = target_case(kind, source)
    data = make_data()
    out = graph(logits={"next": data["x"]}, **call_kwargs(data, needs_labels, teachers))
    p, q = expected_distributions(source, data, data["x"], temperature)
    mask = effective_mask(data, needs_labels)
    expected = expected_per_position(kind, p, q)[mask].mean()
    assert out.loss.dtype == torch.float64
    assert_close(out.loss, expected, what=f"{kind} against {source}")
    assert_close(out.values["loss/next"], expected, what="values")


@pytest.mark.parametrize(("kind", "source"), TARGET_CASES, ids=[f"{k}-{s}" for k, s in TARGET_CASES])
def test_target_loss_gradcheck(kind, source):
    graph, needs_labels, teachers, temperature = target_case(kind, source)
    data = make_data(seed=3)
    if truth(kind).kinked:
        # not differentiable at p == q: take the first seed whose data has no near-tie
        for seed in range(3, 60):
            data = make_data(seed=seed)
            p, q = expected_distributions(source, data, data["x"], temperature)
            if float((p - q).abs()[effective_mask(data, needs_labels)].min()) > 1e-3:
                break
        else:
            raise AssertionError("no tie-free seed")
    kwargs = call_kwargs(data, needs_labels, teachers)
    x = data["x"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: graph(logits={"next": x}, **kwargs).loss, (x,), eps=1e-6, atol=1e-6)


# the kinds that take no distribution: those that take hard labels (against `labels`), those of the student alone
PLAIN_CASES = [(kind, "labels") for kind in LABEL_KINDS] + [(kind, None) for kind in TARGETLESS_KINDS]


@pytest.mark.parametrize(("kind", "target"), PLAIN_CASES, ids=[f"{k}-{t}" if t else k for k, t in PLAIN_CASES])
def test_loss_without_distribution_target_matches_formula_and_gradcheck(kind, target):
    temperature = 1.7 if takes_temperature(kind) else 1.0
    fields = (", target: labels" if target else "") + (
        f", temperature: {temperature}" if takes_temperature(kind) else ""
    )
    losses = f"loss: {{type: {kind}, heads: [next]{fields}{yaml_fields(kind)}}}"
    graph = build(graph_text(losses, "labels: {type: labels}" if target else ""))
    data = make_data(seed=5)
    kwargs = {"labels": data["labels"]} if target else {}
    x = data["x"]
    kind_truth = truth(kind)
    if target:
        log_p = F.one_hot(data["labels"].clamp(min=0), V).double().log()
        expected = target_value(kind, log_p, torch.log_softmax(x / temperature, -1), **kind_truth.fields)
    else:
        expected = kind_truth.value(x, temperature)
    out = graph(logits={"next": x}, loss_mask=data["loss_mask"], **kwargs)
    assert_close(out.loss, expected[effective_mask(data, bool(target))].mean(), what=f"{kind} against {target}")
    x = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: graph(logits={"next": x}, loss_mask=data["loss_mask"], **kwargs).loss, (x,), eps=1e-6, atol=1e-6
    )


def test_gradcheck_mtp_heads_with_documents_and_teacher():
    """Gradcheck through [B, S, V] logits on two heads, label shifting and document masking included."""
    graph = build(
        graph_text(
            """
lm: {type: cross_entropy, heads: [next, mtp2], target: labels, head_weights: [1.0, 0.5]}
kl: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}
""",
            "labels: {type: labels}\nteacher: {type: teacher}",
            heads="next: {offset: 1}\nmtp2: {offset: 2}",
        )
    )
    labels = random_labels(2, 4, vocab=V, seed=7)
    documents = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    teacher = random_logits(2, 4, V, dtype=torch.float64, seed=8)
    a = random_logits(2, 4, V, dtype=torch.float64, seed=9).requires_grad_(True)
    b = random_logits(2, 4, V, dtype=torch.float64, seed=10).requires_grad_(True)

    def loss(a, b):
        return graph(
            logits={"next": a, "mtp2": b}, labels=labels, teachers={"teacher": teacher}, document_ids=documents
        ).loss

    assert torch.autograd.gradcheck(loss, (a, b), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Agreement with PyTorch's own losses.
# --------------------------------------------------------------------------------------------------


def test_hard_cross_entropy_equals_torch_cross_entropy():
    graph = build(graph_text("lm: {type: cross_entropy, heads: [next], target: labels}", "labels: {type: labels}"))
    logits = random_logits(3, 6, V, dtype=torch.float64, seed=21)
    labels = random_labels(3, 6, vocab=V, ignore_fraction=0.3, seed=22)
    assert bool((labels == -100).any()) and bool((labels != -100).any())
    x = logits.clone().requires_grad_(True)
    out = graph(logits={"next": x}, labels=labels)
    out.loss.backward()
    y = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(y.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    expected.backward()
    assert_close(out.loss, expected.detach(), what="loss")
    assert_close(x.grad, y.grad, what="gradient")
    assert int(out.metrics["next"]["tokens"]) == int((labels != -100).sum())


def test_label_smoothing_equals_torch_cross_entropy_with_label_smoothing():
    eps = 0.1
    graph = build(
        graph_text(
            "lm: {type: cross_entropy, heads: [next], target: smooth}",
            f"labels: {{type: labels}}\nsmooth: {{type: label_smoothing, source: labels, epsilon: {eps}}}",
        )
    )
    logits = random_logits(4, 5, V, dtype=torch.float64, seed=23)
    labels = random_labels(4, 5, vocab=V, ignore_fraction=0.3, seed=24)
    x = logits.clone().requires_grad_(True)
    out = graph(logits={"next": x}, labels=labels)
    out.loss.backward()
    y = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(y.reshape(-1, V), labels.reshape(-1), ignore_index=-100, label_smoothing=eps)
    expected.backward()
    assert_close(out.loss, expected.detach(), what="loss")
    assert_close(x.grad, y.grad, what="gradient")


def test_forward_kl_at_temperature_two_equals_torch_kl_div_times_t_squared():
    graph = build(
        graph_text(
            "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}",
            "teacher: {type: teacher}",
        )
    )
    logits = random_logits(2, 5, V, dtype=torch.float64, seed=25)
    teacher = random_logits(2, 5, V, dtype=torch.float64, seed=26)
    loss_mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    x = logits.clone().requires_grad_(True)
    out = graph(logits={"next": x}, teachers={"teacher": teacher}, loss_mask=loss_mask)
    out.loss.backward()

    y = logits.clone().requires_grad_(True)
    log_q = torch.log_softmax(y / 2.0, -1)
    log_p = torch.log_softmax(teacher / 2.0, -1)
    per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    expected = 4.0 * per_token[loss_mask.bool()].mean()
    expected.backward()
    assert_close(out.loss, expected.detach(), what="loss")
    assert_close(out.values["kd/next"], expected.detach(), what="value (T^2-scaled)")
    assert_close(x.grad, y.grad, what="gradient")
    assert x.grad[~loss_mask.bool()].abs().max() == 0


# --------------------------------------------------------------------------------------------------
# Hand-computed numerical edge cases.
# --------------------------------------------------------------------------------------------------


def test_banned_tokens_with_minus_inf_logits():
    """-inf logits: finite loss when the label and the teacher avoid the token, exactly zero gradient there."""
    graph = build(
        graph_text(
            """
lm: {type: cross_entropy, heads: [next], target: labels}
kd: {type: forward_kl, heads: [next], target: teacher}
z: {type: z_loss, heads: [next], weight: 0.1}
ent: {type: entropy, heads: [next], weight: -0.1}
""",
            "labels: {type: labels}\nteacher: {type: teacher}",
            vocab=4,
        )
    )
    inf = math.inf
    x = torch.tensor([[1.0, 0.5, -inf, 2.0], [0.0, -inf, -inf, 1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, -inf, 0.0], [2.0, -inf, -inf, 0.0]])
    labels = torch.tensor([0, 3])
    out = graph(logits={"next": x}, labels=labels, teachers={"teacher": teacher})
    out.loss.backward()

    z0 = math.log(math.exp(1.0) + math.exp(0.5) + math.exp(2.0))
    z1 = math.log(1.0 + math.exp(1.0))
    ce = ((z0 - 1.0) + (z1 - 1.0)) / 2
    assert math.isfinite(float(out.loss.detach()))
    assert_close(out.values["lm/next"], torch.tensor(ce), dtype=torch.float32, what="cross_entropy")
    q0 = [math.exp(1.0 - z0), math.exp(0.5 - z0), math.exp(2.0 - z0)]
    p0 = [1 / (2 + math.e), math.e / (2 + math.e), 1 / (2 + math.e)]
    q1 = [math.exp(0.0 - z1), math.exp(1.0 - z1)]
    p1 = [math.exp(2.0) / (math.exp(2.0) + 1), 1 / (math.exp(2.0) + 1)]
    kl0 = sum(p * math.log(p / q) for p, q in zip(p0, q0, strict=True))
    kl1 = sum(p * math.log(p / q) for p, q in zip(p1, q1, strict=True))
    assert_close(out.values["kd/next"], torch.tensor((kl0 + kl1) / 2), dtype=torch.float32, what="forward_kl")
    entropy = (-sum(q * math.log(q) for q in q0) - sum(q * math.log(q) for q in q1)) / 2
    assert_close(out.values["ent/next"], torch.tensor(entropy), dtype=torch.float32, what="entropy")
    assert_close(out.values["z/next"], torch.tensor((z0**2 + z1**2) / 2), dtype=torch.float32, what="z_loss")
    assert bool(torch.isfinite(x.grad).all()), x.grad
    assert x.grad[0, 2] == 0 and x.grad[1, 1] == 0 and x.grad[1, 2] == 0
    assert all(math.isfinite(float(v)) for v in out.values.values())


def test_huge_logits_are_finite_and_exact():
    graph = build(
        graph_text(
            "lm: {type: cross_entropy, heads: [next], target: labels}\nz: {type: z_loss, heads: [next]}",
            "labels: {type: labels}",
            vocab=4,
        )
    )
    rows = [[1e4, -1e4, 5e3, 0.0], [-1e4, -1e4, 1e4, 9.99e3]]
    x = torch.tensor(rows, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([1, 3])
    out = graph(logits={"next": x}, labels=labels)
    out.loss.backward()
    # float64 formulas, by hand: logsumexp(row) = max + log(sum exp(row - max))
    lse0 = 1e4 + math.log1p(math.exp(-2e4) + math.exp(-5e3) + math.exp(-1e4))
    lse1 = 1e4 + math.log1p(math.exp(-10.0) + 2 * math.exp(-2e4))
    ce = ((lse0 - (-1e4)) + (lse1 - 9.99e3)) / 2
    assert math.isfinite(float(out.loss.detach()))
    assert_close(out.values["lm/next"], torch.tensor(ce), dtype=torch.float32, what="cross_entropy")
    assert_close(out.values["z/next"], torch.tensor((lse0**2 + lse1**2) / 2), dtype=torch.float32, what="z_loss")
    expected_grad = torch.softmax(torch.tensor(rows, dtype=torch.float64), -1)
    expected_grad = expected_grad * (
        1 + 2 * torch.tensor([lse0, lse1], dtype=torch.float64)[:, None]
    )  # + z-loss 2 lse q
    expected_grad[0, 1] -= 1
    expected_grad[1, 3] -= 1
    assert bool(torch.isfinite(x.grad).all())
    assert_close(x.grad, (expected_grad / 2).float(), rtol=1e-4, atol=1e-3, what="gradient")


def test_all_masked_head_gives_zero_loss_zero_gradient_and_no_nan():
    graph = build(
        graph_text(
            """
lm: {type: cross_entropy, heads: [next, mtp2], target: labels}
kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0}
tk: {type: reverse_kl, heads: [next], target: cached}
z: {type: z_loss, heads: [next], weight: 0.1}
ent: {type: entropy, heads: [next], weight: -0.1}
""",
            "labels: {type: labels}\nteacher: {type: teacher}\ncached: {type: topk_teacher, k: 2, tail: bucket}",
            heads="next: {offset: 1}\nmtp2: {offset: 2}",
            vocab=4,
        )
    )
    # every label ignored; the masked positions hold garbage that must not leak into the result
    labels = torch.full((1, 3), -100)
    x = torch.tensor([[[1e30, -math.inf, 0.0, 1.0], [math.nan, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 3.0]]])
    x = x.requires_grad_(True)
    y = random_logits(1, 3, 4, seed=3).requires_grad_(True)
    teacher = torch.tensor([[[math.nan] * 4, [0.0] * 4, [1.0, -math.inf, 0.0, 0.0]]])
    topk = lossgraph.TopK(torch.tensor([[[0, 0], [1, 7], [2, 3]]]), torch.tensor([[[5.0, math.nan]] * 3]))
    out = graph(logits={"next": x, "mtp2": y}, labels=labels, teachers={"teacher": teacher, "cached": topk})
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    for key in out.values:
        assert float(out.values[key]) == 0.0, key
        assert float(out.terms[key]) == 0.0, key
    for head in ("next", "mtp2"):
        metrics = out.metrics[head]
        assert int(metrics["tokens"]) == 0
        assert all(bool(torch.isfinite(value.float()).all()) for value in metrics.values()), metrics
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(y.grad, torch.zeros_like(y))


def test_vocab_map_truncate_hand_computed():
    graph = build(
        graph_text(
            "kd: {type: forward_kl, heads: [next], target: big}",
            "big: {type: teacher, vocab_size: 5, vocab_map: truncate}",
            vocab=3,
        )
    )
    x = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[math.log(1.0), math.log(2.0), math.log(1.0), 9.0, 9.0]], dtype=torch.float64)
    out = graph(logits={"next": x}, teachers={"big": teacher})
    out.loss.backward()
    # the teacher's extra tokens are dropped and the rest renormalized: p = [1/4, 2/4, 1/4]
    p = [0.25, 0.5, 0.25]
    total = 1 + math.e + math.e**2
    q = [1 / total, math.e / total, math.e**2 / total]
    expected = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
    assert_close(out.loss, torch.tensor(expected, dtype=torch.float64), what="truncate")
    assert_close(x.grad, torch.tensor([[q[0] - p[0], q[1] - p[1], q[2] - p[2]]], dtype=torch.float64))
    # agreement uses the truncated teacher: its argmax over the head's vocab is token 1, the student's is 2
    assert float(out.metrics["next"]["agreement/big"]) == 0.0


def test_vocab_map_pad_hand_computed():
    graph = build(
        graph_text(
            "kd: {type: forward_kl, heads: [next], target: small}\n"
            "ce: {type: cross_entropy, heads: [next], target: small}",
            "small: {type: teacher, vocab_size: 3, vocab_map: pad}",
            vocab=4,
        )
    )
    x = torch.tensor([[0.0, 0.0, math.log(2.0), math.log(4.0)]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[math.log(2.0), math.log(1.0), math.log(1.0)]], dtype=torch.float64)
    out = graph(logits={"next": x}, teachers={"small": teacher})
    out.loss.backward()
    # the head's extra token 3 gets zero teacher mass: p = [1/2, 1/4, 1/4, 0]; q = [1, 1, 2, 4] / 8
    p = [0.5, 0.25, 0.25, 0.0]
    q = [1 / 8, 1 / 8, 2 / 8, 4 / 8]
    kl_value = 0.5 * math.log(0.5 / (1 / 8)) + 0.25 * math.log(0.25 / (1 / 8)) + 0.25 * math.log(0.25 / (2 / 8))
    ce_value = -(0.5 * math.log(1 / 8) + 0.25 * math.log(1 / 8) + 0.25 * math.log(2 / 8))
    assert_close(out.values["kd/next"], torch.tensor(kl_value, dtype=torch.float64), what="forward_kl pad")
    assert_close(out.values["ce/next"], torch.tensor(ce_value, dtype=torch.float64), what="cross_entropy pad")
    expected_grad = 2 * torch.tensor([[q[j] - p[j] for j in range(4)]], dtype=torch.float64)
    assert_close(x.grad, expected_grad, what="gradient")


def test_topk_bucket_hand_computed():
    graph = build(
        graph_text(
            "kd: {type: forward_kl, heads: [next], target: cached}",
            "cached: {type: topk_teacher, k: 2, tail: bucket}",
            vocab=4,
        )
    )
    x = torch.tensor([[0.0, 0.0, math.log(2.0), math.log(4.0)]], dtype=torch.float64)
    topk = lossgraph.TopK(torch.tensor([[3, 0]]), torch.tensor([[math.log(0.5), math.log(0.3)]], dtype=torch.float64))
    out = graph(logits={"next": x}, teachers={"cached": topk})
    # buckets: token 3, token 0, the rest. p = [0.5, 0.3, 0.2]; q = [4/8, 1/8, 3/8]
    expected = 0.5 * math.log(0.5 / 0.5) + 0.3 * math.log(0.3 / (1 / 8)) + 0.2 * math.log(0.2 / (3 / 8))
    assert_close(out.loss, torch.tensor(expected, dtype=torch.float64), what="bucket")


def test_topk_bucket_covering_the_whole_vocab_equals_dense_kl():
    vocab = 5
    graph = build(
        graph_text(
            "kd: {type: forward_kl, heads: [next], target: cached}",
            f"cached: {{type: topk_teacher, k: {vocab}, tail: bucket}}",
            vocab=vocab,
        )
    )
    teacher = random_logits(8, vocab, seed=41)
    log_p = torch.log_softmax(teacher, -1)
    indices = log_p.argsort(-1, descending=True)
    x = random_logits(8, vocab, seed=42)
    out = graph(logits={"next": x}, teachers={"cached": lossgraph.TopK(indices, log_p.gather(1, indices))})
    expected = (log_p.exp() * (log_p - torch.log_softmax(x, -1))).sum(-1).mean()
    assert_close(out.loss, expected, what="bucket with k == V")


def test_topk_renormalize_hand_computed():
    graph = build(
        graph_text(
            "kd: {type: forward_kl, heads: [next], target: cached, temperature: 2.0}",
            "cached: {type: topk_teacher, k: 2, tail: renormalize}",
            vocab=4,
        )
    )
    x = torch.tensor([[0.0, 0.0, math.log(4.0), math.log(16.0)]], dtype=torch.float64)
    topk = lossgraph.TopK(torch.tensor([[3, 2]]), torch.tensor([[math.log(0.36), math.log(0.04)]], dtype=torch.float64))
    out = graph(logits={"next": x}, teachers={"cached": topk})
    # at T = 2: p over {3, 2} ~ [0.6, 0.2] -> [0.75, 0.25]; q ~ [4, 2] -> [2/3, 1/3]
    expected = 0.75 * math.log(0.75 / (2 / 3)) + 0.25 * math.log(0.25 / (1 / 3))
    assert_close(out.loss, torch.tensor(expected, dtype=torch.float64), what="renormalize")


# --------------------------------------------------------------------------------------------------
# Low-precision logits.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_logits_computed_in_float32(dtype):
    graph = build(
        graph_text(
            """
lm: {type: cross_entropy, heads: [next], target: labels}
kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}
z: {type: z_loss, heads: [next], weight: 0.01}
""",
            "labels: {type: labels}\nteacher: {type: teacher}",
            vocab=64,
        )
    )
    logits = random_logits(4, 8, 64, dtype=dtype, seed=31)
    teacher = random_logits(4, 8, 64, dtype=dtype, seed=32)
    labels = random_labels(4, 8, vocab=64, seed=33)
    low = logits.clone().requires_grad_(True)
    out = graph(logits={"next": low}, labels=labels, teachers={"teacher": teacher})
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert low.grad.dtype == dtype

    high = logits.float().requires_grad_(True)
    reference = graph(logits={"next": high}, labels=labels, teachers={"teacher": teacher.float()})
    reference.loss.backward()
    # the same (rounded) inputs computed in float32: float32 agreement for the loss
    assert_close(out.loss, reference.loss.detach(), dtype=torch.float32, what="loss")
    for key in reference.values:
        assert_close(out.values[key], reference.values[key], dtype=torch.float32, what=key)
    # the gradient is the float32 gradient rounded to the logits dtype
    assert_close(low.grad, high.grad.to(dtype), what="gradient")
    assert_close(low.grad.float(), high.grad, dtype=dtype, what="gradient vs float32")
