"""Run-time inputs of a compiled graph: label shifting for MTP heads, masks, normalizers and input errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import assert_close, random_labels, random_logits, random_topk

import lossgraph

TESTS = Path(__file__).parent


def build(yaml_text: str, **options) -> lossgraph.CompiledGraph:
    return lossgraph.compile(lossgraph.loads(yaml_text), backend="torch", **options)


# --------------------------------------------------------------------------------------------------
# Label shifting for MTP heads, documents and loss_mask: a [1, 4] batch over V = 4, by hand.
# --------------------------------------------------------------------------------------------------

# Row s of the logits is log(W[s]), so q_s = W[s] / sum(W[s]).
W = [[1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 1.0, 2.0], [2.0, 2.0, 1.0, 3.0], [1.0, 3.0, 2.0, 2.0]]
LABELS = [3, 0, 2, 1]  # label of position s: the token at s + 1

MTP = build(
    """
version: 1
vocab_size: 4
heads:
  next: {offset: 1}
  mtp2: {offset: 2}
  mtp3: {offset: 3}
sources:
  labels: {type: labels}
losses:
  lm: {type: cross_entropy, heads: [next, mtp2, mtp3], target: labels}
"""
)


def mtp_logits() -> dict[str, torch.Tensor]:
    rows = torch.tensor(W, dtype=torch.float64).log()[None]
    return {head: rows.clone().requires_grad_(True) for head in ("next", "mtp2", "mtp3")}


def ce_grad(position: int, label: int, count: int) -> torch.Tensor:
    """d(-log q_s[label] / count)/d logits_s = (q_s - onehot(label)) / count."""
    row = torch.tensor(W[position], dtype=torch.float64)
    grad = row / row.sum()
    grad[label] -= 1.0
    return grad / count


def test_mtp_label_shifting_offsets_one_two_three():
    logits = mtp_logits()
    out = MTP(logits=logits, labels=torch.tensor([LABELS]))
    out.loss.backward()
    # offset 1: position s reads labels[s] = 3, 0, 2, 1
    next_loss = -(math.log(4 / 10) + math.log(4 / 8) + math.log(1 / 8) + math.log(3 / 8)) / 4
    # offset 2: position s reads labels[s + 1] = 0, 2, 1; position 3 is past the end
    mtp2_loss = -(math.log(1 / 10) + math.log(1 / 8) + math.log(2 / 8)) / 3
    # offset 3: position s reads labels[s + 2] = 2, 1; positions 2 and 3 are past the end
    mtp3_loss = -(math.log(3 / 10) + math.log(1 / 8)) / 2
    assert_close(out.values["lm/next"], torch.tensor(next_loss, dtype=torch.float64), what="next")
    assert_close(out.values["lm/mtp2"], torch.tensor(mtp2_loss, dtype=torch.float64), what="mtp2")
    assert_close(out.values["lm/mtp3"], torch.tensor(mtp3_loss, dtype=torch.float64), what="mtp3")
    assert [int(out.metrics[h]["tokens"]) for h in ("next", "mtp2", "mtp3")] == [4, 3, 2]

    assert_close(logits["next"].grad[0], torch.stack([ce_grad(s, LABELS[s], 4) for s in range(4)]))
    expected = torch.stack([ce_grad(0, 0, 3), ce_grad(1, 2, 3), ce_grad(2, 1, 3), torch.zeros(4, dtype=torch.float64)])
    assert_close(logits["mtp2"].grad[0], expected, what="mtp2 gradient")
    assert torch.equal(logits["mtp2"].grad[0, 3], torch.zeros(4, dtype=torch.float64))
    expected = torch.stack([ce_grad(0, 2, 2), ce_grad(1, 1, 2), torch.zeros(4), torch.zeros(4)]).double()
    assert_close(logits["mtp3"].grad[0], expected, what="mtp3 gradient")
    assert torch.equal(logits["mtp3"].grad[0, 2:], torch.zeros(2, 4, dtype=torch.float64))


def test_ignore_index_is_shifted_with_the_labels():
    out = MTP(logits=mtp_logits(), labels=torch.tensor([[3, -100, 2, 1]]))
    # next skips position 1; mtp2 skips position 0 (it reads labels[1]); mtp3 reads labels[2], labels[3]
    next_loss = -(math.log(4 / 10) + math.log(1 / 8) + math.log(3 / 8)) / 3
    mtp2_loss = -(math.log(1 / 8) + math.log(2 / 8)) / 2
    mtp3_loss = -(math.log(3 / 10) + math.log(1 / 8)) / 2
    assert_close(out.values["lm/next"], torch.tensor(next_loss, dtype=torch.float64))
    assert_close(out.values["lm/mtp2"], torch.tensor(mtp2_loss, dtype=torch.float64))
    assert_close(out.values["lm/mtp3"], torch.tensor(mtp3_loss, dtype=torch.float64))
    assert [int(out.metrics[h]["tokens"]) for h in ("next", "mtp2", "mtp3")] == [3, 2, 2]


def test_document_ids_mask_mtp_targets_across_boundaries():
    logits = mtp_logits()
    out = MTP(logits=logits, labels=torch.tensor([LABELS]), document_ids=torch.tensor([[0, 0, 1, 1]]))
    out.loss.backward()
    # offset 1 is not affected: its labels are the dataset's own
    next_loss = -(math.log(4 / 10) + math.log(4 / 8) + math.log(1 / 8) + math.log(3 / 8)) / 4
    # offset 2: position s counts when doc[s] == doc[s + 1]: positions 0 (0 == 0) and 2 (1 == 1), not 1
    mtp2_loss = -(math.log(1 / 10) + math.log(2 / 8)) / 2
    assert_close(out.values["lm/next"], torch.tensor(next_loss, dtype=torch.float64))
    assert_close(out.values["lm/mtp2"], torch.tensor(mtp2_loss, dtype=torch.float64))
    # offset 3: doc[0] != doc[2] and doc[1] != doc[3]: the whole head is masked
    assert float(out.values["lm/mtp3"]) == 0.0
    assert [int(out.metrics[h]["tokens"]) for h in ("next", "mtp2", "mtp3")] == [4, 2, 0]
    assert torch.equal(logits["mtp2"].grad[0, 1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(logits["mtp2"].grad[0, 3], torch.zeros(4, dtype=torch.float64))
    assert_close(logits["mtp2"].grad[0, 0], ce_grad(0, 0, 2))
    assert_close(logits["mtp2"].grad[0, 2], ce_grad(2, 1, 2))
    assert torch.equal(logits["mtp3"].grad, torch.zeros_like(logits["mtp3"].grad))
    assert not any(bool(torch.isnan(v)) for v in out.values.values())


def test_loss_mask_is_shifted_like_the_labels():
    logits = mtp_logits()
    out = MTP(logits=logits, labels=torch.tensor([LABELS]), loss_mask=torch.tensor([[1, 1, 0, 1]]))
    # next: positions 0, 1, 3; mtp2 reads mask[s + 1]: positions 0 and 2; mtp3 reads mask[s + 2]: position 1
    next_loss = -(math.log(4 / 10) + math.log(4 / 8) + math.log(3 / 8)) / 3
    mtp2_loss = -(math.log(1 / 10) + math.log(2 / 8)) / 2
    mtp3_loss = -math.log(1 / 8)
    assert_close(out.values["lm/next"], torch.tensor(next_loss, dtype=torch.float64))
    assert_close(out.values["lm/mtp2"], torch.tensor(mtp2_loss, dtype=torch.float64))
    assert_close(out.values["lm/mtp3"], torch.tensor(mtp3_loss, dtype=torch.float64))
    assert [int(out.metrics[h]["tokens"]) for h in ("next", "mtp2", "mtp3")] == [3, 2, 1]


def test_loss_mask_accepts_bool_int_and_float():
    """Integer masks count where nonzero; a float mask is per-position weights, so 0/1 floats mask alike
    (weights other than 1 are tested in test_per_token.py)."""
    expected = MTP(
        logits=mtp_logits(), labels=torch.tensor([LABELS]), loss_mask=torch.tensor([[True, True, False, True]])
    )
    for mask in (torch.tensor([[1, 1, 0, 1]]), torch.tensor([[3, 1, 0, -2]]), torch.tensor([[1.0, 1.0, 0.0, 1.0]])):
        out = MTP(logits=mtp_logits(), labels=torch.tensor([LABELS]), loss_mask=mask)
        for key in expected.values:
            assert_close(out.values[key], expected.values[key], what=key)


def test_sequence_exactly_as_long_as_offset_masks_the_head():
    out = MTP(logits={h: torch.zeros(1, 2, 4) for h in ("next", "mtp2", "mtp3")}, labels=torch.tensor([[1, 2]]))
    assert int(out.metrics["mtp2"]["tokens"]) == 1
    assert int(out.metrics["mtp3"]["tokens"]) == 0
    assert float(out.values["lm/mtp3"]) == 0.0


def test_sequence_shorter_than_offset_masks_the_head():
    graph = build(
        """
