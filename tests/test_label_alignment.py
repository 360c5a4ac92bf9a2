"""The two label alignments of a call: "next_token" (labels[b, s] is the token after position s, the
default) and "input" (labels aligned with input_ids, as Hugging Face gives them).

The same batch given in either form gives the same loss, values, per-token values, metrics and
gradients on both backends (the fused one through Triton's interpreter on a CPU), with MTP heads of
offsets 1 to 3, document_ids, bool and float loss masks and a graph without labels. `tokens_per_head`
counts what the graph divides by in both forms, and the value checks refuse labels given in the wrong
alignment when `input_ids` are passed along.
"""

from __future__ import annotations

import math

import pytest
import torch
from fused_cases import DEVICE, FUSED_SKIP_REASON, interpreter_warnings
from helpers import assert_close, random_logits

import lossgraph

pytestmark = interpreter_warnings

IGNORE = -100
B, S, V = 2, 9, 16

MTP = f"""
version: 1
vocab_size: {V}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}, mtp3: {{offset: 3}}}}
sources: {{labels: {{type: labels}}, teacher: {{type: teacher}}}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2, mtp3], head_weights: [1.0, 0.5, 0.25], target: labels}}
  kd: {{type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}}
  z: {{type: z_loss, heads: [mtp3], weight: 0.01}}
"""

# a graph without labels: only loss_mask, document_ids and the sequence's end say where targets are
DISTILL = f"""
version: 1
vocab_size: {V}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}}}
sources: {{teacher: {{type: teacher}}}}
losses:
  kd: {{type: reverse_kl, heads: [next], target: teacher}}
  h: {{type: entropy, heads: [mtp2], weight: 0.1}}
"""

BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(bool(FUSED_SKIP_REASON), reason=FUSED_SKIP_REASON or "runs")),
]


def compiled(text: str, backend: str = "torch", **options) -> lossgraph.CompiledGraph:
    return lossgraph.compile(lossgraph.loads(text), backend=backend, **options)


