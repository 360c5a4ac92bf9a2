"""A new loss kind is one module: the test-only kind in brier_kind.py, registered here, goes through
validation, the schema and the docs, planning, the reference backend and the fused kernels, without a
line of lossgraph knowing its name."""

from __future__ import annotations

import brier_kind
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
from lossgraph.compiler.fusion import plan_fusion
from lossgraph.kinds import loss_kind, register_loss_kind, unregister_loss_kind
from lossgraph.spec import docgen
from lossgraph.spec.models import json_schema

pytestmark = interpreter_warnings

VOCAB = 96
SOURCES = (
    "labels: {type: labels}\n"
    "teacher: {type: teacher}\n"
    "teacher2: {type: teacher}\n"
    "smooth: {type: label_smoothing, source: labels, epsilon: 0.1}\n"
    "mix: {type: mixture, sources: [teacher, smooth], weights: [0.6, 0.4]}\n"
    "renorm: {type: topk_teacher, k: 8}\n"
    "bucket: {type: topk_teacher, k: 8, tail: bucket}"
)
TARGETS = {
    "teacher-T2": "target: teacher, temperature: 2.0",
    "smooth": "target: smooth",
    "mixture": "target: mix, temperature: 0.5",
    "topk-renormalize": "target: renorm, temperature: 1.5",
    "topk-bucket": "target: bucket",
}


@pytest.fixture
def brier():
    """The kind registered for one test, and removed after it (the schema file stays the built-ins')."""
    register_loss_kind(brier_kind.KIND)
    yield brier_kind.KIND
    unregister_loss_kind("brier")


def document(target: str) -> str:
    """A graph with the Brier term against `target`, cross-entropy, and every other source read."""
    losses = (
        f"b: {{type: brier, heads: [next], {target}, weight: 0.5}}\n"
        "lm: {type: cross_entropy, heads: [next], target: labels}"
    )
    used = "\n".join(
        f"u_{name}: {{type: cross_entropy, heads: [next], target: {name}, weight: 0.0}}"
        for name in ("teacher2", "smooth", "mix", "renorm", "bucket", "teacher")
        if f"target: {name}" not in target
    )
    return graph_yaml(losses + "\n" + used, vocab=VOCAB, sources=SOURCES)


def test_unregistered_kind_is_an_unknown_type():
    with pytest.raises(lossgraph.ConfigError, match="brier"):
        lossgraph.loads(document(TARGETS["smooth"]))


def test_registered_kind_validates_and_plans_into_the_heads_one_kernel(brier):
    spec = lossgraph.loads(document(TARGETS["teacher-T2"]))
    assert type(spec.losses["b"]) is brier_kind.BrierLoss
    assert loss_kind("brier") is brier
    (launch,) = plan_fusion(lossgraph.compile(spec, backend="torch").plan).launches
    assert [term.key for term in launch.terms][:2] == ["b/next", "lm/next"]
    assert launch.passes == 3  # the Brier gradient needs its row sums from a second read
    assert any("b/next (brier) needs a row sum" in note for note in launch.notes), launch.notes


def test_registered_kind_gets_the_generic_target_rules(brier):
    with pytest.raises(lossgraph.ConfigError, match="brier compares two distributions, but 'labels' holds hard labels"):
        lossgraph.loads(document("target: labels"))


def test_registered_kind_is_in_the_schema_and_the_docs(brier):
    assert "BrierLoss" in json_schema()["$defs"]
    page = docgen.yaml_reference()
    assert "### `brier`" in page and "ℓ = Σ_j (q_j − p_j)²" in page and brier.example in page


def test_unregistering_restores_the_built_in_schema(brier):
    unregister_loss_kind("brier")
    try:
        assert "BrierLoss" not in json_schema()["$defs"]
    finally:
        register_loss_kind(brier_kind.KIND)


def brier_by_hand(logits: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor) -> torch.Tensor:
    """The float64 truth, written here: mean over unmasked positions of sum_j (q_j - p_j)^2."""
    q = torch.softmax(logits / temperature, dim=-1)
    p = torch.softmax(teacher / temperature, dim=-1)
    per_position = ((q - p) ** 2).sum(-1)
    return per_position[mask].sum() / mask.sum()


def test_reference_backend_matches_the_formula_and_its_gradient(brier):
    spec = lossgraph.loads(document(TARGETS["teacher-T2"]))
    inputs = make_inputs(spec, (6,), seed=3)
    logits = inputs.logits["next"].clone().requires_grad_(True)
    out = lossgraph.compile(spec, backend="torch")(
        {"next": logits}, labels=inputs.labels, teachers=dict(inputs.teachers)
    )
    truth_logits = inputs.logits["next"].clone().requires_grad_(True)
    mask = inputs.labels >= 0
    truth = brier_by_hand(truth_logits, inputs.teachers["teacher"], 2.0, mask)
    assert_close(out.values["b/next"], truth.detach(), rtol=1e-12, atol=1e-14, what="brier value")
    # the loss is 0.5 brier + cross-entropy (the other terms weigh 0)
    log_q = torch.log_softmax(truth_logits, dim=-1)
    cross_entropy = -log_q[mask].gather(1, inputs.labels[mask][:, None]).sum() / mask.sum()
    (gradient,) = torch.autograd.grad(out.loss, logits)
    (expected,) = torch.autograd.grad(0.5 * truth + cross_entropy, truth_logits)
    assert_close(gradient, expected, rtol=1e-10, atol=1e-14, what="brier gradient")


@requires_fused
@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("dtype", LOW_PRECISION[:2], ids=["fp32", "bf16"])
def test_fused_kernels_match_the_reference(brier, target, dtype):
    spec = lossgraph.loads(document(TARGETS[target]))
    inputs = make_inputs(spec, (2, 5), seed=7)
    assert_pair_matches(run_pair(spec, inputs, dtype), what=f"brier on {target}")
