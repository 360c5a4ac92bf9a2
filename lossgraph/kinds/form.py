"""What a leaf target form is: the run-time value a leaf source reads, and everything lossgraph does with
it outside the plan.

A leaf source (labels, a dense teacher, a top-k teacher, or a plugin's own) resolves into a plan
`Target` whose `form` names a registered `LeafForm`. The form owns its run-time value end to end:

- the input checks (`value`, `flatten`, `check_values`): the Python type of what the call passes, its
  shapes, dtypes and devices (always), and its values (when the call checks values), as located
  `InputError`s that name the source;
- how a block of rows is taken (`rows`) and how the reference sees it under vocab parallel
  (`whole_vocab`);
- the kernel arguments it contributes to a fused launch (`kernel_tensors`: pointers, strides, sizes),
  the same names its kernel target (`kernels.fragments.TargetFragments.kernel_arguments`) reads;
- the teacher's own prediction for the metrics (`prediction`).

The target (`source.Target`) adds the rest: its kernel target and the reference's log-probabilities.
A new leaf form is one module holding its source kind, its target and its `LeafForm`, registered with
`register_source_kind` and `register_leaf_form`. The runtime reaches forms only through this interface
(`runtime.inputs` hands them a `FormInputs`); the kinds import no torch, so forms import it where they
use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    from .source import Target


class FormInputs(Protocol):
    """The call as a leaf form sees it while its value is checked (`runtime.inputs` builds it)."""

    #: the positions of the call: (B, S) or (N,), the leading shape every per-position tensor shares
    lead: tuple[int, ...]
    #: the logits' device
    device: torch.device
    #: the head the value is laid out for
    head: str
    #: under vocab parallel, which columns this rank holds (`runtime.parallel.VocabShard`); else None
    shard: Any
    #: the head takes hidden states (`input: hidden`): its logits, and a Linear teacher's, exist chunk by chunk
    hidden_input: bool
    #: the call's `document_ids` ([B, S], the document of each position), or None when it gave none
    document_ids: torch.Tensor | None

    def floating(self, tensor: torch.Tensor) -> bool:
        """The tensor holds float16, bfloat16, float32 or float64."""

    def integer(self, tensor: torch.Tensor) -> bool:
        """The tensor holds a signed or unsigned integer type."""

    def tensor(self, value: Any, what: str) -> torch.Tensor:
        """`value` if it is a tensor, else an InputError naming `what`."""

    def positional(self, value: Any, what: str, trailing: tuple[int, ...]) -> torch.Tensor:
        """A tensor of shape (*lead, *trailing) on the logits' device, else an InputError naming `what`."""

    def linear(self, value: Any, what: str, vocab: int) -> Any:
        """A checked `lossgraph.Linear` of output size `vocab` over the call's positions, flattened to [N, H]."""

    def local(self, value: Any, name: str, vocab: int) -> Any:
        """Source `name`'s tensor of `vocab` columns given as a DTensor, as this rank's local tensor
        (checked against the head's split); any other value as is."""

    def position(self, mask: torch.Tensor, row: int) -> int:
        """The flattened position of the `row`-th row of `mask` (for messages)."""


class LeafForm:
    """One leaf target form. Subclass it in the source kind's module and register an instance with
    `register_leaf_form`; the defaults describe a form whose value is a tensor (or a NamedTuple of
    tensors) with positions first."""

    #: the form's name: the `form` of its targets
    name: ClassVar[str]
    #: the call passes the value in `teachers={source: value}` (the labels' form takes `labels=` instead)
    takes_value: ClassVar[bool] = True
    #: what the call passes, for messages: "a logits tensor [B, S, V]", ...
    expects: ClassVar[str] = ""
    #: the form has a prediction of its own (the teacher's argmax, for the metrics)
    predicts: ClassVar[bool] = False
    #: how many tensors `tensors` gives (the fused op carries them in one flat list)
    tensor_count: ClassVar[int] = 1

    def value(self, name: str, target: Target, value: Any) -> Any:
        """The value the call passed for source `name`, if its Python type is right (a callable
        already called); else an InputError that says what to pass."""
        return value

    def flatten(self, name: str, target: Target, value: Any, where: FormInputs) -> Any:
        """The value as a head's batch keeps it, positions flattened to N rows: shapes, dtypes and
        devices checked (always, without reading values)."""
        raise NotImplementedError(f"leaf form {self.name!r} takes no run-time value")

    def check_values(self, name: str, target: Target, value: Any, mask: torch.Tensor, where: FormInputs) -> None:
        """Checks that read values (they synchronize with the device): only the rows where `mask` is True."""

    def rows(self, value: Any, start: int, stop: int) -> Any:
        """Rows [start, stop) of a batch's value."""
        if hasattr(value, "_fields"):  # a NamedTuple of tensors
            return type(value)(*(part[start:stop] for part in value))
        return value[start:stop]

    def tensors(self, value: Any) -> tuple[torch.Tensor, ...]:
        """The batch's value as the fused op carries it: `tensor_count` tensors, each with unit stride
        on its last dimension."""
        parts = tuple(value) if hasattr(value, "_fields") else (value,)
        return tuple(part.contiguous() for part in parts)

    def kernel_tensors(self, tensors: tuple[torch.Tensor, ...], index: int) -> dict[str, object]:
        """The kernel arguments of the leaf (its `tensors`) as the launch's `index`-th leaf of this form:
        the names its kernel target reads (`TargetFragments.kernel_arguments`) bound to tensors, strides
        and sizes."""
        return {}

    def whole_vocab(self, value: Any, gather: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """The value over the whole vocab from this rank's part under vocab parallel, for the reference
        backend, which computes on whole rows: `gather` concatenates every rank's columns of an [N, columns]
        tensor (differentiably). A value that is not split over the vocab is returned as is."""
        return value

    def group_weights(
        self, value: Any, mask: torch.Tensor, weight: torch.Tensor | None, aggregation: str, constant: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a term group that aggregates over this leaf's value (`compiler.plan.TermGroup.aggregation`,
        asked by its loss kind's `LossKind.aggregation`): [N] float32 weights of the rows (0 where `mask` is
        False; `weight` the rows' own, or None for 1) and the 0-d float32 total the group's sum is divided
        by, which `normalize_across` sums over the ranks. On the device, without a host synchronization."""
        raise NotImplementedError(f"leaf form {self.name!r} aggregates no term group")

    def prediction(self, value: Any, vocab: int) -> torch.Tensor | None:
        """[N] the source's own argmax token over a head's `vocab` (for the metrics), or None."""
        return None

    def __repr__(self) -> str:
        return f"<leaf form {self.name}>"
