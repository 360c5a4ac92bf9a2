"""Short human descriptions of spec values, shared by `show`, `viz` and `plan`."""

from __future__ import annotations

from ..compiler.graph import source_members
from .models import ConstantSchedule, LossGraphSpec, MixtureSource


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
    """One line describing a source, e.g. `mixture 0.7 teacher + 0.3 teacher2`."""
    source = spec.sources[name]
    if source.type == "labels":
        return f"labels (ignore_index {source.ignore_index})"
    if source.type in ("teacher", "topk_teacher"):
        parts = [f"offset {source.offset}", f"vocab {spec.source_vocab(name)}"]
        if source.type == "topk_teacher":
            parts.insert(0, f"k {source.k}, tail {source.tail}")
        if source.vocab_map:
            parts.append(f"vocab_map {source.vocab_map}")
        return f"{source.type} ({', '.join(parts)})"
    members = source_members(source)
    if source.type == "label_smoothing":
        return f"label_smoothing of {members[0].name} (epsilon {number(source.epsilon)})"
    if isinstance(source, MixtureSource):
        return "mixture " + " + ".join(f"{m.weight:.3g} {m.name}" for m in members if m.weight is not None)
    return source.type


def loss_summary(spec: LossGraphSpec, name: str, head_index: int | None = None) -> str:
    """`forward_kl <- teacher, weight 0.5, T 2 (x T^2)` for a loss node (optionally one of its heads)."""
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
    if getattr(loss, "temperature_scaling", False):
        details.append("x T^2")
    if loss.type == "jsd":
        details.append(f"beta {number(loss.beta)}")
    return f"{text}, {', '.join(details)}"