version: 1
vocab_size: 4
heads: {next: {offset: 1}, mtp4: {offset: 4}}
sources: {labels: {type: labels}}
losses:
  lm: {type: cross_entropy, heads: [next, mtp4], target: labels}
"""
    )
    logits = {h: torch.zeros(1, 2, 4, requires_grad=True) for h in ("next", "mtp4")}
    out = graph(logits=logits, labels=torch.tensor([[1, 2]]))
    assert int(out.metrics["mtp4"]["tokens"]) == 0
    assert float(out.values["lm/mtp4"]) == 0.0


# --------------------------------------------------------------------------------------------------
# Normalization and num_items: N = 4 positions, one ignored label, V = 3.
# --------------------------------------------------------------------------------------------------


def norm_graph(normalization: str = "tokens") -> lossgraph.CompiledGraph:
    return build(
        f"""
version: 1
vocab_size: 3
normalization: {normalization}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}}}
sources: {{labels: {{type: labels}}}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], target: labels}}
"""
    )


# Every logits row is log([1, 2, 1]): q = [1/4, 1/2, 1/4].
ROWS = torch.tensor([[1.0, 2.0, 1.0]] * 4, dtype=torch.float64).log().reshape(2, 2, 3)
NORM_LABELS = torch.tensor([[1, 0], [-100, 2]])
# next: positions read 1, 0, (ignored), 2 -> 3 tokens; mtp2: position 0 of each row reads label 1 of it: 0, 2
NEXT_SUM = -(math.log(1 / 2) + math.log(1 / 4) + math.log(1 / 4))
MTP2_SUM = -(math.log(1 / 4) + math.log(1 / 4))


def norm_call(graph, **kwargs):
    logits = {h: ROWS.clone().requires_grad_(True) for h in ("next", "mtp2")}
    return graph(logits=logits, labels=NORM_LABELS, **kwargs), logits


@pytest.mark.parametrize(
    ("normalization", "next_divisor", "mtp2_divisor"),
    [("tokens", 3, 2), ("sum", 1, 1), ("batch", 4, 4)],
)
def test_normalization(normalization, next_divisor, mtp2_divisor):
    out, logits = norm_call(norm_graph(normalization))
    out.loss.backward()
    assert_close(out.values["lm/next"], torch.tensor(NEXT_SUM / next_divisor, dtype=torch.float64))
    assert_close(out.values["lm/mtp2"], torch.tensor(MTP2_SUM / mtp2_divisor, dtype=torch.float64))
    # the gradient of position 0 of the next head: (q - onehot(1)) / divisor
    expected = torch.tensor([0.25, -0.5, 0.25], dtype=torch.float64) / next_divisor
    assert_close(logits["next"].grad[0, 0], expected)


@pytest.mark.parametrize(
    "num_items",
    [12, 12.0, torch.tensor(12), torch.tensor(12.0), torch.tensor([12.0])],
    ids=["int", "float", "int-0d-tensor", "float-0d-tensor", "one-element-tensor"],
)
def test_num_items_one_number_for_every_head(num_items):
    out, logits = norm_call(norm_graph(), num_items=num_items)
    out.loss.backward()
    assert_close(out.values["lm/next"], torch.tensor(NEXT_SUM / 12, dtype=torch.float64))
    assert_close(out.values["lm/mtp2"], torch.tensor(MTP2_SUM / 12, dtype=torch.float64))
    assert_close(logits["next"].grad[0, 0], torch.tensor([0.25, -0.5, 0.25], dtype=torch.float64) / 12)
    # the token count in the metrics is still the local one
    assert int(out.metrics["next"]["tokens"]) == 3


def test_num_items_per_head_dict():
    out, _ = norm_call(norm_graph(), num_items={"next": 6, "mtp2": torch.tensor(5)})
    assert_close(out.values["lm/next"], torch.tensor(NEXT_SUM / 6, dtype=torch.float64))
    assert_close(out.values["lm/mtp2"], torch.tensor(MTP2_SUM / 5, dtype=torch.float64))


def test_num_items_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches divided by the total token count sum to the loss of the whole batch."""
    graph = norm_graph()
    logits = random_logits(4, 5, 3, dtype=torch.float64, seed=3)
    labels = random_labels(4, 5, vocab=3, ignore_fraction=0.3, seed=4)
    whole = {h: logits.clone().requires_grad_(True) for h in ("next", "mtp2")}
    full = graph(logits=whole, labels=labels)
    full.loss.backward()
    counts = {h: int(full.metrics[h]["tokens"]) for h in ("next", "mtp2")}
    parts = {h: logits.clone().requires_grad_(True) for h in ("next", "mtp2")}
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        micro = graph(logits={h: parts[h][rows] for h in parts}, labels=labels[rows], num_items=counts)
        micro.loss.backward()
        total += float(micro.loss.detach())
    assert_close(torch.tensor(total, dtype=torch.float64), full.loss.detach())
    for head in parts:
        assert_close(parts[head].grad, whole[head].grad, what=head)


