"""jsd on the closed interval: with `normalize`, JSD_beta / (beta (1 - beta)) is forward KL at beta 0
and reverse KL at beta 1, and continuous in between; without it, the endpoints are refused."""

from __future__ import annotations

import math

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

VOCAB = 40
SOURCES = "labels: {type: labels}\nteacher: {type: teacher}\ncached: {type: topk_teacher, k: 5, tail: bucket}"


def jsd_graph(beta: float, *, normalize: bool = True, target: str = "teacher", temperature: float = 1.0) -> str:
    return graph_yaml(
        f"j: {{type: jsd, heads: [next], target: {target}, beta: {beta}, normalize: {str(normalize).lower()}, "
        f"temperature: {temperature}}}\n"
        "u: {type: cross_entropy, heads: [next], target: labels, weight: 0.0}\n"
        + ("k: {type: cross_entropy, heads: [next], target: cached, weight: 0.0}" if target != "cached" else "")
        + ("\nt: {type: cross_entropy, heads: [next], target: teacher, weight: 0.0}" if target != "teacher" else ""),
        vocab=VOCAB,
        sources=SOURCES,
    )


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def truth(beta: float, logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float):
    """The normalized JSD written here in float64 (the KLs at the endpoints), mean over counted rows."""
    log_q = torch.log_softmax(logits / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    if beta == 0.0:
        value = kl(log_p, log_q)
    elif beta == 1.0:
        value = kl(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        value = (beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)) / (beta * (1 - beta))
    return value[mask].mean()


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_reference_is_the_normalized_divergence_with_the_kls_at_the_ends(beta):
    spec = lossgraph.loads(jsd_graph(beta, temperature=1.5))
    inputs = make_inputs(spec, (12,), seed=1)
    out = lossgraph.compile(spec, backend="torch")(
        {"next": inputs.logits["next"]}, labels=inputs.labels, teachers=dict(inputs.teachers)
    )
    expected = truth(beta, inputs.logits["next"], inputs.teachers["teacher"], inputs.labels >= 0, 1.5)
    assert_close(out.values["j/next"], expected, rtol=1e-6, atol=1e-7, what=f"beta {beta}")


def test_the_value_is_continuous_at_both_ends():
    spec_of = {beta: lossgraph.loads(jsd_graph(beta)) for beta in (0.0, 1e-9, 1.0 - 1e-9, 1.0)}
    inputs = make_inputs(spec_of[0.0], (12,), seed=2, scale=1.0)

    def value(beta):
        graph = lossgraph.compile(spec_of[beta], backend="torch")
        return graph({"next": inputs.logits["next"]}, labels=inputs.labels, teachers=dict(inputs.teachers)).values[
            "j/next"
        ]

    assert_close(value(1e-9), value(0.0), rtol=1e-6, atol=1e-8, what="beta -> 0")
    assert_close(value(1.0 - 1e-9), value(1.0), rtol=1e-6, atol=1e-8, what="beta -> 1")


@pytest.mark.parametrize("beta", [0, 1])
def test_the_endpoints_need_normalize(beta):
    with pytest.raises(lossgraph.ConfigError, match=f"jsd at beta {beta} is 0 for every input; set normalize: true"):
        lossgraph.loads(jsd_graph(beta, normalize=False))


def test_beta_one_needs_a_target_with_mass_everywhere():
    text = jsd_graph(1.0, target="labels")
    with pytest.raises(lossgraph.ConfigError, match="holds hard labels"):
        lossgraph.loads(text)
    padded = graph_yaml(
        "j: {type: jsd, heads: [next], target: small, beta: 1, normalize: true}",
        vocab=VOCAB,
        sources="small: {type: teacher, vocab_size: 30, vocab_map: pad}",
    )
    with pytest.raises(lossgraph.ConfigError, match="jsd at beta 1 is reverse KL"):
        lossgraph.loads(padded)


def test_the_plan_keeps_the_jsd_name_and_the_endpoint_kernel_is_a_kl():
    graph = lossgraph.compile(lossgraph.loads(jsd_graph(0.0)), backend="torch")
    (launch,) = graph.fusion.launches
    assert launch.terms[0].kind == "jsd"
    assert launch.kernel_spec().terms[0].loss.name == "forward_kl"
    assert launch.passes == 2  # forward KL streams: no second read


@requires_fused
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("target", ["teacher", "cached"])
@pytest.mark.parametrize("dtype", LOW_PRECISION[:2], ids=["fp32", "bf16"])
def test_fused_matches_the_reference(beta, target, dtype):
    spec = lossgraph.loads(jsd_graph(beta, target=target))
    inputs = make_inputs(spec, (3, 4), seed=3)
    assert_pair_matches(run_pair(spec, inputs, dtype), what=f"jsd beta {beta} on {target}")
