"""Per-token term values (`out.per_token`) and per-position weights (a float `loss_mask`), on both
backends, against sums written here."""

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

VOCAB = 64
GRAPH = graph_yaml(
    "lm: {type: cross_entropy, heads: [next, mtp2], target: labels}\n"
    "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true, weight: 0.5}\n"
    "js: {type: jsd, heads: [next], target: teacher, beta: 0.3, weight: 0.2}\n"
    "top: {type: reverse_kl, heads: [next], target: cached, weight: 0.1}\n"
    "z: {type: z_loss, heads: [next], weight: 0.01}",
    vocab=VOCAB,
    sources="labels: {type: labels}\nteacher: {type: teacher}\ncached: {type: topk_teacher, k: 6, tail: bucket}",
    heads="next: {offset: 1}\nmtp2: {offset: 2}",
)


def weights_like(labels: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """Positive weights in [0.25, 2.25), with a few zeros."""
    generator = torch.Generator().manual_seed(seed)
    weights = 0.25 + 2.0 * torch.rand(labels.shape, generator=generator, dtype=torch.float64)
    weights.view(-1)[3] = 0.0
    return weights


def call(graph, inputs, **extra):
    return graph(
        {name: x.clone().requires_grad_() for name, x in inputs.logits.items()},
        labels=inputs.labels,
        teachers=dict(inputs.teachers),
        loss_mask=inputs.loss_mask,
        **extra,
    )


@pytest.mark.parametrize("weighted", [False, True], ids=["mask", "weights"])
def test_per_token_values_add_up_to_the_terms(weighted):
    spec = lossgraph.loads(GRAPH)
    inputs = make_inputs(spec, (3, 7), seed=1)
    if weighted:
        inputs.loss_mask = weights_like(inputs.labels)
    out = call(lossgraph.compile(spec, backend="torch"), inputs)
    for key, value in out.values.items():
        per_token = out.per_token[key]
        assert per_token.shape == (3, 7) and per_token.dtype == torch.float32 and not per_token.requires_grad
        offset = {"next": 1, "mtp2": 2}[key.split("/")[1]]
        # position s of a head of offset d takes label y[s + d - 1], and the loss_mask entry beside it
        weight = torch.zeros(3, 7, dtype=torch.float64)
        label = inputs.labels[:, offset - 1 :]
        weight[:, : 8 - offset] = (label != -100).double() * (inputs.loss_mask[:, offset - 1 :] if weighted else 1.0)
        assert torch.all(per_token[weight == 0] == 0), key
        expected = (per_token.double() * weight).sum() / weight.sum()
        assert_close(value, expected, rtol=1e-6, atol=1e-7, what=key)


@pytest.mark.parametrize("total", [None, 0.5], ids=["weights", "weights-summing-to-half"])
def test_weighted_cross_entropy_is_the_weighted_mean_of_the_token_losses(total):
    """Also when the weights add up to less than 1: the mean divides by their sum, whatever it is."""
    spec = lossgraph.loads(graph_yaml("lm: {type: cross_entropy, heads: [next], target: labels}", vocab=VOCAB))
    inputs = make_inputs(spec, (4, 5), seed=2)
    weights = weights_like(inputs.labels)
    if total is not None:
        weights = weights * (total / float((weights * (inputs.labels != -100)).sum()))
    inputs.loss_mask = weights
    logits = inputs.logits["next"].clone().requires_grad_()
    out = lossgraph.compile(spec, backend="torch")({"next": logits}, labels=inputs.labels, loss_mask=weights)
    by_hand = torch.nn.functional.cross_entropy(
        inputs.logits["next"].reshape(-1, VOCAB), inputs.labels.reshape(-1), reduction="none", ignore_index=-100
    )
    counted = (inputs.labels.reshape(-1) != -100).double() * weights.reshape(-1)
    assert_close(
        out.loss, (by_hand * counted).sum() / counted.sum(), rtol=1e-7, atol=1e-9, what="weighted mean"
    )  # the normalizer is float32
    assert_close(out.per_token["lm/next"].reshape(-1)[counted > 0], by_hand[counted > 0].float(), what="per token")


def test_num_items_overrides_the_weight_total():
    spec = lossgraph.loads(graph_yaml("lm: {type: cross_entropy, heads: [next], target: labels}", vocab=VOCAB))
    inputs = make_inputs(spec, (2, 6), seed=3)
    inputs.loss_mask = weights_like(inputs.labels)
    graph = lossgraph.compile(spec, backend="torch")
    own = call(graph, inputs)
    fixed = call(graph, inputs, num_items=10)
    total = ((inputs.labels != -100).double() * inputs.loss_mask).sum()
    assert_close(fixed.loss, own.loss * total / 10, rtol=1e-7, atol=1e-9, what="num_items")


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_weights_must_be_finite_and_not_negative(bad):
    spec = lossgraph.loads(graph_yaml("lm: {type: cross_entropy, heads: [next], target: labels}", vocab=VOCAB))
    inputs = make_inputs(spec, (2, 4), seed=4)
    inputs.loss_mask = torch.ones(2, 4, dtype=torch.float64)
    inputs.loss_mask[1, 2] = bad
    with pytest.raises(lossgraph.InputError, match="loss_mask holds per-position weights"):
        call(lossgraph.compile(spec, backend="torch"), inputs)


@requires_fused
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp32", "bf16", "fp16"])
def test_fused_weights_and_per_token_match_the_reference(dtype):
    spec = lossgraph.loads(GRAPH)
    inputs = make_inputs(spec, (2, 6), seed=6)
    inputs.loss_mask = weights_like(inputs.labels, seed=7)
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what="weighted")
    for key, expected in pair.reference.out.per_token.items():
        actual = pair.fused.out.per_token[key]
        assert actual.shape == expected.shape == (2, 6)
        assert_close(actual.cpu(), expected.float(), rtol=1e-4, atol=1e-5, what=f"per token {key}")