# --------------------------------------------------------------------------------------------------
# Input errors.
# --------------------------------------------------------------------------------------------------

DISTILL = """
version: 1
vocab_size: 6
heads:
  next: {offset: 1}
  mtp2: {offset: 2}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
  cached: {type: topk_teacher, k: 2}
losses:
  lm: {type: cross_entropy, heads: [next, mtp2], target: labels}
  kd: {type: forward_kl, heads: [next], target: teacher}
  tk: {type: tvd, heads: [next], target: cached}
"""
B, S, V = 2, 3, 6


@pytest.fixture(scope="module")
def distill():
    return build(DISTILL)


def good_inputs() -> dict:
    return {
        "logits": {"next": random_logits(B, S, V, seed=1), "mtp2": random_logits(B, S, V, seed=2)},
        "labels": random_labels(B, S, vocab=V, seed=3),
        "teachers": {"teacher": random_logits(B, S, V, seed=4), "cached": random_topk(B, S, vocab=V, k=2, seed=5)},
    }


def test_good_inputs_run(distill):
    out = distill(**good_inputs())
    assert math.isfinite(float(out.loss))


def _topk_with_duplicates():
    topk = random_topk(B, S, vocab=V, k=2, seed=5)
    indices = topk.indices.clone()
    indices[0, 1, 1] = indices[0, 1, 0]
    return lossgraph.TopK(indices, topk.logprobs)


