"""A loss node's own positions (`positions: targets | all | {mask: NAME}`) and normalizer
(`normalizer: positions | targets`): float64 formulas on both backends, Fast-LLM's CE + z-loss composite,
the refusals, and defaults that change nothing (results, kernels, one launch per head)."""

from __future__ import annotations

import pytest
import torch
from fused_cases import DEVICE, interpreter_warnings, requires_fused
from helpers import assert_close, random_topk
from lossgraph.kernels import names
from lossgraph.kernels.codegen import KernelGenerator

import lossgraph
from lossgraph.errors import InputError, LossGraphError

pytestmark = interpreter_warnings

V = 24
B, S = 2, 5
IGNORE = -100

BACKENDS = ["torch", pytest.param("triton", marks=requires_fused)]


def graph_text(losses: str, *, normalization: str = "tokens", sources: str = "labels: {type: labels}") -> str:
    return f"""
version: 1
vocab_size: {V}
normalization: {normalization}
heads: {{next: {{}}}}
sources:
  {sources}
losses:
{losses}
"""


CE_Z = """
  ce: {type: cross_entropy, heads: [next], target: labels}
  z: {type: z_loss, heads: [next], weight: 0.25, positions: all}
"""


def compiled(text: str, backend: str, **options) -> lossgraph.CompiledGraph:
    return lossgraph.compile(lossgraph.loads(text), backend=backend, **options)


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, S), generator=generator)
    labels[0, 1] = IGNORE
    labels[1, 3:] = IGNORE
    return logits, labels


def run(graph, logits64: torch.Tensor, backend: str, **call):
    """(output, gradient) of the graph on the logits: float64 on the reference, float32 on the kernels."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    logits = logits64.to(DEVICE, dtype).detach().clone().requires_grad_()
    call = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
    out = graph({"next": logits}, **call)
    out.loss.backward()
    return out, logits.grad


def formula_grad(loss_of, logits64: torch.Tensor):
    """A float64 formula's value and its gradient by autograd."""
    logits = logits64.detach().clone().requires_grad_()
    loss = loss_of(logits)
    loss.backward()
    return loss.detach(), logits.grad


def check(out, grad, expected_loss, expected_grad, backend: str, what: str) -> None:
    dtype = torch.float64 if backend == "torch" else torch.float32
    assert_close(out.loss.detach().cpu(), expected_loss, dtype=dtype, what=f"{what}: loss")
    assert_close(grad.cpu(), expected_grad, dtype=dtype, what=f"{what}: gradient")


def ce_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at every position (0 where the label is ignore_index)."""
    flat = logits.reshape(-1, V)
    y = labels.reshape(-1)
    safe = torch.where(y == IGNORE, 0, y)
    values = torch.logsumexp(flat, -1) - flat.gather(1, safe[:, None]).squeeze(1)
    return torch.where(y == IGNORE, 0.0, values)


def z_rows(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.reshape(-1, V), -1) ** 2


def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    log_q = torch.log_softmax(logits.reshape(-1, V), -1)
    return -(log_q.exp() * log_q).sum(-1)


# --------------------------------------------------------------------------------------------------
# Formulas on both backends.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_on_targets_plus_z_loss_on_all_positions(backend):
    logits, labels = inputs()
    labelled = (labels != IGNORE).sum()

    def formula(z):
        return ce_rows(z, labels).sum() / labelled + 0.25 * z_rows(z).sum() / (B * S)

    out, grad = run(compiled(graph_text(CE_Z), backend), logits, backend, labels=labels)
    check(out, grad, *formula_grad(formula, logits), backend, "ce (targets) + z (all)")
    assert_close(out.values["z/next"].cpu(), z_rows(logits).mean(), dtype=grad.dtype, what="z value")
    # the per-position values: z at every position, CE only where there is a label
    assert_close(out.per_token["z/next"].cpu().reshape(-1), z_rows(logits), dtype=torch.float32, what="z per token")
    assert_close(out.per_token["ce/next"].cpu().reshape(-1), ce_rows(logits, labels), dtype=torch.float32, what="ce")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_masked_for_cross_entropy_takes_the_z_loss_gradient_only(backend):
    logits, labels = inputs(1)
    out, grad = run(compiled(graph_text(CE_Z), backend), logits, backend, labels=labels)
    z = logits.clone().requires_grad_()
    (0.25 * z_rows(z).sum() / (B * S)).backward()
    # position (0, 1) has no label: only the z-loss reaches it
    assert_close(grad[0, 1].cpu(), z.grad[0, 1], dtype=grad.dtype, what="unlabelled row")
    assert bool((grad[0, 1] != 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_masked_for_cross_entropy(backend):
    logits, labels = inputs(2)
    labels[:] = IGNORE
    out, grad = run(compiled(graph_text(CE_Z), backend), logits, backend, labels=labels)

    def formula(z):
        return 0.25 * z_rows(z).sum() / (B * S)

    check(out, grad, *formula_grad(formula, logits), backend, "no labels")
    assert float(out.values["ce/next"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_in_no_group_is_skipped(backend):
    """A named mask and the targets leave a position out of both: zero gradient there."""
    logits, labels = inputs(3)
    losses = """
  ce: {type: cross_entropy, heads: [next], target: labels}
  ent: {type: entropy, heads: [next], weight: 0.5, positions: {mask: answer}}
