"""Logit soft-capping (`softcap:` on a head, Gemma 2/3): every term sees c tanh(z / c) and the
gradient flows through the tanh, on both backends, against the math written here."""

from __future__ import annotations

import pytest
import torch
from fused_cases import (
    LOW_PRECISION,
    assert_pair_matches,
    graph_yaml,
    interpreter_warnings,
    make_inputs,
    requires_fused,
    run_pair,
)
from helpers import assert_close

import lossgraph

pytestmark = interpreter_warnings

VOCAB = 48
CAP = 5.0
SOURCES = (
    "labels: {type: labels}\nteacher: {type: teacher}\n"
    "bucket: {type: topk_teacher, k: 6, tail: bucket}\nrenorm: {type: topk_teacher, k: 6}"
)
EVERY_READ = (
    "lm: {type: cross_entropy, heads: [next], target: labels}\n"
    "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}\n"
    "js: {type: jsd, heads: [next], target: teacher, beta: 0.3, weight: 0.2}\n"
    "z: {type: z_loss, heads: [next], weight: 0.01}\n"
    "b: {type: reverse_kl, heads: [next], target: bucket, weight: 0.3}\n"
    "r: {type: tvd, heads: [next], target: renorm, weight: 0.3}"
)


def capped_graph(losses: str = EVERY_READ, *, cap: float = CAP, extra_heads: str = "", sources: str = SOURCES) -> str:
    return graph_yaml(losses, vocab=VOCAB, sources=sources, heads=f"next: {{offset: 1, softcap: {cap}}}" + extra_heads)


def test_the_losses_see_the_capped_logits_and_the_gradient_goes_through_the_tanh():
    text = capped_graph(
        "lm: {type: cross_entropy, heads: [next], target: labels}\n"
        "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}",
        sources="labels: {type: labels}\nteacher: {type: teacher}",
    )
    spec = lossgraph.loads(text)
    inputs = make_inputs(spec, (10,), seed=1, scale=8.0)  # logits well past the cap
    logits = inputs.logits["next"].clone().requires_grad_()
    out = lossgraph.compile(spec, backend="torch")(
        {"next": logits}, labels=inputs.labels, teachers=dict(inputs.teachers)
    )
    raw = inputs.logits["next"].clone().requires_grad_()
    capped = CAP * torch.tanh(raw / CAP)
    mask = inputs.labels >= 0
    cross_entropy = torch.nn.functional.cross_entropy(capped[mask], inputs.labels[mask])
    log_q = torch.log_softmax(capped / 2.0, -1)
    log_p = torch.log_softmax(inputs.teachers["teacher"] / 2.0, -1)  # the teacher is not capped
    forward_kl = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean()
    assert_close(out.values["lm/next"], cross_entropy, rtol=1e-6, atol=1e-7, what="capped cross-entropy")
    assert_close(out.values["kd/next"], forward_kl, rtol=1e-6, atol=1e-7, what="capped forward KL")
    (gradient,) = torch.autograd.grad(out.loss, logits)
    (expected,) = torch.autograd.grad(cross_entropy + 0.5 * forward_kl, raw)
    assert_close(gradient, expected, rtol=1e-6, atol=1e-9, what="gradient through the tanh")
    assert torch.equal(out.metrics["next"]["tokens"], mask.sum())


def test_a_cap_far_above_the_logits_changes_nothing():
    plain = lossgraph.loads(graph_yaml(EVERY_READ, vocab=VOCAB, sources=SOURCES))
    capped = lossgraph.loads(capped_graph(cap=1.0e4))
    inputs = make_inputs(plain, (8,), seed=2)
    outs = [
        lossgraph.compile(spec, backend="torch")(
            {"next": inputs.logits["next"]}, labels=inputs.labels, teachers=dict(inputs.teachers)
        )
        for spec in (plain, capped)
    ]
    for key in outs[0].values:
        assert_close(outs[1].values[key], outs[0].values[key], rtol=1e-6, atol=1e-8, what=key)


@pytest.mark.parametrize("cap", ["0", "-1.0", "20000.0"])
def test_the_cap_is_a_positive_number_in_range(cap):
    with pytest.raises(lossgraph.ConfigError, match="heads.next.softcap"):
        lossgraph.loads(capped_graph(cap=cap))


@requires_fused
@pytest.mark.parametrize("scale", [3.0, 40.0], ids=["moderate", "saturated"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp32", "bf16", "fp16"])
def test_fused_matches_the_reference_on_every_read_of_the_row(dtype, scale):
    """Capped tiles in every pass, the label's and the stored top-k logits, the sparse top-k gradient."""
    spec = lossgraph.loads(capped_graph())
    inputs = make_inputs(spec, (2, 5), seed=3, scale=scale)
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what=f"softcap {CAP}")
    assert torch.equal(pair.fused.out.metrics["next"]["accuracy"], pair.reference.out.metrics["next"]["accuracy"])


@requires_fused
def test_fused_split_head_caps_each_launch_once():
    """Five dense teachers split the head into two launches; the second adds to the first's gradient."""
    teachers = "\n".join(f"t{i}: {{type: teacher}}" for i in range(5))
    losses = "\n".join(f"k{i}: {{type: forward_kl, heads: [next], target: t{i}, weight: 0.2}}" for i in range(5))
    spec = lossgraph.loads(capped_graph(losses, sources=teachers))
    assert len(lossgraph.compile(spec, backend="torch").fusion.launches) == 2
    inputs = make_inputs(spec, (6,), seed=4, scale=6.0)
    assert_pair_matches(run_pair(spec, inputs, torch.float32), what="split head")
