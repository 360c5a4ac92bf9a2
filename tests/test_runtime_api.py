"""The Python API of a compiled graph with the reference backend: outputs, weights, schedules, teachers, metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import assert_close, random_labels, random_logits, random_topk

import lossgraph
from lossgraph.compiler.plan import DenseTarget, TopKTarget
from lossgraph.kinds.sources.rollout import RolloutTarget

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def build(yaml_text: str, **options) -> lossgraph.CompiledGraph:
    return lossgraph.compile(lossgraph.loads(yaml_text), backend="torch", **options)


def single_loss_graph(loss: str, sources: str = "labels: {type: labels}", vocab: int = 5) -> lossgraph.CompiledGraph:
    return build(
        f"""
version: 1
vocab_size: {vocab}
heads: {{next: {{offset: 1}}}}
sources: {{{sources}}}
losses:
  {loss}
"""
    )


# --------------------------------------------------------------------------------------------------
# compile and GraphOutput.
# --------------------------------------------------------------------------------------------------

TWO_HEADS = """
version: 1
vocab_size: 6
heads:
  next: {offset: 1}
  mtp2: {offset: 2}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
losses:
  lm: {type: cross_entropy, heads: [next, mtp2], target: labels, head_weights: [1.0, 0.5], weight: 0.8}
  kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true, weight: 0.3}
  z: {type: z_loss, heads: [next], weight: 0.01}
