"""rollout: sampled completions for reinforcement learning, a leaf form of its own.

At run time the call passes `teachers={name: Rollout(advantages, old_logprobs, ref_logprobs,
sequence_ids)}`. The sampled token of each position is the head's label there: the rollout rows'
labels are the completion tokens (prompt and padding positions carry `ignore_index`, or a 0 in
`loss_mask`). Every value is per position, indexed like the logits (position s, whose label is the
token sampled after it), and not split over the vocab: under vocab parallel every rank passes all of
it. The loss kinds that read a rollout (`policy_gradient`, `kl_estimate`) get its per-row values in the
kernel through `KRollout` and in the reference through `RolloutTarget.rows`.

A term that aggregates per sequence (`policy_gradient`'s `sequence_mean` and `constant`) is a term
group of its own: `RolloutForm.group_weights` gives its rows' weights and its total (the sequences)
on the device, without a host synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import Field

from ...errors import InputError, quote
from ...kernels.fragments import TargetFragments
from ...spec.nodes import SourceNode
from ..form import LeafForm
from ..registry import source_kind
from ..source import SourceKind, Target

if TYPE_CHECKING:
    import torch

FORM_NAME = "rollout"

#: stored log-probs may round a little above 0 (as top-k teachers' may)
LOGPROB_SLACK = 1e-3


class Rollout(NamedTuple):
    """Sampled completions at run time (`teachers={source: Rollout(...)}`), indexed like the logits.

    advantages: [B, S] per token, or [B] per batch row (broadcast over its positions); [N] for flat logits.
    old_logprobs: [B, S] the behaviour policy's log-prob of each sampled token (the label), at the loss
    node's temperature; only for a source that declares `old_logprobs: true` (else the step is on-policy).
    ref_logprobs: [B, S] the reference model's log-prob of each sampled token; only for a source that
    declares `ref_logprobs: true`.
    sequence_ids: [B, S] integers, each sequence one contiguous run of one id within a batch row (packed
    sequences); None: the call's `document_ids` (each document a sequence), else each batch row is one
    sequence."""

    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None


class RolloutRows(NamedTuple):
    """A rollout as a head's batch keeps it: float32 [N] values, and each position's sequence as a run
    index 0, 1, ... (`runs`, nondecreasing), with the given ids and batch rows for the value checks."""

    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    runs: torch.Tensor
    sequence_ids: torch.Tensor | None
    batch_rows: torch.Tensor | None


class RolloutSource(SourceNode):
    """Sampled completions (reinforcement learning): per token the advantage, and optionally the behaviour
    and reference policies' log-probs of the sampled token; the sampled tokens are the labels."""

    type: Literal["rollout"] = Field(description="Source kind.")
    old_logprobs: bool = Field(
        False,
        description=(
            "The call passes the behaviour policy's log-probs (`Rollout(old_logprobs=...)`): the importance "
            "ratio is exp(log q - old). Without them the step is on-policy: the ratio is 1, with its gradient."
        ),
    )
    ref_logprobs: bool = Field(
        False,
        description="The call passes the reference model's log-probs (`Rollout(ref_logprobs=...)`), for `kl_estimate`.",
    )


@dataclass(frozen=True)
class KRollout(TargetFragments):
    """In a kernel: the rollout's per-row values (leaf `leaf` of the form), for the kinds that read a
    rollout; the sampled token is the row's label."""

    leaf: int
    old_logprobs: bool
    ref_logprobs: bool

    reads_labels = True

    def kernel_arguments(self):
        i = self.leaf
        return (f"rollout{i}_advantage_ptr", f"rollout{i}_old_ptr", f"rollout{i}_ref_ptr")

    def kernel_argument_types(self):
        return dict.fromkeys(self.kernel_arguments(), "*fp32")

    def advantage(self, k) -> str:
        """A per-row local holding the row's advantage."""
        k.emit(f"advantage = tl.load(rollout{self.leaf}_advantage_ptr + row)")
        return "advantage"

    def old_logprob(self, k) -> str:
        """A per-row local holding the behaviour policy's log-prob of the label (only with old_logprobs)."""
        k.emit(f"old_logprob = tl.load(rollout{self.leaf}_old_ptr + row)")
        return "old_logprob"

    def ref_logprob(self, k) -> str:
        """A per-row local holding the reference model's log-prob of the label (only with ref_logprobs)."""
        k.emit(f"ref_logprob = tl.load(rollout{self.leaf}_ref_ptr + row)")
        return "ref_logprob"