"""
    answer = torch.zeros(B, S, dtype=torch.bool)
    answer[0, 2:] = True
    answer[1, 0] = True
    labels[1, 4] = IGNORE  # already: and not in `answer` either
    out, grad = run(compiled(graph_text(losses), backend), logits, backend, labels=labels, masks={"answer": answer})
    labelled = (labels != IGNORE).sum()
    mask = answer.reshape(-1).to(torch.float64)

    def formula(z):
        return ce_rows(z, labels).sum() / labelled + 0.5 * (entropy_rows(z) * mask).sum() / mask.sum()

    check(out, grad, *formula_grad(formula, logits), backend, "named mask")
    assert bool((grad[1, 4] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_named_mask_weights_positions(backend):
    logits, labels = inputs(4)
    losses = """
  ce: {type: cross_entropy, heads: [next], target: labels}
  ent: {type: entropy, heads: [next], weight: 0.5, positions: {mask: w}}
"""
    weights = torch.rand(B, S, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights[0, 0] = 0.0
    out, grad = run(compiled(graph_text(losses), backend), logits, backend, labels=labels, masks={"w": weights.float()})
    labelled = (labels != IGNORE).sum()
    w = weights.float().double().reshape(-1)

    def formula(z):
        return ce_rows(z, labels).sum() / labelled + 0.5 * (entropy_rows(z) * w).sum() / w.sum()

    # the weights' total is a float32 sum, as for a float loss_mask
    loss, expected_grad = formula_grad(formula, logits)
    assert_close(out.loss.detach().cpu(), loss, dtype=torch.float32, what="float named mask: loss")
    assert_close(grad.cpu(), expected_grad, dtype=torch.float32, what="float named mask: gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_on_a_named_mask_keeps_its_labelled_positions(backend):
    logits, labels = inputs(6)
    losses = """
  ce: {type: cross_entropy, heads: [next], target: labels, positions: {mask: answer}}
  z: {type: z_loss, heads: [next], weight: 0.1}
"""
    answer = torch.zeros(B, S, dtype=torch.bool)
    answer[:, 1:4] = True  # (0, 1) and (1, 3) have no label
    out, grad = run(compiled(graph_text(losses), backend), logits, backend, labels=labels, masks={"answer": answer})
    labelled = labels != IGNORE
    both = (answer & labelled).reshape(-1).to(torch.float64)

    def formula(z):
        ce = (ce_rows(z, labels) * both).sum() / both.sum()
        return ce + 0.1 * (z_rows(z) * labelled.reshape(-1)).sum() / labelled.sum()

    check(out, grad, *formula_grad(formula, logits), backend, "ce on a named mask")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["tokens", "sum", "batch"])
@pytest.mark.parametrize("normalizer", ["positions", "targets"])
def test_each_normalizer_under_each_normalization(backend, normalization, normalizer):
    logits, labels = inputs(7)
    losses = f"""
  ce: {{type: cross_entropy, heads: [next], target: labels}}
  z: {{type: z_loss, heads: [next], weight: 0.25, positions: all, normalizer: {normalizer}}}
"""
    labelled = (labels != IGNORE).sum()
    ce_by = {"tokens": labelled, "sum": 1, "batch": B * S}[normalization]
    z_by = {"tokens": B * S if normalizer == "positions" else labelled, "sum": 1, "batch": B * S}[normalization]

    def formula(z):
        return ce_rows(z, labels).sum() / ce_by + 0.25 * z_rows(z).sum() / z_by

    graph = compiled(graph_text(losses, normalization=normalization), backend)
    out, grad = run(graph, logits, backend, labels=labels)
    check(out, grad, *formula_grad(formula, logits), backend, f"{normalization}, normalizer {normalizer}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_divides_the_terms_that_divide_by_the_target_count(backend):
    logits, labels = inputs(8)
    losses = """
  ce: {type: cross_entropy, heads: [next], target: labels}
  z: {type: z_loss, heads: [next], weight: 0.25, positions: all, normalizer: targets}