"""


def two_head_inputs(seed: int = 0) -> dict:
    return {
        "logits": {
            "next": random_logits(2, 5, 6, dtype=torch.float64, seed=seed).requires_grad_(True),
            "mtp2": random_logits(2, 5, 6, dtype=torch.float64, seed=seed + 1).requires_grad_(True),
        },
        "labels": random_labels(2, 5, vocab=6, seed=seed + 2),
        "teachers": {"teacher": random_logits(2, 5, 6, dtype=torch.float64, seed=seed + 3)},
    }


def test_compile_from_spec_and_from_path(tmp_path):
    graph = build(TWO_HEADS)
    assert isinstance(graph, lossgraph.CompiledGraph)
    assert isinstance(graph, torch.nn.Module)
    assert graph.backend == "torch"
    assert [h.name for h in graph.plan.heads] == ["next", "mtp2"]
    assert [t.key for t in graph.plan.terms] == ["lm/next", "kd/next", "z/next", "lm/mtp2"]
    assert "next: 3 terms" in repr(graph)
    path = tmp_path / "graph.yaml"
    path.write_text(TWO_HEADS)
    from_path = lossgraph.compile(path, backend="torch")
    from_str = lossgraph.compile(str(path), backend="torch")
    inputs = two_head_inputs()
    expected = graph(**inputs).loss
    assert_close(from_path(**inputs).loss, expected)
    assert_close(from_str(**inputs).loss, expected)


def test_graph_output_fields_and_total():
    graph = build(TWO_HEADS)
    inputs = two_head_inputs()
    out = graph(**inputs)
    assert isinstance(out, lossgraph.GraphOutput)
    keys = ["lm/next", "kd/next", "z/next", "lm/mtp2"]
    assert list(out.terms) == keys and list(out.values) == keys and list(out.weights) == keys
    assert out.weights == {"lm/next": 0.8, "kd/next": 0.3, "z/next": 0.01, "lm/mtp2": 0.8 * 0.5}
    assert all(isinstance(w, float) for w in out.weights.values())
    for key in keys:
        assert not out.terms[key].requires_grad and not out.values[key].requires_grad
        assert out.terms[key].dim() == 0
        assert_close(out.terms[key], out.values[key] * out.weights[key], what=key)
    assert out.loss.requires_grad and out.loss.dim() == 0
    assert_close(out.loss.detach(), sum(out.terms.values()), what="loss = sum of terms")
    # the kd value is the T^2-scaled KL at T = 2 (by PyTorch)
    log_q = torch.log_softmax(inputs["logits"]["next"].detach() / 2, -1)
    log_p = torch.log_softmax(inputs["teachers"]["teacher"] / 2, -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    mask = inputs["labels"] != -100
    assert_close(out.values["kd/next"], 4 * kl[mask].mean(), what="kd")
    assert set(out.metrics) == {"next", "mtp2"}
    assert set(out.metrics["next"]) == {"tokens", "accuracy", "agreement/teacher"}
    assert set(out.metrics["mtp2"]) == {"tokens", "accuracy"}


def test_by_head_and_by_node_sums():
    out = build(TWO_HEADS)(**two_head_inputs())
    by_head = out.by_head()
    by_node = out.by_node()
    assert set(by_head) == {"next", "mtp2"}
    assert set(by_node) == {"lm", "kd", "z"}
    assert_close(by_head["next"], out.terms["lm/next"] + out.terms["kd/next"] + out.terms["z/next"])
    assert_close(by_head["mtp2"], out.terms["lm/mtp2"])
    assert_close(by_node["lm"], out.terms["lm/next"] + out.terms["lm/mtp2"])
    assert_close(by_node["kd"], out.terms["kd/next"])
    assert_close(by_node["z"], out.terms["z/next"])
    assert_close(sum(by_head.values()), out.loss.detach())
    assert_close(sum(by_node.values()), out.loss.detach())


def test_head_weights_scale_term_and_gradient():
    graph = build(TWO_HEADS)
    inputs = two_head_inputs()
    out = graph(**inputs)
    out.loss.backward()
    # the mtp2 head's only term is lm with weight 0.8 x head weight 0.5: its gradient is 0.4 x d(value)
    logits = inputs["logits"]["mtp2"].detach()
    labels = torch.full_like(inputs["labels"], -100)
    labels[:, :-1] = inputs["labels"][:, 1:]
    mtp2 = logits.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(mtp2.reshape(-1, 6), labels.reshape(-1), ignore_index=-100)
    (0.4 * ce).backward()
    assert_close(out.values["lm/mtp2"], ce.detach())
    assert_close(out.terms["lm/mtp2"], 0.4 * ce.detach())
    assert_close(inputs["logits"]["mtp2"].grad, mtp2.grad)


# --------------------------------------------------------------------------------------------------
# Weights: zero, schedules, temperature schedules.
# --------------------------------------------------------------------------------------------------


def test_weight_zero_term_is_reported_but_takes_no_gradient():
    graph = single_loss_graph(
        "lm: {type: cross_entropy, heads: [next], target: labels}\n  z: {type: z_loss, heads: [next], weight: 0}"
    )
    logits = random_logits(4, 5, dtype=torch.float64, seed=3) + 100.0  # a large z-loss: logsumexp ~ 100
    labels = torch.tensor([0, 1, 2, 3])
    x = logits.clone().requires_grad_(True)
    out = graph(logits={"next": x}, labels=labels)
    out.loss.backward()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    assert float(z) > 1e4
    assert_close(out.values["z/next"], z, what="reported value")
    assert float(out.terms["z/next"]) == 0.0
    assert out.weights["z/next"] == 0.0
    y = logits.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(y, labels)
    ce.backward()
    assert_close(out.loss.detach(), ce.detach(), what="loss is the lm term alone")
    assert_close(x.grad, y.grad, what="gradient is the lm gradient alone")


def test_weight_zero_term_with_infinite_value_reports_zero():
    graph = single_loss_graph(
        "lm: {type: cross_entropy, heads: [next], target: labels, weight: 0}\n  z: {type: z_loss, heads: [next]}"
    )
    x = torch.tensor([[-math.inf, 0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    out = graph(logits={"next": x}, labels=torch.tensor([0]))  # the label is banned: lm = inf
    assert math.isinf(float(out.values["lm/next"]))
    assert math.isfinite(float(out.loss.detach()))
    assert float(out.terms["lm/next"]) == 0.0
    assert math.isfinite(float(out.by_head()["next"]))


SCHEDULES = {
    "linear-warmup": (
        "{schedule: linear, start: 0.0, end: 1.0, steps: 100, warmup: 10}",
        {0: 0.0, 10: 0.0, 35: 0.25, 60: 0.5, 110: 1.0, 5000: 1.0},
    ),
    "cosine": (
        "{schedule: cosine, start: 1.0, end: 0.0, steps: 100}",
        {0: 1.0, 25: (1 + math.cos(math.pi / 4)) / 2, 50: 0.5, 75: (1 - math.cos(math.pi / 4)) / 2, 100: 0.0, 300: 0.0},
    ),
    "cosine-warmup": (
        "{schedule: cosine, start: 0.0, end: 2.0, steps: 200, warmup: 500}",
        {0: 0.0, 500: 0.0, 600: 1.0, 700: 2.0},
    ),
    "step-warmup": (
        "{schedule: step, start: 0.2, end: 1.0, steps: 100, warmup: 50}",
        {0: 0.2, 149: 0.2, 150: 1.0, 151: 1.0},
    ),
    "constant": ("{schedule: constant, start: 0.3}", {0: 0.3, 10**6: 0.3}),
    "number": ("0.7", {0: 0.7, 12345: 0.7}),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_weight_schedules(name):
    schedule, expected = SCHEDULES[name]
    graph = single_loss_graph(
        f"lm: {{type: cross_entropy, heads: [next], target: labels, head_weights: [0.5], weight: {schedule}}}\n"
        "  z: {type: z_loss, heads: [next], weight: 0.01}"  # keeps the loss differentiable at weight 0
    )
    logits = random_logits(3, 5, dtype=torch.float64, seed=4)
    labels = torch.tensor([1, 4, 0])
    unit = torch.nn.functional.cross_entropy(logits, labels)
    for step, weight in expected.items():
        x = logits.clone().requires_grad_(True)
        out = graph(logits={"next": x}, labels=labels, step=step)
        assert out.weights["lm/next"] == pytest.approx(0.5 * weight, abs=1e-12), step
        assert out.weights["z/next"] == 0.01
        assert_close(out.values["lm/next"], unit, what=f"value at step {step}")
        assert_close(out.terms["lm/next"], 0.5 * weight * unit, what=f"term at step {step}")
        out.loss.backward()
        y = logits.clone().requires_grad_(True)
        ce = torch.nn.functional.cross_entropy(y, labels)
        (0.5 * weight * ce + 0.01 * (torch.logsumexp(y, -1) ** 2).mean()).backward()
        assert_close(x.grad, y.grad, what=f"gradient at step {step}")


def test_all_weights_zero_at_this_step_still_backpropagates():
    graph = single_loss_graph(
        "lm: {type: cross_entropy, heads: [next], target: labels, "
        "weight: {schedule: linear, start: 0.0, end: 1.0, steps: 100, warmup: 10}}"
    )
    x = random_logits(3, 5, seed=4).requires_grad_(True)
    out = graph(logits={"next": x}, labels=torch.tensor([1, 4, 0]), step=0)
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_temperature_schedule_with_scaling():
    graph = single_loss_graph(
        "kd: {type: forward_kl, heads: [next], target: teacher, temperature_scaling: true, "
        "temperature: {schedule: linear, start: 1.0, end: 3.0, steps: 100}}",
        "teacher: {type: teacher}",
    )
    logits = random_logits(4, 5, dtype=torch.float64, seed=5)
    teacher = random_logits(4, 5, dtype=torch.float64, seed=6)
    for step, temperature in {0: 1.0, 50: 2.0, 100: 3.0, 400: 3.0}.items():
        out = graph(logits={"next": logits}, teachers={"teacher": teacher}, step=step)
        log_q = torch.log_softmax(logits / temperature, -1)
        log_p = torch.log_softmax(teacher / temperature, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        assert_close(out.values["kd/next"], temperature**2 * kl, what=f"step {step}")
        assert out.weights["kd/next"] == 1.0


# --------------------------------------------------------------------------------------------------
# Teachers: tensors, TopK, callables.
# --------------------------------------------------------------------------------------------------

SHARED_TEACHER = """
version: 1
vocab_size: 6
heads:
  next: {offset: 1}
  alt: {offset: 1}