def _labels_with(value):
    labels = random_labels(B, S, vocab=V, ignore_fraction=0.0, seed=3)
    labels[1, 2] = value
    return labels


ERROR_CASES = {
    "missing head logits": (lambda i: i["logits"].pop("mtp2"), ["missing head", "'mtp2'"]),
    "unknown head": (
        lambda i: i["logits"].update(nxt=i["logits"].pop("next")),
        ["unknown head 'nxt'", "did you mean 'next'"],
    ),
    "missing teacher": (lambda i: i["teachers"].pop("teacher"), ["missing teacher", "'teacher'"]),
    "no teachers at all": (lambda i: i.pop("teachers"), ["missing teacher", "'teacher'", "'cached'"]),
    "extra teacher": (lambda i: i["teachers"].update(teacher3=torch.zeros(B, S, V)), ["unknown teacher 'teacher3'"]),
    "misspelled teacher": (
        lambda i: i["teachers"].update(teachr=i["teachers"].pop("teacher")),
        ["unknown teacher 'teachr'", "did you mean 'teacher'"],
    ),
    "teacher wrong positions": (
        lambda i: i["teachers"].update(teacher=torch.zeros(B, S + 1, V)),
        ["teacher 'teacher'", f"{(B, S + 1, V)}", f"{(B, S, V)}"],
    ),
    "teacher vocab mismatch": (
        lambda i: i["teachers"].update(teacher=torch.zeros(B, S, V + 1)),
        ["teacher 'teacher'", f"{(B, S, V + 1)}", f"{(B, S, V)}"],
    ),
    "teacher int dtype": (
        lambda i: i["teachers"].update(teacher=torch.zeros(B, S, V, dtype=torch.long)),
        ["teacher 'teacher'", "floating"],
    ),
    "dense tensor for topk teacher": (
        lambda i: i["teachers"].update(cached=torch.zeros(B, S, V)),
        ["teacher 'cached'", "TopK"],
    ),
    "topk for dense teacher": (
        lambda i: i["teachers"].update(teacher=random_topk(B, S, vocab=V, k=2)),
        ["teacher 'teacher'", "logits tensor"],
    ),
    "topk wrong k": (
        lambda i: i["teachers"].update(cached=random_topk(B, S, vocab=V, k=3)),
        ["teacher 'cached'", f"{(B, S, 3)}", f"expected {(B, S, 2)}"],
    ),
    "topk duplicate indices": (
        lambda i: i["teachers"].update(cached=_topk_with_duplicates()),
        ["teacher 'cached'", "repeat"],
    ),
    "topk index out of vocab": (
        lambda i: i["teachers"].update(
            cached=lossgraph.TopK(torch.full((B, S, 2), V) + torch.tensor([0, 1]), i["teachers"]["cached"].logprobs)
        ),
        ["teacher 'cached'", f"[0, {V})"],
    ),
    "head vocab mismatch": (
        lambda i: i["logits"].update(next=torch.zeros(B, S, V + 2)),
        ["logits['next']", f"vocab {V + 2}", f"vocab_size {V}"],
    ),
    "heads cover different positions": (
        lambda i: i["logits"].update(mtp2=torch.zeros(B, S + 1, V)),
        ["logits['mtp2']", "same positions"],
    ),
    "int logits": (
        lambda i: i["logits"].update(next=torch.zeros(B, S, V, dtype=torch.long)),
        ["logits['next']", "floating"],
    ),
    "1-d logits": (lambda i: i["logits"].update(next=torch.zeros(V)), ["logits['next']", "[B, S, V]"]),
    "logits not a dict": (lambda i: i.update(logits=torch.zeros(B, S, V)), ["logits must be a dict"]),
    "labels >= V": (lambda i: i.update(labels=_labels_with(V)), ["labels of head 'next'", f"hold {V}", f"[0, {V})"]),
    "labels negative": (
        lambda i: i.update(labels=_labels_with(-1)),
        ["labels of head 'next'", "hold -1", "ignore_index (-100)"],
    ),
    "float labels": (lambda i: i.update(labels=i["labels"].float()), ["labels must be an integer tensor"]),
    "labels wrong shape": (lambda i: i.update(labels=i["labels"][:, :2]), ["labels has shape (2, 2)", "(2, 3)"]),
    "labels missing": (lambda i: i.pop("labels"), ["labels source 'labels'", "pass labels="]),
    "loss_mask wrong shape": (lambda i: i.update(loss_mask=torch.ones(B, S + 1)), ["loss_mask", f"{(B, S + 1)}"]),
    "document_ids float": (lambda i: i.update(document_ids=torch.zeros(B, S)), ["document_ids", "integer"]),
    "num_items negative": (lambda i: i.update(num_items=-3), ["num_items", "positive", "-3"]),
    "num_items zero": (lambda i: i.update(num_items=0), ["num_items", "positive"]),
    "num_items nan": (lambda i: i.update(num_items=math.nan), ["num_items", "positive"]),
    "num_items bool": (lambda i: i.update(num_items=True), ["num_items", "positive"]),
    "num_items string": (lambda i: i.update(num_items="12"), ["num_items", "positive"]),
    "num_items tensor of several": (lambda i: i.update(num_items=torch.tensor([3.0, 4.0])), ["num_items", "scalar"]),
    "num_items dict missing a head": (lambda i: i.update(num_items={"next": 3}), ["missing num_items head", "'mtp2'"]),
    "num_items dict unknown head": (
        lambda i: i.update(num_items={"next": 3, "mtp2": 3, "mtp3": 1}),
        ["unknown num_items head 'mtp3'"],
    ),
    "step negative": (lambda i: i.update(step=-1), ["step", "-1"]),
    "step tensor": (lambda i: i.update(step=torch.tensor(3)), ["step must be a Python int"]),
    "step float": (lambda i: i.update(step=2.0), ["step must be a Python int"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_input_errors(distill, case):
    change, fragments = ERROR_CASES[case]
    inputs = good_inputs()
    change(inputs)
    with pytest.raises(lossgraph.InputError) as info:
        distill(**inputs)
    assert isinstance(info.value, lossgraph.LossGraphError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_check_inputs_false_skips_value_checks():
    """check_inputs=False skips the checks that read tensor values (they synchronize with a GPU)."""
    inputs = good_inputs()
    inputs["teachers"]["cached"] = _topk_with_duplicates()
    out = build(DISTILL, check_inputs=False)(**inputs)  # no error: nothing looked at the indices
    assert math.isfinite(float(out.loss))
    with pytest.raises(lossgraph.InputError, match="repeat"):
        build(DISTILL, check_inputs=True)(**inputs)
    inputs = good_inputs()
    inputs["labels"] = _labels_with(V)
    # unchecked, a label outside the vocab is not an error but poisons the loss (as in the fused kernel)
    assert math.isnan(float(build(DISTILL, check_inputs=False)(**inputs).loss))


def test_labels_beyond_vocab_at_masked_positions_are_fine(distill):
    inputs = good_inputs()
    inputs["labels"] = _labels_with(V + 5)
    inputs["loss_mask"] = torch.ones(B, S)
    inputs["loss_mask"][1, 2] = 0
    inputs["loss_mask"][1, 1] = 0  # mtp2 reads label [1, 2] at position [1, 1]
    assert math.isfinite(float(distill(**inputs).loss))


def test_flat_logits_with_offset_two_head_is_an_error():
    graph = build(DISTILL)
    inputs = good_inputs()
    inputs["logits"] = {h: t.reshape(B * S, V) for h, t in inputs["logits"].items()}
    inputs["labels"] = inputs["labels"].reshape(-1)
    inputs["teachers"] = {
        "teacher": inputs["teachers"]["teacher"].reshape(B * S, V),
        "cached": lossgraph.TopK(*(t.reshape(B * S, 2) for t in inputs["teachers"]["cached"])),
    }
    with pytest.raises(lossgraph.InputError, match=r"head 'mtp2' has offset 2.*\[B, S, V\]"):
        graph(**inputs)


def test_document_ids_with_flat_logits_is_an_error():
    graph = build(
        """
version: 1
vocab_size: 6
heads: {next: {offset: 1}}
sources: {labels: {type: labels}}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
"""
    )
    logits = random_logits(6, V)
    labels = random_labels(6, vocab=V)
    assert math.isfinite(float(graph(logits={"next": logits}, labels=labels).loss))  # [N, V] is fine alone
    with pytest.raises(lossgraph.InputError, match=r"document_ids need \[B, S\] logits"):
        graph(logits={"next": logits}, labels=labels, document_ids=torch.zeros(6, dtype=torch.long))


def test_num_items_with_sum_or_batch_normalization_is_an_error():
    for normalization in ("sum", "batch"):
        with pytest.raises(lossgraph.InputError, match=f"num_items applies to normalization: tokens.*{normalization}"):
            norm_call(norm_graph(normalization), num_items=10)


def test_labels_given_to_a_graph_without_labels_source():
    graph = build(
        """
version: 1
vocab_size: 6
heads: {next: {offset: 1}}
sources: {teacher: {type: teacher}}
losses:
  kd: {type: forward_kl, heads: [next], target: teacher}
"""
    )
    logits = random_logits(2, 3, V)
    teacher = random_logits(2, 3, V, seed=9)
    assert math.isfinite(float(graph(logits={"next": logits}, teachers={"teacher": teacher}).loss))
    with pytest.raises(lossgraph.InputError, match="labels given, but the graph has no labels source"):
        graph(logits={"next": logits}, teachers={"teacher": teacher}, labels=random_labels(2, 3, vocab=V))


def test_teacher_callable_returning_wrong_type_is_an_error(distill):
    inputs = good_inputs()
    inputs["teachers"]["cached"] = lambda: torch.zeros(B, S, V)
    with pytest.raises(lossgraph.InputError, match="teacher 'cached' is a topk_teacher source"):
        distill(**inputs)


@pytest.mark.parametrize("value", [-4.0, math.nan], ids=["negative", "nan"])
def test_num_items_tensor_values_are_checked(distill, value):
    inputs = good_inputs()
    inputs["num_items"] = torch.tensor(value)
    with pytest.raises(lossgraph.InputError, match="num_items"):
        distill(**inputs)


def _on_meta(value):
    """The same tensor (or TopK) on the `meta` device: a second device that every machine has."""
    if isinstance(value, lossgraph.TopK):
        return lossgraph.TopK(value.indices.to("meta"), value.logprobs.to("meta"))
    return value.to("meta")


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (("logits", "mtp2"), "is on meta, other heads on cpu"),
        (("labels",), "labels is on meta, the logits on cpu"),
        (("teachers", "teacher"), "on meta, the logits on cpu"),
        (("teachers", "cached"), "of teacher 'cached' is on meta, the logits on cpu"),
    ],
    ids=["second-head", "labels", "dense-teacher", "topk-teacher"],
)
def test_an_input_on_another_device_is_named(distill, where, message):
    inputs = good_inputs()
    holder = inputs
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = _on_meta(holder[where[-1]])
    with pytest.raises(lossgraph.InputError, match=message):
        distill(**inputs)


# --------------------------------------------------------------------------------------------------
# Configuration and backend errors of compile.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["source_cycle.yaml", "missing_losses.yaml", "teacher_offset_mismatch.yaml"])
def test_compile_invalid_yaml_path_raises_config_error(name):
    path = TESTS / "invalid" / name
    with pytest.raises(lossgraph.ConfigError) as info:
        lossgraph.compile(path, backend="torch")
    assert isinstance(info.value, lossgraph.LossGraphError)
    assert info.value.diagnostics
    assert name in str(info.value)
    with pytest.raises(lossgraph.ConfigError):
        lossgraph.compile(str(path), backend="torch")


def test_compile_missing_file_raises_source_file_error(tmp_path):
    with pytest.raises(lossgraph.SourceFileError, match="no such file"):
        lossgraph.compile(tmp_path / "nope.yaml", backend="torch")


def test_unknown_backend_raises_backend_error():
    spec = lossgraph.loads(DISTILL)
    with pytest.raises(lossgraph.BackendError, match="unknown backend 'cuda'.*torch") as info:
        lossgraph.compile(spec, backend="cuda")
    assert isinstance(info.value, lossgraph.LossGraphError)
