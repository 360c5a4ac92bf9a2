"""The rollout source: its spec rules (located errors) and its run-time checks (located InputErrors)."""

from __future__ import annotations

import pytest
import torch

import lossgraph
from lossgraph import InputError, Rollout
from lossgraph.document import check_text

B, S, V = 2, 4, 16

SOURCES = """version: 1
vocab_size: 16
heads: {next: {offset: 1}}
sources:
  labels: {type: labels}
  rollouts: {type: rollout, old_logprobs: true}
losses:
"""


def errors(losses: str, sources: str = SOURCES) -> list[str]:
    report = check_text(sources + losses)
    return [d.format() for d in report.diagnostics if d.severity == "error"]


@pytest.mark.parametrize(
    "loss, where, words",
    [
        ("  kl: {type: kl_estimate, heads: [next], target: rollouts}", "losses.kl.target", "ref_logprobs: true"),
        ("  pg: {type: policy_gradient, heads: [next], target: labels}", "losses.pg.target", "type rollout"),
        ("  lm: {type: cross_entropy, heads: [next], target: rollouts}", "losses.lm.target", "policy_gradient"),
        (
            "  pg: {type: policy_gradient, heads: [next], target: rollouts, objective: cispo}",
            "losses.pg.epsilon_high",
            "set it",
        ),
        (
            "  pg: {type: policy_gradient, heads: [next], target: rollouts, objective: cispo, epsilon_high: 5.0, "
            "delta: 2.0}",
            "losses.pg.delta",
            "no delta",
        ),
        (
            "  pg: {type: policy_gradient, heads: [next], target: rollouts, aggregation: constant}",
            "losses.pg.aggregation",
            "max_completion_length",
        ),
        (
            "  pg: {type: policy_gradient, heads: [next], target: rollouts, max_completion_length: 8}",
            "losses.pg.max_completion_length",
            "aggregation: constant",
        ),
        (
            "  pg: {type: policy_gradient, heads: [next], target: rollouts, epsilon_low: 1.0}",
            "losses.pg.epsilon_low",
            "1",
        ),
        ("  pg: {type: policy_gradient, heads: [next], target: rollouts, delta: 0.5}", "losses.pg.delta", "1"),
        (
            "  pg: {type: policy_gradient, heads: [next], target: rollouts, aggregation: sequence_mean, "
            "normalizer: targets}",
            "losses.pg.normalizer",
            "sequences",
        ),
        (
            "  pg: {type: policy_gradient, heads: [next], target: rollouts, positions: all}",
            "losses.pg.positions",
            "targets",
        ),
    ],
)
def test_spec_errors_are_located(loss, where, words):
    found = errors(loss)
    assert any(where in message and words in message for message in found), found


def test_a_rollout_needs_a_labels_source():
    sources = SOURCES.replace("  labels: {type: labels}\n", "")
    found = errors("  pg: {type: policy_gradient, heads: [next], target: rollouts}", sources)
    assert any("sources.rollouts" in message and "labels source" in message for message in found), found


def test_a_rollout_is_read_on_next_token_heads_only():
    sources = SOURCES.replace("heads: {next: {offset: 1}}", "heads: {next: {offset: 1}, mtp2: {offset: 2}}")
    found = errors("  pg: {type: policy_gradient, heads: [next, mtp2], target: rollouts}", sources)
    assert any("sources.rollouts" in m and "'mtp2' (offset 2)" in m for m in found), found
    assert not errors("  pg: {type: policy_gradient, heads: [next], target: rollouts}", sources)


def make(old: bool = True, **losses):
    fields = losses.get("fields", "")
    text = SOURCES + f"  pg: {{type: policy_gradient, heads: [next], target: rollouts{fields}}}\n"
    if not old:
        text = text.replace("old_logprobs: true", "old_logprobs: false")
    return lossgraph.compile(lossgraph.loads(text), "torch")


def inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, V, generator=generator)
    labels = torch.randint(0, V, (B, S), generator=generator)
    labels[0, 0] = -100
    old = torch.log_softmax(torch.randn(B, S, V, generator=generator), -1)[..., 0]
    return logits, labels, torch.randn(B, generator=generator), old


def call(graph, rollout, logits=None, labels=None, **kwargs):
    base_logits, base_labels, _, _ = inputs()
    logits = base_logits if logits is None else logits
    return graph(
        {"next": logits}, labels=base_labels if labels is None else labels, teachers={"rollouts": rollout}, **kwargs
    )


def test_a_valid_rollout_runs():
    _, _, advantages, old = inputs()
    out = call(make(), Rollout(advantages, old))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda a, o: (a, o.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(0.5))),
            "log-prob is finite and <= 0",
        ),
        (
            lambda a, o: (a, o.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan")))),
            "position 6",
        ),
        (
            lambda a, o: (
                a[:, None]
                .expand(B, S)
                .clone()
                .index_put_((torch.tensor(1), torch.tensor(1)), torch.tensor(float("inf"))),
                o,
            ),
            "advantages must be finite",
        ),
        (
            lambda a, o: (
                a[:, None]
                .expand(B, S)
                .clone()
                .index_put_((torch.tensor(0), torch.tensor(3)), torch.tensor(float("nan"))),
                o,
            ),
            "position 3",
        ),
        (lambda a, o: (torch.zeros(B, S + 1), o), "has shape (2, 5)"),
        (lambda a, o: (a, o[:, :2]), "has shape (2, 2)"),
        (lambda a, o: (a.long(), o), "must be floating"),
    ],
)
def test_bad_values_are_located_input_errors(change, words):
    _, _, advantages, old = inputs()
    advantages, old = change(advantages, old)
    with pytest.raises(InputError, match="rollouts") as error:
        call(make(), Rollout(advantages, old))
    assert words in str(error.value)


def test_a_masked_position_is_not_checked():
    _, _, advantages, old = inputs()
    old = old.clone()
    old[0, 0] = float("nan")  # labels[0, 0] is ignore_index
    assert torch.isfinite(call(make(), Rollout(advantages, old)).loss)


def test_sequence_ids_must_be_contiguous_runs():
    _, _, advantages, old = inputs()
    ids = torch.tensor([[1, 1, 2, 2], [3, 4, 3, 3]])
    with pytest.raises(InputError, match="sequence 3 of batch row 1 comes back at position 6"):
        call(make(), Rollout(advantages, old, None, ids))
    call(make(), Rollout(advantages, old, None, torch.tensor([[1, 1, 2, 2], [1, 1, 1, 2]])))


def test_old_logprobs_must_match_the_declaration():
    _, _, advantages, old = inputs()
    with pytest.raises(InputError, match="declares old_logprobs: true"):
        call(make(), Rollout(advantages))
    with pytest.raises(InputError, match="does not declare them"):
        call(make(old=False), Rollout(advantages, old))


def test_a_rollout_must_be_a_rollout():
    with pytest.raises(InputError, match="pass lossgraph.Rollout"):
        call(make(), torch.zeros(B, S))


def test_num_items_is_refused_with_sequence_mean():
    _, _, advantages, old = inputs()
    graph = make(fields=", aggregation: sequence_mean")
    with pytest.raises(InputError, match="aggregates by sequence_mean"):
        call(graph, Rollout(advantages, old), num_items=10)