sources:
  teacher: {type: teacher}
  cached: {type: topk_teacher, k: 3, tail: bucket}
losses:
  kd: {type: forward_kl, heads: [next, alt], target: teacher}
  js: {type: jsd, heads: [next], target: teacher, beta: 0.3}
  tk: {type: reverse_kl, heads: [alt, next], target: cached}
"""


def test_teacher_callables_are_called_once_per_call():
    graph = build(SHARED_TEACHER)
    logits = {"next": random_logits(2, 3, 6, seed=1), "alt": random_logits(2, 3, 6, seed=2)}
    teacher = random_logits(2, 3, 6, seed=3)
    topk = random_topk(2, 3, vocab=6, k=3, seed=4)
    calls = {"teacher": 0, "cached": 0}
    grad_enabled = []

    def dense():
        calls["teacher"] += 1
        grad_enabled.append(torch.is_grad_enabled())
        return teacher

    def cached():
        calls["cached"] += 1
        grad_enabled.append(torch.is_grad_enabled())
        return topk

    out = graph(logits=logits, teachers={"teacher": dense, "cached": cached})
    assert calls == {"teacher": 1, "cached": 1}
    assert grad_enabled == [False, False]  # called under no_grad
    direct = graph(logits=logits, teachers={"teacher": teacher, "cached": topk})
    for key in direct.values:
        assert_close(out.values[key], direct.values[key], what=key)
    graph(logits=logits, teachers={"teacher": dense, "cached": cached})
    assert calls == {"teacher": 2, "cached": 2}


def test_frozen_teacher_model_as_callable_gets_no_gradient():
    graph = build(SHARED_TEACHER)
    model = torch.nn.Linear(4, 6)
    features = torch.randn(2, 3, 4)
    x = random_logits(2, 3, 6, seed=1).requires_grad_(True)
    out = graph(
        logits={"next": x, "alt": random_logits(2, 3, 6, seed=2)},
        teachers={"teacher": lambda: model(features), "cached": random_topk(2, 3, vocab=6, k=3)},
    )
    out.loss.backward()
    assert model.weight.grad is None
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_dense_teacher_tensor_gets_no_gradient():
    graph = single_loss_graph("kd: {type: forward_kl, heads: [next], target: teacher}", "teacher: {type: teacher}")
    teacher = random_logits(3, 5, seed=7).requires_grad_(True)
    x = random_logits(3, 5, seed=8).requires_grad_(True)
    graph(logits={"next": x}, teachers={"teacher": teacher}).loss.backward()
    assert teacher.grad is None
    assert x.grad is not None


def test_topk_teacher_gets_no_gradient():
    graph = single_loss_graph(
        "kd: {type: forward_kl, heads: [next], target: cached}", "cached: {type: topk_teacher, k: 2}"
    )
    topk = random_topk(3, vocab=5, k=2, seed=9)
    logprobs = topk.logprobs.clone().requires_grad_(True)
    x = random_logits(3, 5, seed=8).requires_grad_(True)
    out = graph(logits={"next": x}, teachers={"cached": lossgraph.TopK(topk.indices, logprobs)})
    out.loss.backward()
    assert logprobs.grad is None


def test_topk_int32_indices_and_float64_logprobs():
    graph = single_loss_graph(
        "kd: {type: forward_kl, heads: [next], target: cached}", "cached: {type: topk_teacher, k: 2}"
    )
    topk = random_topk(3, vocab=5, k=2, seed=9)
    x = random_logits(3, 5, seed=8)
    expected = graph(logits={"next": x}, teachers={"cached": topk}).loss
    other = lossgraph.TopK(topk.indices.int(), topk.logprobs.double())
    assert_close(graph(logits={"next": x}, teachers={"cached": other}).loss, expected)


# --------------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------------


def test_metrics_accuracy_and_teacher_agreement_by_hand():
    graph = build(
        """