def as_next_token(
    labels: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The "next_token" form of input-aligned labels and loss_mask, written out by hand: one step to the
    left, nothing at the end; the caller masks the next-token targets that start another document."""
    boundary = None
    if document_ids is not None:
        boundary = torch.cat([document_ids[:, 1:] != document_ids[:, :-1], torch.ones_like(document_ids[:, :1])], 1)
        boundary = boundary.bool()
    if labels is not None:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
        if boundary is not None:
            labels = labels.masked_fill(boundary, IGNORE)
    if loss_mask is not None or labels is None:
        given = torch.ones(B, S, dtype=torch.bool, device=DEVICE) if loss_mask is None else loss_mask
        loss_mask = torch.cat([given[:, 1:], torch.zeros_like(given[:, :1])], 1)
        if boundary is not None and labels is None:
            loss_mask = loss_mask.masked_fill(boundary, 0)
    return labels, loss_mask


def batch(*, documents: bool, mask: str | None, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Input-aligned tokens, labels (prompt-like ignored tokens), loss_mask and document_ids."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, S), generator=generator)
    labels = input_ids.clone()
    labels[0, :2] = IGNORE  # a prompt: its tokens are no targets
    labels[1, 5] = IGNORE
    loss_mask = None
    if mask == "bool":
        loss_mask = torch.ones(B, S, dtype=torch.bool)
        loss_mask[1, 2:4] = False
    elif mask == "float":
        loss_mask = torch.rand(B, S, generator=generator) * 2
        loss_mask[0, 6] = 0.0
    document_ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [1] * 3]) if documents else None
    values = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "document_ids": document_ids}
    return {key: None if value is None else value.to(DEVICE) for key, value in values.items()}


def run(graph, heads, given: dict, **call):
    """Call `graph` with fresh float32 leaves for `heads`; returns the output and the logits' gradients."""
    logits = {head: random_logits(B, S, V, seed=i).to(DEVICE).requires_grad_(True) for i, head in enumerate(heads)}
    teacher = random_logits(B, S, V, seed=7).to(DEVICE)
    out = graph(logits=logits, teachers={"teacher": teacher}, **given, **call)
    out.loss.backward()
    return out, {head: tensor.grad for head, tensor in logits.items()}


def assert_same(first, second) -> None:
    """Two calls on the same inputs laid out differently: bit for bit the same."""
    (out_a, grads_a), (out_b, grads_b) = first, second
    assert torch.equal(out_a.loss, out_b.loss)
    for key in out_a.values:
        assert torch.equal(out_a.values[key], out_b.values[key]), key
        assert torch.equal(out_a.per_token[key], out_b.per_token[key]), key
    for head, metrics in out_a.metrics.items():
        for name, value in metrics.items():
            assert torch.equal(value, out_b.metrics[head][name]), f"{head} {name}"
    for head in grads_a:
        assert torch.equal(grads_a[head], grads_b[head]), f"gradient of {head}"


# --------------------------------------------------------------------------------------------------
# By hand: what each head reads under "input".
# --------------------------------------------------------------------------------------------------


LM3 = f"""
version: 1
vocab_size: {V}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}, mtp3: {{offset: 3}}}}
sources: {{labels: {{type: labels}}}}
losses: {{lm: {{type: cross_entropy, heads: [next, mtp2, mtp3], target: labels}}}}
"""


def test_input_alignment_reads_the_token_offset_positions_ahead():
    """Tokens x0..x4 = 5, 3, 0, 2, 1; head d at position s reads x(s + d); the last d positions have none."""
    rows = torch.arange(5 * V, dtype=torch.float64).reshape(1, 5, V).sin()
    tokens = torch.tensor([[5, 3, 0, 2, 1]])
    out = compiled(LM3)(logits={h: rows for h in ("next", "mtp2", "mtp3")}, labels=tokens, label_alignment="input")
    log_q = torch.log_softmax(rows[0], -1)
    for head, offset in (("next", 1), ("mtp2", 2), ("mtp3", 3)):
        expected = -sum(log_q[s, tokens[0, s + offset]] for s in range(5 - offset)) / (5 - offset)
        assert_close(out.values[f"lm/{head}"], expected, what=head)
        assert int(out.metrics[head]["tokens"]) == 5 - offset
        assert torch.equal(out.per_token[f"lm/{head}"][0, 5 - offset :], torch.zeros(offset))


def test_input_alignment_keeps_every_head_inside_its_document():
    """Under "input" the next-token head is masked at a boundary too: the labels say which token follows."""
    tokens = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(1))
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    logits = {h: torch.zeros(1, 8, V) for h in ("next", "mtp2", "mtp3")}
    out = compiled(LM3)(logits=logits, labels=tokens, document_ids=documents, label_alignment="input")
    # head d at s counts when s + d < 8 and documents[s + d] == documents[s]
    for head, offset in (("next", 1), ("mtp2", 2), ("mtp3", 3)):
        expected = sum(1 for s in range(8 - offset) if documents[0, s + offset] == documents[0, s])
        assert int(out.metrics[head]["tokens"]) == expected, head


# --------------------------------------------------------------------------------------------------
# Both forms of one batch, both backends.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("documents", [False, True], ids=["one-document", "documents"])
@pytest.mark.parametrize("mask", [None, "bool", "float"], ids=["no-mask", "bool-mask", "float-mask"])
def test_both_alignments_of_one_batch_agree(backend, documents, mask):
    graph = compiled(MTP, backend)
    given = batch(documents=documents, mask=mask)
    input_ids, labels, loss_mask, document_ids = (
        given[k] for k in ("input_ids", "labels", "loss_mask", "document_ids")
    )
    heads = ("next", "mtp2", "mtp3")
    unshifted = run(
        graph,
        heads,
        {"labels": labels, "loss_mask": loss_mask, "document_ids": document_ids},
        input_ids=input_ids,
        label_alignment="input",
    )
    next_labels, next_mask = as_next_token(labels, loss_mask, document_ids)
    shifted = run(graph, heads, {"labels": next_labels, "loss_mask": next_mask, "document_ids": document_ids})
    assert_same(unshifted, shifted)
    assert int(unshifted[0].metrics["mtp3"]["tokens"]) > 0
    # the default is "next_token": the shifted form needs no keyword
    explicit = run(
        graph,
        heads,
        {"labels": next_labels, "loss_mask": next_mask, "document_ids": document_ids},
        input_ids=input_ids,
        label_alignment="next_token",
    )
    assert_same(explicit, shifted)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", [None, "bool"], ids=["no-mask", "bool-mask"])
