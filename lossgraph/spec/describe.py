"""Short human descriptions of spec values, shared by `show`, `viz` and `plan`."""

from __future__ import annotations

from ..kinds import loss_kind, source_kind
from .models import ConstantSchedule, LossGraphSpec


def number(value: float) -> str:
    return f"{value:g}"


def scheduled(value: object) -> str:
    """`0.5`, or `linear 0 -> 1 over 1000 steps after 100`."""
    if isinstance(value, (int, float)):
        return number(value)
    if isinstance(value, ConstantSchedule):
        return number(value.start)
    text = f"{value.schedule} {number(value.start)} -> {number(value.end)} over {value.steps} steps"
    return text + (f" after {value.warmup}" if value.warmup else "")


def source_summary(spec: LossGraphSpec, name: str) -> str:
    """One line describing a source, e.g. `mixture 0.7 teacher + 0.3 teacher2` (its kind's summary)."""
    source = spec.sources[name]
    return source_kind(source.type).summary(spec, name, source)


def loss_summary(spec: LossGraphSpec, name: str, head_index: int | None = None) -> str:
    """`forward_kl <- teacher, weight 0.5, T 2, teacher T 1, x T^2` for a loss node (optionally one of
    its heads)."""
    loss = spec.losses[name]
    text = loss.type
    target = getattr(loss, "target", None)
    if target:
        text += f" <- {target}"
    details = [f"weight {scheduled(loss.weight)}"]
    if head_index is not None and loss.head_weights:
        details.append(f"head weight {number(loss.head_weights[head_index])}")
    temperature = getattr(loss, "temperature", 1.0)
    if temperature != 1.0:
        details.append(f"T {scheduled(temperature)}")
    teacher_temperature = getattr(loss, "teacher_temperature", None)
    if teacher_temperature is not None:
        details.append(f"teacher T {scheduled(teacher_temperature)}")
    if getattr(loss, "temperature_scaling", False):
        details.append("x T^2")
    details += loss_kind(loss.type).details(loss)
    details += positions_details(loss)
    return f"{text}, {', '.join(details)}"


def positions_details(loss: object) -> list[str]:
    """A loss node's non-default positions and normalizer: `positions all, / own count`."""
    positions = loss.positions
    if positions == "targets":
        return []
    where = "all" if positions == "all" else f"mask {positions.mask}"
    by = "/ head's target count" if loss.normalizer == "targets" else "/ own count"
    return [f"positions {where}", by]
