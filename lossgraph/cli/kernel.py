"""`lossgraph kernel`: the generated Triton source of a graph's fused launches (pure Python: no torch)."""

from __future__ import annotations

from dataclasses import dataclass


class KernelSelectionError(Exception):
    """--head, --launch or --phase selects no launch; the message names the choices."""


@dataclass(frozen=True)
class KernelSource:
    head: str
    launch: int  # 1-based, as `lossgraph plan` numbers a head's launches
    launches: int  # the head's launches
    phase: str
    source: str

    def header(self) -> str:
        return f"# ===== head {self.head}, launch {self.launch} of {self.launches}, phase {self.phase} ====="


def kernel_sources(
    fusion, head: str | None = None, phase: str = "single", launch: int | None = None
) -> list[KernelSource]:
    """The source of every selected launch of a compiled graph (`context.fusion`), in plan order.

    `head` and `launch` (1-based) narrow the launches; `phase` picks the kernel each prints. Phase
    "reduce" exists only for launches whose terms need a second read of the row (pass 2): the others
    are left out, and a selection with none of them is an error.
    """
    from ..errors import KindError
    from ..kernels.codegen import PHASES, KernelGenerator
    from ..kernels.fragments import FragmentError
    from ..kernels.layout import kernel_layout

    if phase not in PHASES:
        raise KernelSelectionError(f"unknown phase {phase!r}; choose one of: {', '.join(PHASES)}")
    counts: dict[str, int] = {}
    for item in fusion.launches:
        counts[item.head] = counts.get(item.head, 0) + 1
    if head is not None and head not in counts:
        raise KernelSelectionError(f"unknown head {head!r}; the graph's heads are: {', '.join(counts)}")
    chosen = [item for item in fusion.launches if head in (None, item.head)]
    if launch is not None:
        chosen = [item for item in chosen if item.index + 1 == launch]
        if not chosen:
            have = ", ".join(f"{name} {n}" for name, n in counts.items() if head in (None, name))
            raise KernelSelectionError(f"no launch {launch}; launches per head: {have} (--launch counts from 1)")
    specs = [(item, item.kernel_spec()) for item in chosen]
    if phase == "reduce":
        specs = [(item, spec) for item, spec in specs if kernel_layout(spec).reduction_terms]
        if not specs:
            raise KernelSelectionError(
                "no selected launch has a reduce phase (only a launch whose terms need row sums from a second "
                "read of the row has one); choose one of: single, stats, apply"
            )
    try:
        return [
            KernelSource(item.head, item.index + 1, counts[item.head], phase, KernelGenerator(spec, phase).source())
            for item, spec in specs
        ]
    except FragmentError as error:  # a kind's fragments would miscompile: a clean message, not a traceback
        raise KindError(str(error)) from None