version: 1
vocab_size: 3
heads: {next: {offset: 1}}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
  cached: {type: topk_teacher, k: 2}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
  kd: {type: forward_kl, heads: [next], target: teacher}
  tk: {type: forward_kl, heads: [next], target: cached}
"""
    )
    # student argmax per position: 0, 2, 1, 1
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 5.0, 1.0], [0.0, 4.0, 1.0]])
    labels = torch.tensor([0, 1, 1, -100])  # position 3 is ignored (its argmax 1 would match anything)
    # dense teacher argmax: 0, 2, 0, 1
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [3.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    # top-k teacher top-1 (the index with the largest log-prob, not the first column): 2, 0, 0, 1
    log = math.log
    topk = lossgraph.TopK(
        torch.tensor([[1, 2], [0, 2], [1, 0], [2, 1]]),
        torch.tensor([[log(0.2), log(0.7)], [log(0.6), log(0.3)], [log(0.4), log(0.5)], [log(0.1), log(0.8)]]),
    )
    metrics = graph(logits={"next": logits}, labels=labels, teachers={"teacher": teacher, "cached": topk}).metrics
    metrics = metrics["next"]
    assert int(metrics["tokens"]) == 3
    assert float(metrics["accuracy"]) == pytest.approx(2 / 3)  # positions 0 and 2
    assert float(metrics["agreement/teacher"]) == pytest.approx(2 / 3)  # positions 0 and 1
    assert float(metrics["agreement/cached"]) == pytest.approx(0.0)  # 0 vs 2, 2 vs 0, 1 vs 0
    topk_agree = lossgraph.TopK(topk.indices, topk.logprobs.flip(-1))  # top-1 now 1, 2, 1, 2
    metrics = graph(logits={"next": logits}, labels=labels, teachers={"teacher": teacher, "cached": topk_agree})
    assert float(metrics.metrics["next"]["agreement/cached"]) == pytest.approx(2 / 3)  # positions 1 and 2


def test_metrics_of_mtp_head_use_shifted_labels():
    graph = build(TWO_HEADS)
    inputs = two_head_inputs(seed=11)
    out = graph(**inputs)
    labels = inputs["labels"]
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    prediction = inputs["logits"]["mtp2"].detach().argmax(-1)
    valid = shifted != -100
    assert int(out.metrics["mtp2"]["tokens"]) == int(valid.sum())
    expected = ((prediction == shifted) & valid).sum() / valid.sum()
    assert float(out.metrics["mtp2"]["accuracy"]) == pytest.approx(float(expected))
    teacher_top = inputs["teachers"]["teacher"].argmax(-1)
    next_valid = labels != -100
    agreement = ((inputs["logits"]["next"].detach().argmax(-1) == teacher_top) & next_valid).sum() / next_valid.sum()
    assert float(out.metrics["next"]["agreement/teacher"]) == pytest.approx(float(agreement))


# --------------------------------------------------------------------------------------------------
# Every example graph runs forward and backward.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_graph_runs(path):
    graph = lossgraph.compile(path, backend="torch")
    batch, seq = 2, 4
    logits = {
        head.name: random_logits(batch, seq, head.vocab_size, seed=index).requires_grad_(True)
        for index, head in enumerate(graph.plan.heads)
    }
    teachers = {}
    for index, (name, target) in enumerate(graph.plan.teachers.items()):
        if isinstance(target, TopKTarget):
            teachers[name] = random_topk(batch, seq, vocab=target.vocab_size, k=target.k, seed=20 + index)
        elif isinstance(target, RolloutTarget):  # advantages, and log-probs <= 0 where the source declares them
            logprobs = -torch.rand(batch, seq, generator=torch.Generator().manual_seed(20 + index))
            old, ref = (logprobs if declared else None for declared in (target.old_logprobs, target.ref_logprobs))
            teachers[name] = lossgraph.Rollout(torch.linspace(-1.0, 1.0, batch), old, ref)
        else:
            assert isinstance(target, DenseTarget)
            teachers[name] = random_logits(batch, seq, target.vocab_size, seed=20 + index)
    vocab = min(head.vocab_size for head in graph.plan.heads)
    labels = random_labels(batch, seq, vocab=vocab, seed=30) if graph.plan.labels is not None else None
    out = graph(logits=logits, labels=labels, teachers=teachers, step=1000)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())), path.name
    assert set(out.terms) == {term.key for term in graph.plan.terms}
    for key, value in out.values.items():
        assert math.isfinite(float(value)), key
    for name, tensor in logits.items():
        assert tensor.grad is not None, name
        assert bool(torch.isfinite(tensor.grad).all()), name
        assert bool(tensor.grad.abs().sum() > 0), name


def test_compile_arguments_are_checked():
    yaml_text = (
        "version: 1\nvocab_size: 8\nheads: {next: {}}\nsources: {labels: {type: labels}}\n"
        "losses: {lm: {type: cross_entropy, heads: [next], target: labels}}\n"
    )
    with pytest.raises(lossgraph.SourceFileError, match="lossgraph.loads"):
        lossgraph.compile(yaml_text)
    for bad in (0, 2.5, True):
        with pytest.raises(lossgraph.InputError, match="chunk_size"):
            lossgraph.compile(lossgraph.loads(yaml_text), chunk_size=bad)