"""

    def formula(z):
        return ce_rows(z, labels).sum() / 13 + 0.25 * z_rows(z).sum() / 13

    out, grad = run(compiled(graph_text(losses), backend), logits, backend, labels=labels, num_items=13)
    check(out, grad, *formula_grad(formula, logits), backend, "num_items")


def test_num_items_is_refused_for_a_term_that_counts_its_own_positions():
    logits, labels = inputs()
    graph = compiled(graph_text(CE_Z), "torch")
    with pytest.raises(InputError, match=r"loss 'z' divides by the count of its own positions \(all\).*normalizer"):
        graph({"next": logits}, labels, num_items=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_logits_fold_the_normalizers(backend):
    """float16 gradients are written without 1/normalizer (group 0's): the other groups carry the ratio."""
    logits, labels = inputs(9)
    logits = logits.clamp(-4, 4)
    labelled = (labels != IGNORE).sum()

    def formula(z):
        return ce_rows(z, labels).sum() / labelled + 0.25 * z_rows(z).sum() / (B * S)

    expected_loss, expected_grad = formula_grad(formula, logits.half().double())
    graph = compiled(graph_text(CE_Z), backend)
    half = logits.half().to(DEVICE).requires_grad_()
    out = graph({"next": half}, labels.to(DEVICE))
    out.loss.backward()
    assert_close(out.loss.detach().cpu().double(), expected_loss, dtype=torch.float16, what="loss")
    assert_close(half.grad.cpu(), expected_grad, dtype=torch.float16, what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_distillation_on_targets_with_z_loss_on_all_positions(backend):
    """The sparse top-k gradient takes its own group's scale (the scatter applies none)."""
    logits, labels = inputs(10)
    topk = random_topk(B, S, vocab=V, k=4)
    losses = """
  kd: {type: forward_kl, heads: [next], target: cached}
  z: {type: z_loss, heads: [next], weight: 0.25, positions: all}
"""
    sources = "cached: {type: topk_teacher, k: 4, tail: bucket}"
    loss_mask = labels != IGNORE  # the targets: the distillation's positions
    reference = compiled(graph_text(losses, sources=sources), "torch")
    expected, expected_grad = run(reference, logits, "torch", loss_mask=loss_mask, teachers={"cached": topk})
    graph = compiled(graph_text(losses, sources=sources), backend)
    teachers = {"cached": lossgraph.TopK(topk.indices.to(DEVICE), topk.logprobs.to(DEVICE))}
    out, grad = run(graph, logits, backend, loss_mask=loss_mask, teachers=teachers)
    check(out, grad, expected.loss.detach(), expected_grad, backend, "top-k + z")
    # the z-loss part is the formula's
    assert_close(out.values["z/next"].cpu().double(), z_rows(logits).mean(), dtype=grad.dtype, what="z")


# --------------------------------------------------------------------------------------------------
# Fast-LLM's CE + z-loss composite.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_llm_cross_entropy_plus_z_loss(backend):
    """Fast-LLM (ServiceNow/Fast-LLM), written out from its source:

    - fast_llm/layers/language_model/loss/z_loss.py, `fused_z_loss_forward_backward`: with
      `logits_norm = logits * logits_scale_factor`, per_sample_loss = logsumexp(logits_norm)^2 (times the
      loss mask where one is given: none here), loss = per_sample_loss.mean() over every position
      (`logits.shape[:-1].numel()`), and grad = 2 * lse / sum_exp * exp_logits * grad_output / N *
      logits_scale_factor, the derivative through the scaled logits.
    - fast_llm/functional/cross_entropy.py, `torch_cross_entropy_forward_backward`: torch's
      cross_entropy on logits * logits_scale_factor, whose mean skips ignore_index (-100) targets, so it
      is the sum over the labelled positions over their count.
    The head's loss is ce + z_loss_weight * z: CE over the labelled positions / their count, z over all
    positions / N, which lossgraph writes as `positions: all` on the z-loss node.
    """
    logits, labels = inputs(11)
    scale, z_weight = 0.5, 1e-2  # logits_scale_factor, the z-loss weight

    def fast_llm(raw):
        scaled = (raw * scale).reshape(-1, V)
        ce = torch.nn.functional.cross_entropy(scaled, labels.reshape(-1), ignore_index=IGNORE)
        z = (torch.logsumexp(scaled, dim=-1) ** 2).mean()
        return ce + z_weight * z

    expected_loss, expected_grad = formula_grad(fast_llm, logits)
    losses = f"""
  ce: {{type: cross_entropy, heads: [next], target: labels}}
  z: {{type: z_loss, heads: [next], weight: {z_weight}, positions: all}}
"""
    graph = compiled(graph_text(losses), backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    raw = logits.to(DEVICE, dtype).detach().clone().requires_grad_()
    out = graph({"next": raw * scale}, labels.to(DEVICE))  # lossgraph takes the scaled logits
    out.loss.backward()
    check(out, raw.grad, expected_loss, expected_grad, backend, "Fast-LLM ce + z")


# --------------------------------------------------------------------------------------------------
# Chunked hidden-input heads, vocab parallel, data parallel.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_input_head_chunks_agree(backend):
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(B, S, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, 8, generator=generator, dtype=torch.float64) * 0.5
    _, labels = inputs(12)
    text = graph_text(CE_Z).replace("heads: {next: {}}", "heads: {next: {input: hidden}}")
    graph = compiled(text, backend, chunk_size=3)
    dtype = torch.float64 if backend == "torch" else torch.float32
    h = hidden.to(DEVICE, dtype).detach().clone().requires_grad_()
    out = graph({"next": lossgraph.Linear(h, weight.to(DEVICE, dtype))}, labels.to(DEVICE))
    out.loss.backward()
    labelled = (labels != IGNORE).sum()

    def formula(x):
        z = x @ weight.T
        return ce_rows(z, labels).sum() / labelled + 0.25 * z_rows(z).sum() / (B * S)

    check(out, h.grad, *formula_grad(formula, hidden), backend, "hidden input, chunks of 3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_and_normalize_across_agree(backend, world_of_one):
    logits, labels = inputs(13)
    losses = """
  ce: {type: cross_entropy, heads: [next], target: labels}
  z: {type: z_loss, heads: [next], weight: 0.25, positions: all}
  ent: {type: entropy, heads: [next], weight: 0.5, positions: {mask: answer}, normalizer: positions}
"""
    answer = torch.zeros(B, S, dtype=torch.bool)
    answer[1, :] = True
    labelled = (labels != IGNORE).sum()
    mask = answer.reshape(-1).double()

    def formula(z):
        ent = 0.5 * (entropy_rows(z) * mask).sum() / mask.sum()
        return ce_rows(z, labels).sum() / labelled + 0.25 * z_rows(z).sum() / (B * S) + ent

    expected = formula_grad(formula, logits)
    for options in ({"vocab_parallel_group": world_of_one}, {"normalize_across": world_of_one}):
        graph = compiled(graph_text(losses), backend, **options)
        out, grad = run(graph, logits, backend, labels=labels, masks={"answer": answer})
        check(out, grad, *expected, backend, f"{list(options)[0]}")


# --------------------------------------------------------------------------------------------------
# Defaults change nothing; one launch per head.
# --------------------------------------------------------------------------------------------------


DEFAULTS = """
  ce: {type: cross_entropy, heads: [next], target: labels}
  z: {type: z_loss, heads: [next], weight: 0.25}
"""
EXPLICIT = """
  ce: {type: cross_entropy, heads: [next], target: labels, positions: targets, normalizer: targets}
  z: {type: z_loss, heads: [next], weight: 0.25, positions: targets, normalizer: positions}
"""


def test_explicit_defaults_generate_the_same_kernels():
    plain = compiled(graph_text(DEFAULTS), "torch")
    explicit = compiled(graph_text(EXPLICIT), "torch")
    for a, b in zip(plain.fusion.launches, explicit.fusion.launches, strict=True):
        spec_a, spec_b = a.kernel_spec(), b.kernel_spec()
        assert spec_a == spec_b and not spec_a.grouped
        for phase in ("single", "stats", "apply"):
            assert KernelGenerator(spec_a, phase).source() == KernelGenerator(spec_b, phase).source()
    assert [head.groups for head in explicit.plan.heads] == [head.groups for head in plain.plan.heads]


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_defaults_give_the_same_numbers(backend):
    logits, labels = inputs(14)
    loss_mask = torch.ones(B, S)
    loss_mask[0, 3] = 0.5
    plain, grad = run(compiled(graph_text(DEFAULTS), backend), logits, backend, labels=labels, loss_mask=loss_mask)
    explicit, grad2 = run(compiled(graph_text(EXPLICIT), backend), logits, backend, labels=labels, loss_mask=loss_mask)
    assert torch.equal(plain.loss, explicit.loss) and torch.equal(grad, grad2)


def test_a_grouped_head_is_one_launch(monkeypatch):
    graph = compiled(graph_text(CE_Z), "torch")
    assert len(graph.fusion.for_head("next")) == 1
    (launch,) = graph.fusion.launches
    spec = launch.kernel_spec()
    assert spec.row_groups == 2 and spec.term_groups == (0, 1)
    assert f"{names.row_scale(1)} = tl.load(row_scale_ptr + row * 2 + 1)" in KernelGenerator(spec).source()


@requires_fused
def test_a_grouped_head_runs_one_fused_launch_per_call(monkeypatch):
    seen = []
    real = lossgraph.runtime.fused.launch

    def recording(spec, inputs, *, grad, numbers):
        seen.append(spec)
        return real(spec, inputs, grad=grad, numbers=numbers)

    monkeypatch.setattr(lossgraph.runtime.fused, "launch", recording)
    logits, labels = inputs(15)
    run(compiled(graph_text(CE_Z), "triton"), logits, "triton", labels=labels)
    assert len(seen) == 1 and seen[0].grouped


# --------------------------------------------------------------------------------------------------
# What is refused, and where it is said.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "losses",
    [
        "  ce: {type: cross_entropy, heads: [next], target: labels, positions: all}",
        "  ce: {type: cross_entropy, heads: [next], target: smooth, positions: all}",
    ],
)
def test_positions_all_on_a_loss_against_labels_is_refused_where_written(losses):
    sources = "labels: {type: labels}\n  smooth: {type: label_smoothing, source: labels, epsilon: 0.1}"
    with pytest.raises(LossGraphError) as error:
        lossgraph.loads(graph_text(losses, sources=sources))
    message = str(error.value)
    assert "positions: all takes every position" in message and "reads the labels" in message
    assert "losses.ce.positions" in message or ":12:" in message


def test_unknown_positions_keyword_is_refused():
    with pytest.raises(LossGraphError, match="positions"):
        lossgraph.loads(graph_text("  z: {type: z_loss, heads: [next], positions: everywhere}"))


def test_missing_unknown_and_misshaped_masks():
    losses = "  e: {type: entropy, heads: [next], positions: {mask: answer}}"
    graph = compiled(graph_text(losses, sources="{}").replace("sources:\n  {}", "sources: {}"), "torch")
    logits = torch.randn(B, S, V)
    with pytest.raises(InputError, match=r"missing mask 'answer'.*masks=\{'answer'"):
        graph({"next": logits})
    unknown = r"unknown mask 'answr'; did you mean 'answer'\?; no loss takes positions: \{mask: answr\}"
    with pytest.raises(InputError, match=unknown):
        graph({"next": logits}, masks={"answer": torch.ones(B, S, dtype=torch.bool), "answr": torch.ones(B, S)})
    with pytest.raises(InputError, match=r"masks\['answer'\] has shape \(2, 4\)"):
        graph({"next": logits}, masks={"answer": torch.ones(B, S - 1, dtype=torch.bool)})
    with pytest.raises(InputError, match=r"masks\['answer'\] holds per-position weights.*>= 0"):
        graph({"next": logits}, masks={"answer": -torch.ones(B, S)})


def test_trainer_refuses_what_it_cannot_count_or_pass():
    pytest.importorskip("transformers")
    from lossgraph.integrations.transformers import IntegrationError, _check_term_positions

    _check_term_positions(compiled(graph_text(DEFAULTS), "torch"))
    with pytest.raises(IntegrationError, match="loss 'z' takes positions: all divided by their own count"):
        _check_term_positions(compiled(graph_text(CE_Z), "torch"))
    targets = CE_Z.replace("positions: all}", "positions: all, normalizer: targets}")
    _check_term_positions(compiled(graph_text(targets), "torch"))
    masked = DEFAULTS + "  e: {type: entropy, heads: [next], positions: {mask: answer}, normalizer: targets}"
    with pytest.raises(IntegrationError, match=r"positions: \{mask: answer\}, a run-time mask"):
        _check_term_positions(compiled(graph_text(masked), "torch"))


def test_show_and_plan_name_a_terms_positions():
    from lossgraph.spec.describe import loss_summary

    spec = lossgraph.loads(graph_text(CE_Z))
    assert loss_summary(spec, "z").endswith("positions all, / own count")
    assert loss_summary(spec, "ce") == "cross_entropy <- labels, weight 1"
    (launch,) = compiled(graph_text(CE_Z), "torch").fusion.launches
    assert "positions: z/next takes all positions, divided by their own count (row scale 2 of 2)" in launch.notes
