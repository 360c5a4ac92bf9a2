"""A test-only leaf target form in one module: `token_pair`, a soft label made of two tokens per position.

At run time the call passes `teachers={"pair": TokenPair(ids, weight)}`: `ids [B, S, 2]` two token ids
and `weight [B, S]` in [0, 1], so that the target is p = w one-hot(ids[0]) + (1 - w) one-hot(ids[1]).
This is a new kind of run-time tensor for lossgraph: the module holds its source kind (validation),
its plan target (reference log-probabilities, kernel target), its kernel fragments (which read two
kernel arguments of their own) and its leaf form (input checks, kernel arguments). `register()` adds
it; nothing in lossgraph names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from lossgraph.kernels.fragments import TargetFragments
from pydantic import Field

from lossgraph.errors import InputError, quote
from lossgraph.kinds import (
    LeafForm,
    SourceKind,
    Target,
    register_leaf_form,
    register_source_kind,
    unregister_leaf_form,
    unregister_source_kind,
)
from lossgraph.spec.nodes import SourceNode

FORM_NAME = "token_pair"


class TokenPair(NamedTuple):
    """The run-time value: two token ids per position and the first one's weight."""

    ids: torch.Tensor  # [.., 2] integer token ids
    weight: torch.Tensor  # [..] floating, in [0, 1]


class TokenPairSource(SourceNode):
    """Two tokens per position, given at run time, mixed by a per-position weight."""

    type: Literal["token_pair"] = Field(description="Source kind.")


@dataclass(frozen=True)
class KTokenPair(TargetFragments):
    """In a kernel: w [j = a] + (1 - w) [j = b], from the row's pair (leaf `leaf` of the form)."""

    leaf: int

    def kernel_arguments(self):
        return (f"pair{self.leaf}_ids_ptr", f"pair{self.leaf}_weight_ptr")

    def p(self, k, slot):
        i = self.leaf
        first = k.cached(f"pair{i}_first", f"tl.load(pair{i}_ids_ptr + row * 2)")
        second = k.cached(f"pair{i}_second", f"tl.load(pair{i}_ids_ptr + row * 2 + 1)")
        weight = k.cached(f"pair{i}_weight", f"tl.load(pair{i}_weight_ptr + row)")
        ids = k.token_ids()
        return k.cached(
            f"p_pair{i}",
            f"tl.where(in_v & ({ids} == {first}), {weight}, 0.0) + "
            f"tl.where(in_v & ({ids} == {second}), 1.0 - {weight}, 0.0)",
        )

    def log_p(self, k, slot):
        return k.cached(f"logp_pair{self.leaf}", f"tl.log({self.p(k, slot)})")


@dataclass(frozen=True)
class TokenPairTarget(Target):
    """The pair's distribution over the graph's vocab."""

    vocab_size: int = 0
    form = FORM_NAME

    def read_bytes(self, head_vocab, vocab_override, logits_bytes):
        return 2 * 8 + 4  # two int64 ids and a float32 weight

    def kernel_target(self, index):
        return KTokenPair(index.positions[self.name])

    def log_probs(self, batch, vocab, temperature, dtype):
        pair = batch.sources[self.name]
        ids = torch.where(batch.mask[:, None], pair.ids, 0)
        weight = torch.where(batch.mask, pair.weight, 1.0).to(dtype)[:, None]
        p = torch.zeros((ids.shape[0], vocab), dtype=dtype, device=ids.device)
        p = p.scatter_add(1, ids[:, :1], weight).scatter_add(1, ids[:, 1:], 1.0 - weight)
        return p.log()


class TokenPairForm(LeafForm):
    name = FORM_NAME
    expects = "TokenPair(ids [B, S, 2] integers, weight [B, S] in [0, 1])"
    tensor_count = 2

    def value(self, name, target, value):
        if not isinstance(value, TokenPair):
            raise InputError(f"source {name!r} is a token_pair: pass {self.expects}, got {type(value).__name__}")
        return value

    def flatten(self, name, target, value, where):
        ids = where.positional(value.ids, f"TokenPair ids of {name!r}", (2,))
        weight = where.positional(value.weight, f"TokenPair weight of {name!r}", ())
        if not where.integer(ids):
            raise InputError(f"TokenPair ids of {name!r} must be integers, got {ids.dtype}")
        if not where.floating(weight):
            raise InputError(f"TokenPair weight of {name!r} must be floating, got {weight.dtype}")
        return TokenPair(ids.reshape(-1, 2).long(), weight.detach().reshape(-1).to(torch.float32))

    def check_values(self, name, target, value, mask, where):
        ids, weight = value.ids[mask], value.weight[mask]
        if bool(((ids < 0) | (ids >= target.vocab_size)).any()):
            raise InputError(f"TokenPair ids of {name!r} fall outside [0, {target.vocab_size})")
        outside = ~((weight >= 0) & (weight <= 1))
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            raise InputError(
                f"TokenPair weight of {name!r} at position {where.position(mask, row)} (flattened) is "
                f"{float(weight[row])!r}: a weight is the first token's probability, in [0, 1]"
            )

    def kernel_tensors(self, tensors, index):
        ids, weight = tensors
        return {f"pair{index}_ids_ptr": ids, f"pair{index}_weight_ptr": weight}


class TokenPairKind(SourceKind):
    name = "token_pair"
    model = TokenPairSource
    example = "pair: {type: token_pair}"

    def zero_mass_reason(self, name, source, member_reasons, spec):
        return f"{quote(name)} holds two tokens per position"

    def resolve(self, spec, name, source, inputs):
        return TokenPairTarget(name, spec.vocab_size)


KIND = TokenPairKind()
FORM = TokenPairForm()


def register() -> None:
    register_source_kind(KIND)
    register_leaf_form(FORM)


def unregister() -> None:
    unregister_leaf_form(FORM_NAME)
    unregister_source_kind(KIND.name)


def reference_value(logits: torch.Tensor, pair: TokenPair, temperature: float, kind: str) -> torch.Tensor:
    """The mean over positions of cross-entropy or forward KL against the pair, in float64, from the formula."""
    z = logits.double().reshape(-1, logits.shape[-1]) / temperature
    log_q = torch.log_softmax(z, -1)
    ids, w = pair.ids.reshape(-1, 2), pair.weight.reshape(-1).double()
    first, second = log_q.gather(1, ids[:, :1]).squeeze(1), log_q.gather(1, ids[:, 1:]).squeeze(1)
    same = ids[:, 0] == ids[:, 1]
    cross = torch.where(same, -first, -(w * first + (1 - w) * second))
    if kind == "cross_entropy":
        return cross.mean()

    def plogp(p):
        return torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)

    entropy = torch.where(same, 0.0, -(plogp(w) + plogp(1 - w)))
    return (cross - entropy).mean()
