"""Per-class weights of cross-entropy (`class_weights: NAME`, the call's `class_weights={NAME: w}`).

The peer is torch's own `torch.nn.functional.cross_entropy(input, target, weight=w, ignore_index=-100,
label_smoothing=eps, reduction="mean")`, called on the same tensors. Its documentation
(https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html) gives, for class indices,

    l_n = -w_{y_n} log q_{n, y_n}                                       (eps = 0)
    l_n = -sum_c w_c ((1 - eps) [c = y_n] + eps / C) log q_{n, c}        (label smoothing)
    mean = sum_n l_n / sum_n w_{y_n}      (over the positions whose target is not ignore_index)

Liger's CE kernel with `ce_weight` (linkedin/Liger-Kernel, src/liger_kernel/ops/cross_entropy.py)
computes the same: its loss is divided by `sum_non_ignore_weight`, its smoothing part is
eps/V (W lse - sum_j w_j x_j), and its z-loss is not weighted and divided by the labelled count, as
a z_loss term on the same head is here. The float64 formulas below are written out in the tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_cases import DEVICE, FUSED_TOLERANCES, interpreter_warnings, requires_fused
from helpers import assert_close
from lossgraph.kernels.codegen import KernelGenerator

import lossgraph
from lossgraph.errors import ConfigError, InputError

pytestmark = interpreter_warnings

V = 24
B, S = 2, 5
IGNORE = -100
EPSILON = 0.1

BACKENDS = ["torch", pytest.param("triton", marks=requires_fused)]


def graph_text(losses: str, *, vocab: int = V, normalization: str = "tokens", heads: str = "{next: {}}") -> str:
    """A graph with the labels, and their label_smoothing `smooth` where a loss targets it."""
    smooth = f"  smooth: {{type: label_smoothing, source: labels, epsilon: {EPSILON}}}\n" if "smooth" in losses else ""
    return f"""
version: 1
vocab_size: {vocab}
normalization: {normalization}
heads: {heads}
sources:
  labels: {{type: labels}}
{smooth}losses:
{losses}
"""


def ce(target: str, extra: str = "") -> str:
    return f"  ce: {{type: cross_entropy, heads: [next], target: {target}, class_weights: w{extra}}}\n"


Z = "  z: {type: z_loss, heads: [next], weight: 0.25}\n"


def compiled(text: str, backend: str, **options) -> lossgraph.CompiledGraph:
    return lossgraph.compile(lossgraph.loads(text), backend=backend, **options)


def inputs(seed: int = 0, vocab: int = V):
    """Logits, labels (two ignored positions, one label of weight 0) and class weights (three 0)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, vocab, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (B, S), generator=generator)
    labels[0, 1] = IGNORE
    labels[1, 4] = IGNORE
    # multiples of 1/8: exact in float32, as their sums are (normalizers are float32 scalars, so a float64
    # reference is exact only where they are)
    weights = torch.randint(1, 17, (vocab,), generator=generator).double() / 8
    weights[[3, 5, vocab - 1]] = 0.0
    labels[1, 0] = 3  # a label of weight 0: only the smoothing part of its row counts
    return logits, labels, weights


def run(graph, logits64: torch.Tensor, backend: str, dtype: torch.dtype | None = None, **call):
    """(output, gradient) of the graph: float64 on the reference, float32 on the kernels by default."""
    dtype = dtype or (torch.float64 if backend == "torch" else torch.float32)
    logits = logits64.to(DEVICE, dtype).detach().clone().requires_grad_()
    call = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
    if "class_weights" in call:
        call["class_weights"] = {name: w.to(DEVICE) for name, w in call["class_weights"].items()}
    out = graph({"next": logits}, **call)
    out.loss.backward()
    return out, logits.grad


def formula_grad(loss_of, logits64: torch.Tensor):
    logits = logits64.detach().clone().requires_grad_()
    loss = loss_of(logits)
    loss.backward()
    return loss.detach(), logits.grad


