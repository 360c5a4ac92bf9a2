"""Evaluating a weight or temperature (a number or a schedule) at a training step. Pure Python."""

from __future__ import annotations

import math

from .nodes import ConstantSchedule, CosineSchedule, LinearSchedule, StepSchedule


def temperature_key(value: object) -> tuple[str, object]:
    """Equal keys mean equal temperatures at every step: the same constant, or the same schedule."""
    if isinstance(value, (int, float)):
        return ("constant", float(value))
    if isinstance(value, ConstantSchedule):
        return ("constant", float(value.start))
    return ("schedule", value)


FIXED_ONE = ("constant", 1.0)


def evaluate(value: float | ConstantSchedule | LinearSchedule | CosineSchedule | StepSchedule, step: int) -> float:
    """The value at `step` (>= 0).

    With frac = clamp((step - warmup) / steps, 0, 1): linear gives start + (end - start) * frac,
    cosine start + (end - start) * (1 - cos(pi * frac)) / 2, step gives `end` once frac reaches 1
    and `start` before; a constant is always `start`.
    """
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, ConstantSchedule):
        return value.start
    frac = min(max((step - value.warmup) / value.steps, 0.0), 1.0)
    if isinstance(value, LinearSchedule):
        shape = frac
    elif isinstance(value, CosineSchedule):
        shape = (1.0 - math.cos(math.pi * frac)) / 2.0
    else:
        shape = 1.0 if frac >= 1.0 else 0.0
    return value.start + (value.end - value.start) * shape


def fixed_at_one(temperature: object) -> bool:
    """True when a temperature is the constant 1 (a number or a constant schedule)."""
    return temperature_key(temperature) == FIXED_ONE
