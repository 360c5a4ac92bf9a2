"""The built-in kinds as the tests see them: the lists come from the registries, and the per-kind data a
test needs (a float64 formula, the fields a node sets) from the one table here.

A kind added to the registry is in every parametrization at once; a test that needs its float64
formula then fails with a message that says what to add here (`truth`), and a test module whose table
of sources misses a registered source kind fails with its name (`assert_covers_source_kinds`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import pytest
import torch

from lossgraph.kinds import LossKind, SourceKind, kind_origin, loss_kinds, source_kinds
from lossgraph.kinds.plugins import BUILT_IN


def built_in_loss_kinds() -> list[LossKind]:
    """The registered built-in loss kinds, in the registry's order (plugins and test kinds left out)."""
    return [kind for kind in loss_kinds() if kind_origin("loss", kind.name) == BUILT_IN]


def built_in_source_kinds() -> list[SourceKind]:
    return [kind for kind in source_kinds() if kind_origin("source", kind.name) == BUILT_IN]


def _reads_rollout(kind: LossKind) -> bool:
    return getattr(kind.model, "reads_rollout", False)


#: loss kinds on a rollout's sampled tokens (policy_gradient, kl_estimate): tests/test_policy_gradient.py
ROLLOUT_KINDS = tuple(kind.name for kind in built_in_loss_kinds() if _reads_rollout(kind))
#: loss kinds that compare the student with a target distribution
TARGET_KINDS = tuple(kind.name for kind in built_in_loss_kinds() if kind.takes_target and not _reads_rollout(kind))
#: target kinds that also take the `labels` source itself (hard labels)
LABEL_KINDS = tuple(
    kind.name
    for kind in built_in_loss_kinds()
    if kind.takes_target and kind.accepts_hard_labels and not _reads_rollout(kind)
)
#: loss kinds of the student alone
TARGETLESS_KINDS = tuple(kind.name for kind in built_in_loss_kinds() if not kind.takes_target)
#: source kinds only the rollout kinds read (tests/test_rollout_source.py and test_policy_gradient.py cover them)
ROLLOUT_SOURCE_KINDS = ("rollout",)
#: source kinds of targets the distribution kinds compare with
SOURCE_KINDS = tuple(kind.name for kind in built_in_source_kinds() if kind.name not in ROLLOUT_SOURCE_KINDS)


def takes_temperature(kind: str) -> bool:
    return "temperature" in next(k for k in built_in_loss_kinds() if k.name == kind).model.model_fields


# --------------------------------------------------------------------------------------------------
# Float64 formulas, written from docs/concepts.md and the kinds' docs (not from lossgraph's code).
# --------------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, from log-probs; 0 log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - torch.where(a > 0, log_b, 0.0)), 0.0).sum(-1)


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _cross_entropy(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return -torch.where(p > 0, p * torch.where(p > 0, log_q, 0.0), 0.0).sum(-1)


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = torch.log_softmax(logits / temperature, -1)
    return -torch.where(log_q.exp() > 0, log_q.exp() * log_q, 0.0).sum(-1)


@dataclass(frozen=True)
class TargetTruth:
    """A target kind's value per row, `value(log_p, log_q, **fields)` between two float64 distributions
    given as log-probs (log 0 = -inf): the target p and the student q."""

    value: Callable[..., torch.Tensor]
    #: fields a test sets on the node besides the defaults, with the values `value` takes (jsd: an
    #: asymmetric beta, so that p and q cannot be swapped unnoticed)
    fields: Mapping[str, float] = field(default_factory=dict)
    #: values a random graph draws each of those fields from
    field_choices: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    #: not differentiable where p_j = q_j (|p - q|): a gradcheck needs data without near-ties
    kinked: bool = False


@dataclass(frozen=True)
class TargetlessTruth:
    """A target-free kind's value per row, `value(logits, temperature)` in float64."""

    value: Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class RolloutTruth:
    """A rollout kind's value per token, `value(lq, advantages, old, ref, **fields)` in float64: lq the
    student's log-prob of the sampled token (with its gradient), old None for on-policy."""

    value: Callable[..., torch.Tensor]


def _policy_gradient(lq, advantages, old, ref, epsilon_low=0.2, epsilon_high=None, delta=None, objective="clip"):
    """TRL's per-token loss (grpo_trainer's _compute_loss, token-level importance sampling)."""
    high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(lq - (lq.detach() if old is None else old))
    if objective == "cispo":
        return -torch.clamp(ratio, max=high).detach() * advantages * lq
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return -torch.min(unclipped * advantages, clipped * advantages)


def _kl_estimate(lq, advantages, old, ref, estimator="k3"):
    d = ref - lq
    return {"k1": -d, "k2": d**2 / 2, "k3": torch.exp(d) - d - 1}[estimator]


TRUTH: dict[str, TargetTruth | TargetlessTruth | RolloutTruth] = {
    "cross_entropy": TargetTruth(_cross_entropy),
    "forward_kl": TargetTruth(lambda log_p, log_q: _kl(log_p, log_q)),
    "reverse_kl": TargetTruth(lambda log_p, log_q: _kl(log_q, log_p)),
    "jsd": TargetTruth(_jsd, fields={"beta": 0.3}, field_choices={"beta": (0.5, 0.1, 0.9)}),
    "tvd": TargetTruth(lambda log_p, log_q: 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), kinked=True),
    "z_loss": TargetlessTruth(lambda logits, temperature: torch.logsumexp(logits, -1) ** 2),  # no temperature
    "entropy": TargetlessTruth(_entropy),
    "policy_gradient": RolloutTruth(_policy_gradient),
    "kl_estimate": RolloutTruth(_kl_estimate),
}


def truth(kind: str) -> TargetTruth | TargetlessTruth | RolloutTruth:
    """The float64 formula of a built-in loss kind; a kind without one fails the test that asks."""
    if kind not in TRUTH:
        pytest.fail(
            f"loss kind {kind!r} is registered but tests/kind_table.py has no float64 formula for it: add a "
            f"TargetTruth (or TargetlessTruth) entry to TRUTH",
            pytrace=False,
        )
    return TRUTH[kind]


def target_value(kind: str, log_p: torch.Tensor, log_q: torch.Tensor, **fields: float) -> torch.Tensor:
    """A target kind's float64 value per row at the node's `fields`; a field of the table left out takes
    the default of the kind's model (what a node that does not set it gets)."""
    kind_truth = truth(kind)
    assert isinstance(kind_truth, TargetTruth), f"{kind} takes no target"
    model = next(k for k in built_in_loss_kinds() if k.name == kind).model
    defaults = {name: model.model_fields[name].default for name in kind_truth.fields}
    return kind_truth.value(log_p, log_q, **(defaults | fields))


def yaml_fields(kind: str) -> str:
    """The table's extra fields of `kind` as YAML flow-mapping entries (", beta: 0.3"), or ""."""
    found = truth(kind)
    return "".join(f", {name}: {value}" for name, value in getattr(found, "fields", {}).items())


def assert_covers_source_kinds(sources: Iterable[str], where: str) -> None:
    """Every registered built-in source kind appears (`type: KIND`) in one of the YAML texts `sources`:
    a test module's table of sources cannot leave a new source kind out by accident."""
    texts = list(sources)
    missing = [kind for kind in SOURCE_KINDS if not any(f"type: {kind}" in text for text in texts)]
    assert not missing, f"source kind(s) {missing} are registered but {where} has no case for them: add one"