def check(out, grad, expected_loss, expected_grad, dtype: torch.dtype, what: str) -> None:
    if dtype == torch.float64:
        assert_close(out.loss.detach().cpu(), expected_loss, dtype=dtype, what=f"{what}: loss")
        assert_close(grad.cpu(), expected_grad, dtype=dtype, what=f"{what}: gradient")
        return
    tolerance = FUSED_TOLERANCES[dtype]
    assert_close(
        out.loss.detach().cpu(),
        expected_loss,
        rtol=tolerance.value_rtol,
        atol=tolerance.value_atol,
        what=f"{what}: loss",
    )
    assert_close(
        grad.cpu(),
        expected_grad,
        rtol=tolerance.grad_rtol,
        atol=tolerance.grad_atol * float(expected_grad.abs().max()),
        what=f"{what}: gradient",
    )


def weighted_ce_rows(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, eps: float):
    """(value at every position, w_y at every position), float64, 0 where the label is ignored:
    (1 - eps) w_y (-log q_y) + (eps / V) sum_j w_j (-log q_j)."""
    vocab = weights.shape[0]
    log_q = torch.log_softmax(logits.reshape(-1, vocab), -1)
    y = labels.reshape(-1)
    keep = y != IGNORE
    safe = torch.where(keep, y, 0)
    w_y = weights[safe]
    value = (1 - eps) * w_y * -log_q.gather(1, safe[:, None]).squeeze(1) + (eps / vocab) * -(log_q * weights).sum(-1)
    return torch.where(keep, value, 0.0), torch.where(keep, w_y, 0.0)


def z_rows(logits: torch.Tensor, vocab: int = V) -> torch.Tensor:
    return torch.logsumexp(logits.reshape(-1, vocab), -1) ** 2


