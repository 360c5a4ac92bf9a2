"""mixture: a weighted average of other sources' distributions (an ensemble of teachers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ...errors import quote
from ...kernels.fragments import TargetFragments
from ...kernels.scope import operand
from ...spec.nodes import MAX_MIXTURE_PARTS, Name, Probability, SourceNode
from ..registry import source_kind
from ..source import Member, SourceKind, Target

# Mixture weights are probabilities written in decimal; their sum may miss 1 by rounding.
WEIGHT_TOLERANCE = 1e-6


class MixtureSource(SourceNode):
    """A weighted average of the distributions of other sources (an ensemble of teachers)."""

    type: Literal["mixture"] = Field(description="Source kind.")
    sources: list[Name] = Field(
        min_length=2, description="The sources to mix (teachers, labels, smoothed labels, mixtures)."
    )
    weights: list[Probability] | None = Field(
        None, description="One weight in [0, 1] per source, summing to 1; equal weights when omitted."
    )


@dataclass(frozen=True)
class KMixture(TargetFragments):
    """In a kernel: sum of weight x part."""

    parts: tuple[tuple[float, TargetFragments], ...]

    @property
    def reads_labels(self) -> bool:
        return any(part.reads_labels for _, part in self.parts)

    def dense_teachers(self):
        return tuple(t for _, part in self.parts for t in part.dense_teachers())

    def kernel_arguments(self):
        return tuple(dict.fromkeys(name for _, part in self.parts for name in part.kernel_arguments()))

    def p(self, k, slot):
        # each part's expression as one operand: a plugin form's p may be a sum
        parts = " + ".join(f"{weight!r} * {operand(part.p(k, slot))}" for weight, part in self.parts)
        return k.cached(f"p_mix{k.constant_id(self)}_{slot}", parts)

    def log_p(self, k, slot):
        # log sum_i w_i p_i from the parts' exact log-probabilities: log of the summed probabilities
        # would be -inf wherever every part underflows, while the terms need the true (finite) value
        parts = [f"{math.log(weight)!r} + {operand(part.log_p(k, slot))}" for weight, part in self.parts if weight > 0]
        total = parts[0]
        for part in parts[1:]:
            total = f"log_add_exp({total}, {part})"
        return k.cached(f"logp_mix{k.constant_id(self)}_{slot}", total)


@dataclass(frozen=True)
class MixtureTarget(Target):
    """Sum of weight x distribution over the parts."""

    parts: tuple[tuple[float, Target], ...] = ()

    def leaves(self):
        return [leaf for _, part in self.parts for leaf in part.leaves()]

    def kernel_target(self, index):
        return KMixture(tuple((weight, part.kernel_target(index)) for weight, part in self.parts))

    def log_probs(self, batch, vocab, temperature, dtype):
        import torch

        parts = [
            math.log(weight) + part.log_probs(batch, vocab, temperature, dtype)
            for weight, part in self.parts
            if weight > 0
        ]
        return torch.logsumexp(torch.stack(parts), dim=0)

    def rows_finite(self, batch, vocab):
        import torch

        parts = [part.rows_finite(batch, vocab) for _, part in self.parts]
        parts = [part for part in parts if part is not None]
        return torch.stack(parts).all(0) if parts else None


class Mixture(SourceKind):
    name = "mixture"
    model = MixtureSource
    example = "ensemble: {type: mixture, sources: [big, code], weights: [0.7, 0.3]}"
    note = (
        "The target is p = Σ_i w_i p_i over the listed sources, each at the loss node's temperature. "
        "Hard labels count as a one-hot distribution."
    )

    checks = (
        "Every name in `sources` must be a declared source, listed once; derived sources may not form a cycle.",
        "`weights`: one per source, each >= 0, summing to 1 (within 1e-6).",
        f"Expanded through the mixtures it contains, a mixture reads at most {MAX_MIXTURE_PARTS} teacher and "
        "label distributions.",
    )

    def members(self, source):
        weights = source.weights or [1.0 / len(source.sources)] * len(source.sources)
        return [
            Member(name, ("sources", i), weights[i] if i < len(weights) else None)
            for i, name in enumerate(source.sources)
        ]

    def summary(self, spec, name, source):
        return "mixture " + " + ".join(f"{m.weight:.3g} {m.name}" for m in self.members(source) if m.weight is not None)

    def check(self, name, source, spec):
        problems = []
        members = self.members(source)
        for member in members:
            inner = spec.sources.get(member.name)
            problem = None if inner is None else source_kind(inner.type).mixture_member_problem(member.name)
            if problem:
                problems.append((member.path, problem))
        if len({m.name for m in members}) != len(members):
            problems.append((("sources",), "a source is listed twice; list it once and add up its weights"))
        return problems

    def check_fields(self, name, source):
        if source.weights is None:
            return []
        if len(source.weights) != len(source.sources):
            count = len(source.sources)
            return [
                (
                    ("weights",),
                    f"{len(source.weights)} weights for {count} source{'s' if count != 1 else ''}; "
                    "give one weight per source",
                )
            ]
        total = math.fsum(source.weights)  # each weight is in [0, 1] (the schema checks it)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            return [(("weights",), f"weights sum to {total:g}; they must sum to 1")]
        return []

    def zero_mass_reason(self, name, source, member_reasons, spec):
        weighted = [member.name for member in self.members(source) if member.weight]
        if not weighted or not all(member_reasons.get(member) for member in weighted):
            return None
        # A nested mixture is named, not spelled out, so that the message stays short.
        parts = [
            f"mixture {quote(member)} does" if spec.sources[member].type == self.name else member_reasons[member]
            for member in dict.fromkeys(weighted)
        ]
        return f"every part of mixture {quote(name)} does ({'; '.join(parts)})"

    def resolve(self, spec, name, source, inputs):
        return MixtureTarget(name, tuple((weight, part) for weight, part in inputs if weight is not None))


KIND = Mixture()