def test_both_alignments_agree_without_labels(backend, mask):
    """Pure distillation: under "input" the last position has no target token, as with labels."""
    graph = compiled(DISTILL, backend)
    given = batch(documents=True, mask=mask)
    loss_mask, document_ids = given["loss_mask"], given["document_ids"]
    unshifted = run(
        graph, ("next", "mtp2"), {"loss_mask": loss_mask, "document_ids": document_ids}, label_alignment="input"
    )
    _, next_mask = as_next_token(None, loss_mask, document_ids)
    shifted = run(graph, ("next", "mtp2"), {"loss_mask": next_mask, "document_ids": document_ids})
    assert_same(unshifted, shifted)
    assert float(unshifted[0].per_token["kd/next"][0, -1]) == 0.0


# --------------------------------------------------------------------------------------------------
# tokens_per_head: what the graph divides by, in either form.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, "bool", "float"], ids=["no-mask", "bool-mask", "float-mask"])
def test_tokens_per_head_is_what_the_graph_divides_by(mask):
    graph = compiled(MTP)
    given = batch(documents=True, mask=mask)
    labels, loss_mask, document_ids = given["labels"], given["loss_mask"], given["document_ids"]
    counts = graph.tokens_per_head(labels, loss_mask, document_ids, label_alignment="input")
    next_labels, next_mask = as_next_token(labels, loss_mask, document_ids)
    assert graph.tokens_per_head(next_labels, next_mask, document_ids).keys() == counts.keys()
    for head, count in graph.tokens_per_head(next_labels, next_mask, document_ids).items():
        assert torch.equal(count, counts[head]), head
    out, _ = run(
        graph, ("next", "mtp2", "mtp3"), {"labels": next_labels, "loss_mask": next_mask, "document_ids": document_ids}
    )
    if mask != "float":
        assert {h: int(c) for h, c in counts.items()} == {h: int(m["tokens"]) for h, m in out.metrics.items()}
        assert counts["next"].dtype == torch.int64
    # dividing by the counts explicitly is what the graph does on its own
    given_counts, _ = run(
        graph,
        ("next", "mtp2", "mtp3"),
        {"labels": next_labels, "loss_mask": next_mask, "document_ids": document_ids},
        num_items=counts,
    )
    assert_close(given_counts.loss, out.loss)


def test_tokens_per_head_of_a_graph_without_labels_reads_the_positions_from_input_ids():
    graph = compiled(DISTILL)
    input_ids = torch.zeros(3, 5, dtype=torch.long)
    assert {h: int(c) for h, c in graph.tokens_per_head(input_ids=input_ids).items()} == {"next": 15, "mtp2": 12}
    counts = graph.tokens_per_head(input_ids=input_ids, label_alignment="input")
    assert {h: int(c) for h, c in counts.items()} == {"next": 12, "mtp2": 9}
    with pytest.raises(lossgraph.InputError, match="give labels, loss_mask, document_ids or input_ids"):
        graph.tokens_per_head()


# --------------------------------------------------------------------------------------------------
# Labels in the wrong alignment, and other mistakes.
# --------------------------------------------------------------------------------------------------

LM = f"""
version: 1
vocab_size: {V}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}}}
sources: {{labels: {{type: labels}}}}
losses: {{lm: {{type: cross_entropy, heads: [next, mtp2], target: labels}}}}
"""