# --------------------------------------------------------------------------------------------------
# The peer (torch) and the float64 formula, on both backends.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target,eps", [("labels", 0.0), ("smooth", EPSILON)])
def test_torch_cross_entropy_with_weight_is_the_peer(backend, target, eps):
    logits, labels, weights = inputs()

    def peer(z):  # torch's own F.cross_entropy on the same tensors (see the module docstring)
        return F.cross_entropy(
            z.reshape(-1, V), labels.reshape(-1), weight=weights, ignore_index=IGNORE, label_smoothing=eps
        )

    dtype = torch.float64 if backend == "torch" else torch.float32
    out, grad = run(
        compiled(graph_text(ce(target)), backend), logits, backend, labels=labels, class_weights={"w": weights}
    )
    check(out, grad, *formula_grad(peer, logits), dtype, f"{target}: torch's F.cross_entropy(weight=w)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("target,eps", [("labels", 0.0), ("smooth", EPSILON)])
def test_formula_with_an_unweighted_z_loss_on_the_head(backend, dtype, target, eps):
    logits, labels, weights = inputs(1)
    logits = logits.to(dtype).double()  # the tensors the low-precision call sees
    labelled = (labels != IGNORE).sum()

    def formula(z):
        values, w_y = weighted_ce_rows(z, labels, weights, eps)
        z_loss = torch.where(labels.reshape(-1) != IGNORE, z_rows(z), 0.0)
        return values.sum() / w_y.sum() + 0.25 * z_loss.sum() / labelled

    graph = compiled(graph_text(ce(target) + Z), backend)
    out, grad = run(graph, logits, backend, dtype=dtype, labels=labels, class_weights={"w": weights})
    expected = formula_grad(formula, logits)
    check(out, grad, *expected, dtype, f"{target} + z")
    values, w_y = weighted_ce_rows(logits, labels, weights, eps)
    assert_close(out.values["ce/next"].cpu(), values.sum() / w_y.sum(), rtol=3e-5, atol=3e-6, what="ce value")
    # per position: the weighted value itself (the row of weight 0 holds only its smoothing part)
    assert_close(out.per_token["ce/next"].cpu().reshape(-1), values, rtol=3e-5, atol=3e-6, what="ce per token")


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_vocab(backend):
    vocab = 1271
    logits, labels, weights = inputs(2, vocab)

    def peer(z):
        ce = F.cross_entropy(
            z.reshape(-1, vocab), labels.reshape(-1), weight=weights, ignore_index=IGNORE, label_smoothing=EPSILON
        )
        return ce + 0.25 * z_rows(z, vocab)[labels.reshape(-1) != IGNORE].mean()

    graph = compiled(graph_text(ce("smooth") + Z, vocab=vocab), backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    out, grad = run(graph, logits, backend, labels=labels, class_weights={"w": weights})
    check(out, grad, *formula_grad(peer, logits), dtype, "V = 1271")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_loss_mask_weights_both_sums(backend):
    logits, labels, weights = inputs(3)
    loss_mask = torch.randint(1, 5, (B, S), generator=torch.Generator().manual_seed(3)).double() / 4
    loss_mask[1, 2] = 0.0
    m = loss_mask.reshape(-1)

    def formula(z):
        values, w_y = weighted_ce_rows(z, labels, weights, EPSILON)
        return (m * values).sum() / (m * w_y).sum()

    dtype = torch.float64 if backend == "torch" else torch.float32
    graph = compiled(graph_text(ce("smooth")), backend)
    out, grad = run(graph, logits, backend, labels=labels, loss_mask=loss_mask, class_weights={"w": weights})
    check(out, grad, *formula_grad(formula, logits), dtype, "float loss_mask")


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_targets_divides_by_the_target_count(backend):
    logits, labels, weights = inputs(4)
    labelled = (labels != IGNORE).sum()

    def formula(z):
        return weighted_ce_rows(z, labels, weights, EPSILON)[0].sum() / labelled

    text = graph_text(ce("smooth", ", normalizer: targets"))
    graph = compiled(text, backend)
    assert len(graph.plan.heads[0].groups) == 1  # the head's own group: no row scale of its own
    dtype = torch.float64 if backend == "torch" else torch.float32
    out, grad = run(graph, logits, backend, labels=labels, class_weights={"w": weights})
    check(out, grad, *formula_grad(formula, logits), dtype, "normalizer: targets")
    out, grad = run(graph, logits, backend, labels=labels, class_weights={"w": weights}, num_items=7)
    check(out, grad, *formula_grad(lambda z: formula(z) * labelled / 7, logits), dtype, "num_items")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["sum", "batch"])
def test_sum_and_batch_normalizations_are_unchanged(backend, normalization):
    logits, labels, weights = inputs(5)

    def formula(z):
        total = weighted_ce_rows(z, labels, weights, 0.0)[0].sum()
        return total if normalization == "sum" else total / (B * S)

    dtype = torch.float64 if backend == "torch" else torch.float32
    graph = compiled(graph_text(ce("labels"), normalization=normalization), backend)
    out, grad = run(graph, logits, backend, labels=labels, class_weights={"w": weights})
    check(out, grad, *formula_grad(formula, logits), dtype, normalization)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_heads_and_a_temperature(backend):
    """One vector on two heads (the second of offset 2), at T = 2, with another weighted CE on the labels."""
    logits, labels, weights = inputs(6)
    other = torch.randint(0, 9, (V,), generator=torch.Generator().manual_seed(6)).double() / 4
    losses = (
        "  ce: {type: cross_entropy, heads: [next, mtp2], target: smooth, class_weights: w, temperature: 2.0}\n"
        "  hard: {type: cross_entropy, heads: [next], target: labels, class_weights: u, weight: 0.5}\n"
    )
    graph = compiled(graph_text(losses, heads="{next: {}, mtp2: {offset: 2}}"), backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = logits.to(DEVICE, dtype).clone().requires_grad_()
    x2 = (logits.flip(-1) * 0.7).to(DEVICE, dtype).clone().requires_grad_()
    out = graph(
        {"next": x, "mtp2": x2},
        labels.to(DEVICE),
        class_weights={"w": weights.to(DEVICE), "u": other.to(DEVICE)},
    )
    out.loss.backward()
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]

    def formula(z, z2):
        v, w_y = weighted_ce_rows(z / 2, labels, weights, EPSILON)
        v2, w2_y = weighted_ce_rows(z2 / 2, shifted, weights, EPSILON)
        h, u_y = weighted_ce_rows(z, labels, other, 0.0)
        return v.sum() / w_y.sum() + v2.sum() / w2_y.sum() + 0.5 * h.sum() / u_y.sum()

    z = logits.clone().requires_grad_()
    z2 = (logits.flip(-1) * 0.7).clone().requires_grad_()
    expected = formula(z, z2)
    expected.backward()
    check(out, x.grad, expected.detach(), z.grad, dtype, "next")
    check(out, x2.grad, expected.detach(), z2.grad, dtype, "mtp2")


# --------------------------------------------------------------------------------------------------
# Hidden-input chunks, vocab parallel, normalize_across.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_input_head(backend):
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, S, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, 8, generator=generator, dtype=torch.float64) * 0.5
    _, labels, weights = inputs(7)
    text = graph_text(ce("smooth") + Z, heads="{next: {input: hidden}}")
    graph = compiled(text, backend, chunk_size=3)
    dtype = torch.float64 if backend == "torch" else torch.float32
    h = hidden.to(DEVICE, dtype).detach().clone().requires_grad_()
    out = graph(
        {"next": lossgraph.Linear(h, weight.to(DEVICE, dtype))},
        labels.to(DEVICE),
        class_weights={"w": weights.to(DEVICE)},
    )
    out.loss.backward()
    labelled = (labels != IGNORE).sum()

    def formula(x):
        z = x @ weight.T
        values, w_y = weighted_ce_rows(z, labels, weights, EPSILON)
        z_loss = torch.where(labels.reshape(-1) != IGNORE, z_rows(z), 0.0)
        return values.sum() / w_y.sum() + 0.25 * z_loss.sum() / labelled

    check(out, h.grad, *formula_grad(formula, hidden), dtype, "hidden input, chunks of 3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_and_normalize_across_agree(backend, world_of_one):
    logits, labels, weights = inputs(8)
    loss_mask = torch.ones(B, S, dtype=torch.float64)
    loss_mask[0, 0] = 0.5
    m = loss_mask.reshape(-1)

    text = graph_text(
        ce("smooth") + "  hard: {type: cross_entropy, heads: [next], target: labels, class_weights: w}\n" + Z
    )
    dtype = torch.float64 if backend == "torch" else torch.float32
    masked = torch.where(labels.reshape(-1) != IGNORE, m, 0.0)

    def expected_of(z):
        values, w_y = weighted_ce_rows(z, labels, weights, EPSILON)
        hard, u_y = weighted_ce_rows(z, labels, weights, 0.0)
        z_loss = z_rows(z)
        return (
            (m * values).sum() / (m * w_y).sum()
            + (m * hard).sum() / (m * u_y).sum()
            + 0.25 * (masked * z_loss).sum() / masked.sum()
        )

    expected = formula_grad(expected_of, logits)
    for options in ({"vocab_parallel_group": world_of_one}, {"normalize_across": world_of_one}):
        graph = compiled(text, backend, **options)
        out, grad = run(graph, logits, backend, labels=labels, loss_mask=loss_mask, class_weights={"w": weights})
        check(out, grad, *expected, dtype, f"{list(options)[0]}")


# --------------------------------------------------------------------------------------------------
# Validation, input checks, what the defaults keep.
# --------------------------------------------------------------------------------------------------


def test_only_the_labels_or_their_smoothing_take_class_weights():
    text = graph_text(ce("teacher")).replace(
        "sources:\n",
        "sources:\n  teacher: {type: teacher}\n"
        "  mix: {type: mixture, sources: [labels, teacher], weights: [0.5, 0.5]}\n",
    )
    text += "  m: {type: cross_entropy, heads: [next], target: mix, class_weights: w}\n"
    with pytest.raises(ConfigError) as error:
        lossgraph.loads(text)
    message = str(error.value)
    assert "losses.ce.class_weights: class_weights weigh the classes of the labels, but target 'teacher'" in message
    assert "losses.m.class_weights: class_weights weigh the classes of the labels, but target 'mix'" in message
    for target in ("labels", "smooth"):
        lossgraph.compile(lossgraph.loads(graph_text(ce(target))), backend="torch")


def test_input_checks():
    graph = compiled(graph_text(ce("labels")), "torch", check_inputs=True)
    logits, labels, weights = inputs(9)
    call = {"next": logits.float()}
    with pytest.raises(InputError, match=r"missing class_weights 'w'.*class_weights=\{'w': \[vocab_size\]"):
        graph(call, labels)
    with pytest.raises(InputError, match=r"unknown class_weights 'ww'; did you mean 'w'\?"):
        graph(call, labels, class_weights={"w": weights, "ww": weights})
    with pytest.raises(InputError, match=r"class_weights\['w'\] must be 1-D"):
        graph(call, labels, class_weights={"w": weights[None]})
    with pytest.raises(InputError, match=r"class_weights\['w'\] has 23 weights, but head 'next' has vocab 24"):
        graph(call, labels, class_weights={"w": weights[1:]})
    with pytest.raises(InputError, match=r"class_weights\['w'\] must be a floating tensor"):
        graph(call, labels, class_weights={"w": torch.ones(V, dtype=torch.int64)})
    for bad in (-weights, weights.clone().fill_(float("inf"))):
        with pytest.raises(InputError, match=r"each class weight must be finite and >= 0"):
            graph(call, labels, class_weights={"w": bad})
    with pytest.raises(InputError, match=r"the class weights sum to 0"):
        graph(call, labels, class_weights={"w": torch.zeros(V)})
    with pytest.raises(InputError, match=r"class_weights must be a dict"):
        graph(call, labels, class_weights=[weights])
    # value checks off: a vector summing to 0 passes (each row's value and gradient are then 0)
    unchecked = compiled(graph_text(ce("labels")), "torch", check_inputs=False)
    out = unchecked(call, labels, class_weights={"w": torch.zeros(V)})
    assert float(out.loss) == 0.0


def test_num_items_refuses_a_term_divided_by_its_labels_weights():
    graph = compiled(graph_text(ce("labels")), "torch")
    logits, labels, weights = inputs(10)
    with pytest.raises(InputError, match=r"loss 'ce' divides by the summed class weights \('w'\).*normalizer: targets"):
        graph({"next": logits}, labels, class_weights={"w": weights}, num_items=5)


def test_trainer_refuses_a_term_divided_by_its_labels_weights():
    pytest.importorskip("transformers")
    from lossgraph.integrations.transformers import IntegrationError, _check_term_positions

    with pytest.raises(IntegrationError, match=r"loss 'ce' has class_weights: w divided by its labels' summed"):
        _check_term_positions(compiled(graph_text(ce("labels")), "torch"))
    _check_term_positions(compiled(graph_text(ce("labels", ", normalizer: targets")), "torch"))
    _check_term_positions(compiled(graph_text(ce("labels"), normalization="sum"), "torch"))


def test_show_and_plan_name_the_class_weights():
    from lossgraph.spec.describe import loss_summary

    spec = lossgraph.loads(graph_text(ce("smooth")))
    assert "class weights w" in loss_summary(spec, "ce")
    graph = compiled(graph_text(ce("smooth")), "torch")
    (launch,) = graph.fusion.launches
    assert any("divided by the sum of their labels' class weights 'w'" in note for note in launch.notes)


def test_kernels_without_class_weights_are_unchanged():
    """No class weights: no class-weight argument or load; with them, one vector and its sum."""
    plain = compiled(graph_text("  ce: {type: cross_entropy, heads: [next], target: smooth}\n" + Z), "torch")
    weighted = compiled(graph_text(ce("smooth") + Z), "torch")
    for phase in ("single", "stats", "apply"):
        source = KernelGenerator(plain.fusion.launches[0].kernel_spec(), phase).source()
        assert "cw" not in source
        source = KernelGenerator(weighted.fusion.launches[0].kernel_spec(), phase).source()
        assert "cw0_ptr," in source and "cw1_ptr" not in source


@requires_fused
def test_torch_compile_fullgraph_matches_eager():
    """The fused op takes the class-weight vectors and their sums as one more list of tensors."""
    torch._dynamo.reset()
    try:
        graph = compiled(graph_text(ce("smooth") + Z), "triton")
        logits, labels, weights = inputs(11)
        x, y, w = logits.to(DEVICE, torch.float32), labels.to(DEVICE), weights.to(DEVICE, torch.float32)

        def step(z):
            return graph({"next": z}, y, class_weights={"w": w}).loss

        results = []
        for function in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
            z = x.clone().requires_grad_()
            loss = function(z)
            loss.backward()
            results.append((loss.detach(), z.grad))
        (loss, grad), (eager_loss, eager_grad) = results
        assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)
    finally:
        torch._dynamo.reset()