@dataclass(frozen=True)
class RolloutTarget(Target):
    """Sampled completions: the labels are the sampled tokens, the rest per position."""

    old_logprobs: bool = False
    ref_logprobs: bool = False
    form = FORM_NAME

    def read_bytes(self, head_vocab, vocab_override, logits_bytes):
        return 4 * (1 + self.old_logprobs + self.ref_logprobs)  # float32 values per position

    def kernel_target(self, index):
        return KRollout(index.positions[self.name], self.old_logprobs, self.ref_logprobs)

    def rows(self, batch, dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Reference: (advantages, old log-probs or None, reference log-probs or None) [N] in `dtype`, 0
        where the batch's mask is False (a masked row's value never reaches a gradient as NaN)."""
        import torch

        value = batch.sources[self.name]

        def kept(tensor):
            return None if tensor is None else torch.where(batch.mask, tensor.to(dtype), 0.0)

        return kept(value.advantages), kept(value.old_logprobs), kept(value.ref_logprobs)


class RolloutForm(LeafForm):
    """At run time: `Rollout(advantages, old_logprobs, ref_logprobs, sequence_ids)`; the batch keeps
    `RolloutRows`."""

    name = FORM_NAME
    expects = "lossgraph.Rollout(advantages, old_logprobs=None, ref_logprobs=None, sequence_ids=None)"
    tensor_count = 4  # advantages, old and reference log-probs, and the runs (for row inputs across rows)

    def value(self, name, target, value):
        if not isinstance(value, Rollout):
            raise InputError(f"source {name!r} is a rollout: pass {self.expects}, got {type(value).__name__}")
        return value

    def flatten(self, name, target, value, where):
        import torch

        lead = where.lead
        advantages = where.tensor(value.advantages, f"Rollout advantages of {name!r}")
        if len(lead) == 2 and tuple(advantages.shape) == lead[:1]:  # one advantage per batch row
            advantages = advantages[:, None].expand(lead)
        advantages = self._values(name, "advantages", advantages, where, "[B, S] per token or [B] per batch row")
        logprobs = {}
        for field in ("old_logprobs", "ref_logprobs"):
            given, declared = getattr(value, field), getattr(target, field)
            if declared and given is None:
                raise InputError(
                    f"source {name!r} declares {field}: true, but Rollout.{field} is None; pass them ({list(lead)} "
                    f"log-probs of the sampled tokens), or set {field}: false on the source"
                )
            if given is not None and not declared:
                raise InputError(
                    f"Rollout.{field} given for source {name!r}, which does not declare them; set {field}: true on "
                    "the source, or leave them out"
                )
            logprobs[field] = None if given is None else self._values(name, field, given, where, "[B, S]")
        ids, batch_rows = None, None
        if value.sequence_ids is not None:
            ids = where.positional(value.sequence_ids, f"Rollout sequence_ids of {name!r}", ())
            if not where.integer(ids):
                raise InputError(f"Rollout sequence_ids of {name!r} must be integers, got {ids.dtype}")
        elif where.document_ids is not None:  # packed documents: each document is a sequence
            ids = where.document_ids
        # a run starts at each batch row's first position and wherever the id changes
        width = max(lead[-1], 1)  # no positions: no runs
        starts = torch.zeros(lead, dtype=torch.bool, device=where.device)
        starts.reshape(-1, width)[:, :1] = True
        if ids is not None:
            rows = ids.reshape(-1, width)
            starts.reshape(-1, width)[:, 1:] |= rows[:, 1:] != rows[:, :-1]
            ids = ids.reshape(-1).long()
            positions = torch.arange(ids.numel(), device=where.device)
            batch_rows = positions // width
        runs = starts.reshape(-1).long().cumsum(0) - 1
        return RolloutRows(advantages, logprobs["old_logprobs"], logprobs["ref_logprobs"], runs, ids, batch_rows)

    @staticmethod
    def _values(name: str, field: str, tensor: Any, where, shape: str) -> torch.Tensor:
        """A per-position floating tensor, detached, as float32 [N]."""
        import torch

        tensor = where.tensor(tensor, f"Rollout {field} of {name!r}")
        if tuple(tensor.shape) != tuple(where.lead):
            raise InputError(
                f"Rollout {field} of {name!r} has shape {tuple(tensor.shape)}; the logits cover positions "
                f"{tuple(where.lead)}: pass {shape}"
            )
        if tensor.device != where.device:
            raise InputError(f"Rollout {field} of {name!r} is on {tensor.device}, the logits on {where.device}")
        if not where.floating(tensor):
            raise InputError(f"Rollout {field} of {name!r} must be floating, got {tensor.dtype}")
        return tensor.detach().reshape(-1).to(torch.float32)

    def check_values(self, name, target, value, mask, where):
        import torch

        bad = ~torch.isfinite(value.advantages[mask])
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise InputError(
                f"Rollout advantages of {name!r} at position {where.position(mask, row)} (flattened) is "
                f"{float(value.advantages[mask][row])!r}: advantages must be finite"
            )
        for field in ("old_logprobs", "ref_logprobs"):
            logprobs = getattr(value, field)
            if logprobs is None:
                continue
            used = logprobs[mask]
            bad = ~(torch.isfinite(used) & (used <= LOGPROB_SLACK))
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise InputError(
                    f"Rollout {field} of {name!r} at position {where.position(mask, row)} (flattened) is "
                    f"{float(used[row])!r}: a sampled token's log-prob is finite and <= 0"
                )
        if value.sequence_ids is not None:
            _check_runs(name, value)

    def rows(self, value, start, stop):
        return RolloutRows(*(None if part is None else part[start:stop] for part in value))

    def tensors(self, value):
        # an absent value's pointer is never read (KRollout knows which exist): it reuses the advantages'
        advantages = value.advantages.contiguous()
        old = advantages if value.old_logprobs is None else value.old_logprobs.contiguous()
        ref = advantages if value.ref_logprobs is None else value.ref_logprobs.contiguous()
        return advantages, old, ref, value.runs

    def kernel_tensors(self, tensors, index):
        advantages, old, ref, _ = tensors
        return {
            f"rollout{index}_advantage_ptr": advantages,
            f"rollout{index}_old_ptr": old,
            f"rollout{index}_ref_ptr": ref,
        }

    def group_weights(self, value, mask, weight, aggregation, constant):
        """`sequence_mean`: each position weighs 1 / (its sequence's positions in the group), the total is the
        number of sequences; `constant`: each position weighs 1, the total is `constant` x sequences. Every
        run of the rollout counts as a sequence, one whose positions are all masked too (it adds 0), as
        TRL's mean over the batch's completions does."""
        import torch

        row = mask.to(torch.float32) if weight is None else torch.where(mask, weight, 0.0)
        sequences = (value.runs[-1:] + 1).sum().to(torch.float32)  # 0-d, 0 for no positions, no sync
        if aggregation == "constant":
            return row, sequences * constant
        per_sequence = torch.zeros_like(row).scatter_add(0, value.runs, row)[value.runs]
        return torch.where(per_sequence > 0, row / per_sequence, 0.0), sequences


def _check_runs(name: str, value: RolloutRows) -> None:
    """Each sequence id is one contiguous run within its batch row: an id that comes back after another
    is an InputError at the position where it comes back."""
    import torch

    starts = torch.ones_like(value.runs, dtype=torch.bool)
    starts[1:] = value.runs[1:] != value.runs[:-1]
    keys = torch.stack([value.batch_rows[starts], value.sequence_ids[starts]], 1)
    if torch.unique(keys, dim=0).shape[0] == keys.shape[0]:
        return
    positions = starts.nonzero()[:, 0].tolist()
    seen = set()
    for position, key in zip(positions, map(tuple, keys.tolist())):
        if key in seen:
            raise InputError(
                f"Rollout sequence_ids of {name!r}: sequence {key[1]} of batch row {key[0]} comes back at position "
                f"{position} (flattened) after another sequence; each sequence is one contiguous run of positions"
            )
        seen.add(key)


class RolloutKind(SourceKind):
    name = "rollout"
    model = RolloutSource
    example = "rollouts: {type: rollout, old_logprobs: true, ref_logprobs: true}"
    checks = (
        "The graph has a `labels` source: the sampled tokens are the labels.",
        "Only the kinds that read a rollout (`policy_gradient`, `kl_estimate`) may target it; `kl_estimate` "
        "needs `ref_logprobs: true`.",
        "The losses that read it are bound to heads with offset 1 (the sampled token is the next one).",
        "At run time (located `InputError`s): the values' shapes match the logits; advantages are finite; "
        "log-probs are finite and <= 0; each sequence id is one contiguous run.",
    )
    note = (
        "Pass `teachers={name: lossgraph.Rollout(advantages, old_logprobs, ref_logprobs, sequence_ids)}`, indexed "
        "like the logits: position s holds the advantage and log-probs of its label, the token sampled after it. "
        "See [rl.md](rl.md)."
    )

    #: the loss model's class attributes that say it reads a rollout, and that it needs reference log-probs
    READS = "reads_rollout"
    #: the loss model's property that says its rows depend on other rows (GSPO, the entropy quantile)
    ACROSS_ROWS = "across_rows"
    NEEDS_REFERENCE = "needs_reference_logprobs"

    def summary(self, spec, name, source):
        given = [field for field in ("old_logprobs", "ref_logprobs") if getattr(source, field)]
        return "rollout" + (f" ({', '.join(given)})" if given else " (on-policy)")

    def check(self, name, source, spec):
        problems = []
        if not any(source_kind(other.type).provides_labels for other in spec.sources.values()):
            problems.append(
                ((), f"rollout {quote(name)} reads the sampled tokens as the labels; declare a labels source")
            )
        for loss_name, loss in spec.losses.items():
            if getattr(loss, "target", None) != name:
                continue
            for head in loss.heads:
                if head not in spec.heads:
                    continue
                # the values are per sampled token, the one a position's next-token head predicts: a head
                # further ahead would pair them with other tokens' labels
                if spec.heads[head].offset != 1:
                    problems.append(
                        (
                            (),
                            f"rollout {quote(name)} holds values of the sampled next tokens, but loss "
                            f"{quote(loss_name)} reads it on head {quote(head)} (offset {spec.heads[head].offset}); "
                            "bind it to heads with offset 1",
                        )
                    )
                if getattr(loss, self.ACROSS_ROWS, False) and spec.heads[head].input == "hidden":
                    problems.append(
                        (
                            (),
                            f"loss {quote(loss_name)} relates the rows of rollout {quote(name)} (a sequence's ratio "
                            f"or a quantile over the batch), which head {quote(head)} (input: hidden) evaluates "
                            "chunk by chunk; give that head its logits (input: logits), or use token-level options",
                        )
                    )
        return problems

    def check_loss(self, name, source, loss):
        model = type(loss)
        if not getattr(model, self.READS, False):
            return [
                (
                    "target",
                    f"{quote(name)} is a rollout (advantages of sampled tokens), which {loss.type} cannot compare "
                    "with; use policy_gradient or kl_estimate, or target the labels",
                )
            ]
        if getattr(model, self.NEEDS_REFERENCE, False) and not source.ref_logprobs:
            return [
                (
                    "target",
                    f"{loss.type} reads the reference model's log-probs, but rollout {quote(name)} declares none; "
                    "set ref_logprobs: true on it and pass Rollout(..., ref_logprobs=...)",
                )
            ]
        return []

    def mixture_member_problem(self, name):
        return f"{quote(name)} is a rollout, not a distribution"

    def zero_mass_reason(self, name, source, member_reasons, spec):
        return f"{quote(name)} is a rollout, not a distribution"

    def resolve(self, spec, name, source, inputs):
        return RolloutTarget(name, source.old_logprobs, source.ref_logprobs)


KIND = RolloutKind()
FORM = RolloutForm()