def lm_call(graph, labels, input_ids, **call):
    logits = {h: torch.zeros(*labels.shape, V) for h in ("next", "mtp2")}
    return graph(logits=logits, labels=labels, input_ids=input_ids, **call)


def test_unshifted_labels_given_as_next_token_are_refused():
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    labels = tokens.clone()
    labels[:, :3] = IGNORE
    labels[1, 4] = (tokens[1, 4] + 1) % V  # a position the loss_mask leaves out does not count
    loss_mask = torch.ones(B, S, dtype=torch.bool)
    loss_mask[1, 4] = False
    with pytest.raises(lossgraph.InputError, match="labels look unshifted") as error:
        lm_call(compiled(LM), labels, tokens, loss_mask=loss_mask)
    assert "label_alignment='input'" in str(error.value)
    # the same labels in their own alignment, and shifted ones in the default alignment, are fine
    lm_call(compiled(LM), labels, tokens, loss_mask=loss_mask, label_alignment="input")
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
    lm_call(compiled(LM), shifted, tokens)
    # the check reads values: check_inputs=False leaves it out
    lm_call(compiled(LM, check_inputs=False), labels, tokens, loss_mask=loss_mask)


def test_shifted_labels_given_as_input_are_refused():
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    shifted = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE)], 1)
    with pytest.raises(lossgraph.InputError, match="labels look already shifted") as error:
        lm_call(compiled(LM), shifted, tokens, label_alignment="input")
    assert "label_alignment='next_token'" in str(error.value)
    with pytest.raises(lossgraph.InputError, match="labels look already shifted"):
        compiled(LM).tokens_per_head(shifted, input_ids=tokens, label_alignment="input")


def test_labels_that_fit_both_alignments_or_neither_are_left_alone():
    repeated = torch.full((B, S), 4)  # one token over and over: shifted and unshifted look the same
    lm_call(compiled(LM), repeated, repeated)
    lm_call(compiled(LM), repeated, repeated, label_alignment="input")
    unrelated = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(4))
    lm_call(compiled(LM), unrelated, (unrelated + 1) % V)
    lm_call(compiled(LM), unrelated, (unrelated + 1) % V, label_alignment="input")
    nothing = torch.full((B, S), IGNORE)  # no position takes loss: no evidence either way
    lm_call(compiled(LM), nothing, torch.zeros(B, S, dtype=torch.long))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"label_alignment": "shifted"}, "label_alignment must be 'next_token'"),
        ({"label_alignment": None}, "label_alignment must be 'next_token'"),
        ({"input_ids": torch.zeros(B, S - 1, dtype=torch.long)}, "input_ids has shape"),
        ({"input_ids": torch.zeros(B, S)}, "input_ids must be an integer tensor"),
    ],
    ids=["unknown-alignment", "none-alignment", "input-ids-shape", "float-input-ids"],
)
def test_bad_alignment_arguments_are_input_errors(call, message):
    logits = {h: torch.zeros(B, S, V) for h in ("next", "mtp2")}
    with pytest.raises(lossgraph.InputError, match=message):
        compiled(LM)(logits=logits, labels=torch.zeros(B, S, dtype=torch.long), **call)


def test_input_alignment_needs_sequences():
    graph = compiled(LM.replace(", mtp2: {offset: 2}", "").replace("[next, mtp2]", "[next]"))
    with pytest.raises(lossgraph.InputError, match="label_alignment='input' shifts labels along the sequence"):
        graph(logits={"next": torch.zeros(6, V)}, labels=torch.zeros(6, dtype=torch.long), label_alignment="input")
    # flat labels in the default alignment are checked against flat input_ids as one row
    tokens = torch.arange(6) % V
    with pytest.raises(lossgraph.InputError, match="labels look unshifted"):
        graph(logits={"next": torch.zeros(6, V)}, labels=tokens, input_ids=tokens)
    assert math.isfinite(float(graph(logits={"next": torch.zeros(6, V)}, labels=tokens).loss))
