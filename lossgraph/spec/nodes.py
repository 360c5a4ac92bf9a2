"""The building blocks of the version-1 loss-graph contract as pydantic models: ranges of numbers,
schedules, heads, sources and the fields every loss node has.

With the loss kinds' own models (one module each under lossgraph/kinds/) and the document model in
`lossgraph.spec.models`, this is the single source of truth for what a loss-graph YAML file may
contain: the loader validates documents against it, `lossgraph schema` exports it as JSON Schema and
`docs/yaml-reference.md` is generated from it. It imports no torch: validating a file must stay
cheap and must work on machines without a GPU stack.

The *shape* of a document is checked here (types, ranges, unknown keys), and so are the rules of a
loss node that look at one of its fields (a negative weight, the number of head_weights, a
temperature schedule's ends): pydantic reports them all together. Every number has a range that the
kernels and float32 arithmetic honour, so a file that validates cannot overflow at run time; the
ranges appear in the JSON Schema and in docs/yaml-reference.md. Everything that relates one part of
the graph to another (references, vocab agreement, offsets, cycles, mixture weights, schedules that
make sense) is checked by the compiler passes in `lossgraph.compiler.passes`, once the shape is right.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

Name = Annotated[
    str,
    Field(pattern=NAME_PATTERN, description="A name declared elsewhere in the graph (an identifier)."),
]

# --------------------------------------------------------------------------------------------------
# Ranges of numbers. Each reaches far beyond what real graphs use.
# --------------------------------------------------------------------------------------------------

# The kernels compute with V (and token ids) in float32 (epsilon / V for label smoothing), which holds
# every integer up to 2^24 exactly; the largest vocabularies in use are about 2^18.
MAX_VOCAB_SIZE = 2**24
# Multi-token prediction heads use offsets 2 to 8 or so.
MAX_OFFSET = 4096
# The fused kernel holds the k stored tokens of a row in one block (k rounded up to a power of two);
# stored top-k teachers keep tens to hundreds.
MAX_TOPK = 2**16
# weight x head weight x T^2 (both weights <= 1e6, T^2 <= 1e6) stays below 1e18, so float32 sums of the
# terms (max 3.4e38) cannot overflow.
MAX_WEIGHT = 1e6
# Logits are divided by the temperature in float32: below 1e-3 they grow more than 1000-fold, and
# above 1e3 the T^2 of temperature_scaling would exceed the weight range.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3
# Logit soft-caps in use are 30 (Gemma 2 and 3) to 50; far above any logit, a cap changes nothing.
MAX_SOFTCAP = 1e4
MAX_LOGITS_SCALE = 1e4
# Schedule lengths in training steps: more than any training run.
MAX_STEPS = 10**9
# A mixture of mixtures is evaluated as a tree; this bounds its leaves (teacher and label reads), which
# nesting could otherwise multiply exponentially (mixtures of two mixtures that share a part, and so on).
# Checked by the passes, as it relates sources to each other.
MAX_MIXTURE_PARTS = 64
# ignore_index is compared with int32 or int64 label tensors.
MIN_INDEX = -(2**31)
MAX_INDEX = 2**31 - 1

# Why each range is what it is, by field name; the loader adds this to out-of-range messages.
BOUND_REASONS: dict[str, str] = {
    "vocab_size": "float32, in which the kernels compute with V, is exact up to 2^24",
    "offset": "multi-token-prediction heads predict a few tokens ahead, not thousands",
    "k": "the fused kernel holds the k stored tokens of a row in one block",
    "ignore_index": "it is compared with int32 or int64 label tensors",
    "weight": "so that weight x head weight x T^2 stays below 1e18 and float32 sums of the terms cannot overflow",
    "head_weights": "so that weight x head weight x T^2 stays below 1e18 and float32 sums of the terms cannot overflow",
    "weights": "mixture weights are probabilities",
    "temperature": "logits are divided by it in float32, and temperature_scaling multiplies by its square",
    "teacher_temperature": "teacher logits are divided by it in float32",
    "softcap": "caps in use are 30 to 50; far above any logit, a cap changes nothing",
    "logits_scale": "output multipliers in use lie between about 0.01 and 10; the bound keeps a z far from overflow",
    "start": "a schedule gives a weight or a temperature, and weights are at most 1e6 in size",
    "end": "a schedule gives a weight or a temperature, and weights are at most 1e6 in size",
    "steps": "more steps than any training run",
    "warmup": "more steps than any training run",
}

VocabSize = Annotated[int, Field(ge=1, le=MAX_VOCAB_SIZE)]
Offset = Annotated[int, Field(ge=1, le=MAX_OFFSET)]
Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
HeadWeight = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=MAX_WEIGHT)]
Probability = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1.0)]
Temperature = Annotated[float, Field(allow_inf_nan=False, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)]
# A schedule may give a weight or a temperature; the passes check a temperature schedule's own range.
ScheduleValue = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
StepCount = Annotated[int, Field(ge=1, le=MAX_STEPS)]
WarmupSteps = Annotated[int, Field(ge=0, le=MAX_STEPS)]


class SpecModel(BaseModel):
    """Base of every model: unknown keys are errors, types are strict, instances are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------------------------------
# Schedules: a weight or a temperature that changes with the training step.
# --------------------------------------------------------------------------------------------------

_START = "Value at step 0 (and during `warmup`). A temperature schedule stays in [0.001, 1000]."
_END = "Value reached after `warmup + steps` steps and kept from then on."
_STEPS = "Number of steps the transition from `start` to `end` takes."
_WARMUP = "Steps during which the value is held at `start` before the transition begins."


class ConstantSchedule(SpecModel):
    """A value that never changes (the same as writing the number)."""

    schedule: Literal["constant"] = Field(description="Schedule kind: the value is always `start`.")
    start: ScheduleValue = Field(description="The value.")


class _Ramp(SpecModel):
    start: ScheduleValue = Field(description=_START)
    end: ScheduleValue = Field(description=_END)
    steps: StepCount = Field(description=_STEPS)
    warmup: WarmupSteps = Field(0, description=_WARMUP)


class LinearSchedule(_Ramp):
    """Straight line from `start` to `end` over `steps` steps, after `warmup` steps at `start`."""

    schedule: Literal["linear"] = Field(description="Schedule kind: linear interpolation.")


class CosineSchedule(_Ramp):
    """Half-cosine from `start` to `end` over `steps` steps, after `warmup` steps at `start`."""

    schedule: Literal["cosine"] = Field(description="Schedule kind: half-cosine interpolation.")


class StepSchedule(SpecModel):
    """`start` until step `warmup + steps`, then `end`."""

    schedule: Literal["step"] = Field(description="Schedule kind: one jump from `start` to `end`.")
    start: ScheduleValue = Field(description="Value before the jump.")
    end: ScheduleValue = Field(description="Value from step `warmup + steps` on.")
    steps: StepCount = Field(description="Steps (after `warmup`) until the jump.")
    warmup: WarmupSteps = Field(0, description="Steps added before `steps` start counting.")


Schedule = Annotated[
    Union[ConstantSchedule, LinearSchedule, CosineSchedule, StepSchedule],
    Field(discriminator="schedule"),
]


# Tags of the number-or-schedule union; they must differ from every field name, because pydantic puts
# them into error locations, which the loader maps back onto the document.
def _number_or_schedule(value: Any) -> str:
    return "scheduled" if isinstance(value, (dict, BaseModel)) else "fixed"


def schedule_values(value: float | BaseModel) -> list[tuple[str, float]]:
    """The values a number or a schedule takes at its ends, with the key of each: `[("", 0.5)]` for a
    number, `[("start", 0.0), ("end", 1.0)]` for a ramp (a constant schedule has a start only)."""
    if isinstance(value, (int, float)):
        return [("", float(value))]
    values = [("start", value.start)]
    if not isinstance(value, ConstantSchedule):
        values.append(("end", value.end))
    return values


ScheduledWeight = Annotated[
    Union[Annotated[Weight, Tag("fixed")], Annotated[Schedule, Tag("scheduled")]],
    Discriminator(_number_or_schedule),
]
ScheduledTemperature = Annotated[
    Union[Annotated[Temperature, Tag("fixed")], Annotated[Schedule, Tag("scheduled")]],
    Discriminator(_number_or_schedule),
]

# --------------------------------------------------------------------------------------------------
# Heads: the student's prediction heads.
# --------------------------------------------------------------------------------------------------


class Head(SpecModel):
    """One prediction head of the student: position s of its logits predicts token s + offset."""

    offset: Offset = Field(
        1, description="Which future token the head predicts: 1 = next token (the LM head), 2 = the one after, ..."
    )
    vocab_size: VocabSize | None = Field(
        None, description="Size of the head's vocabulary; defaults to the top-level `vocab_size`."
    )
    input: Literal["logits", "hidden"] = Field(
        "logits",
        description=(
            "What the head receives at run time: `logits` ([B, S, V] tensors), or `hidden` "
            "(lossgraph.Linear(hidden, weight, bias)): the loss is computed chunk by chunk from hidden "
            "states and the head's weight, without materializing the logits."
        ),
    )
    softcap: Annotated[float, Field(allow_inf_nan=False, gt=0.0, le=MAX_SOFTCAP)] | None = Field(
        None,
        description=(
            "Logit soft-capping (Gemma 2 and 3): every loss of the head sees softcap * tanh(z / softcap) "
            "instead of the logits z, and the gradient flows through the tanh. Give the head's raw logits."
        ),
    )
    logits_scale: Annotated[float, Field(allow_inf_nan=False, gt=0.0, le=MAX_LOGITS_SCALE)] | None = Field(
        None,
        description=(
            "Logits scale factor a (muP output multiplier, Fast-LLM's logits_scale_factor): every loss of "
            "the head, z-loss included, sees a * z instead of the logits z it is given, computed in the "
            "loss's precision (float32 for bf16 logits; no scaled copy of them); with `softcap` the cap applies to the "
            "scaled logits, softcap * tanh(a * z / softcap). The gradient flows through the scale "
            "(dl/dz = a * dl/d(a z)); the argmax, and so the accuracy, is unchanged. Not set (or 1): no scaling."
        ),
    )
    description: str | None = Field(None, description="Free text shown by `lossgraph show`.")


# --------------------------------------------------------------------------------------------------
# Sources: where targets come from.
# --------------------------------------------------------------------------------------------------


class SourceNode(SpecModel):
    """Fields every source has; each source kind's model (under lossgraph/kinds/sources/) extends it."""

    description: str | None = Field(None, description="Free text shown by `lossgraph show`.")


class TeacherNode(SourceNode):
    """Fields of a teacher: the offset it predicts, its vocab and how it maps onto a head's."""

    offset: Offset = Field(
        1,
        description="Which future token the teacher's logits predict; must equal the offset of every head it targets.",
    )
    vocab_size: VocabSize | None = Field(
        None, description="Size of the teacher's vocabulary; defaults to the top-level `vocab_size`."
    )
    vocab_map: Literal["truncate", "pad"] | None = Field(
        None,
        description=(
            "How to compare across vocab sizes: `truncate` drops teacher tokens beyond the head's vocab "
            "(teacher larger), `pad` gives the head's extra tokens zero teacher mass (teacher smaller). "
            "Required when the sizes differ."
        ),
    )


# --------------------------------------------------------------------------------------------------
# Loss nodes.
# --------------------------------------------------------------------------------------------------


# The rules of a loss node that look at one of its fields (and the fields before it) run as that field's
# validator: pydantic then reports them with every other key and type error of the document, where a
# compiler pass would wait until the whole document validates.
NODE_RULE = "node_rule"
# Validation context that leaves those rules out. A document whose only problems are node rules has the
# right shape: validated again without them, it gives a spec that the compiler passes can check too.
WITHOUT_NODE_RULES = {"node_rules": False}


def _rules_apply(info: ValidationInfo) -> bool:
    return info.context != WITHOUT_NODE_RULES


def _refuse(value: Any, problems: list[tuple[str, str]]) -> NoReturn:
    """Fail a field's validator with every problem at once, each at its key inside the field ("" for
    the field itself: `weight`, or `start` and `end` of its schedule)."""
    raise ValidationError.from_exception_data(
        "loss node",
        [
            InitErrorDetails(
                type=PydanticCustomError(NODE_RULE, "{message}", {"message": message}),
                loc=(key,) if key else (),
                input=value,
            )
            for key, message in problems
        ],
    )


def _kind_name(model: type[BaseModel]) -> str:
    """The `type:` of a kind's model (the value of its `type: Literal[...]`)."""
    return typing.get_args(model.model_fields["type"].annotation)[0]


class NamedMask(SpecModel):
    """Positions given at run time: a mask passed to the graph call as `masks={NAME: tensor}`."""

    mask: Name = Field(
        description=(
            "Name of the run-time mask: the call's `masks={NAME: [B, S] tensor}` (or [N]), indexed like the "
            "logits (position s of every head), bool or float (float: per-position weights >= 0). Not shifted "
            "by a head's offset nor by `label_alignment`."
        )
    )


def _positions_form(value: Any) -> str:
    return "named" if isinstance(value, (dict, BaseModel)) else "keyword"


# Which positions a loss node's terms take (see docs/concepts.md, "Positions and normalizers per term").
Positions = Annotated[
    Union[Annotated[Literal["targets", "all"], Tag("keyword")], Annotated[NamedMask, Tag("named")]],
    Discriminator(_positions_form),
]

# What a term's sum is divided by, besides the graph's `normalization`.
TermNormalizer = Literal["positions", "targets"]


class LossNode(SpecModel):
    """Fields every loss node has; each loss kind's model (under lossgraph/kinds/) extends it."""

    #: a negative `weight` is meaningful for this kind (it maximizes the term on purpose); a kind's model
    #: sets it, so the rule is checked here without asking the kinds, which sit above this module
    allows_negative_weight: ClassVar[bool] = False

    heads: list[Name] = Field(min_length=1, description="Names of the heads this loss applies to; one term per head.")
    weight: ScheduledWeight = Field(
        1.0,
        description=(
            "Multiplier of the loss: a number or a schedule evaluated at the training step. "
            "0 means computed and reported, without gradient."
        ),
    )
    head_weights: list[HeadWeight] | None = Field(
        None, description="Optional multiplier per head, same length and order as `heads` (default 1 for each)."
    )
    positions: Positions = Field(
        "targets",
        description=(
            "Which positions of each head the terms take. `targets` (default): the head's targets, the "
            "positions with a label that loss_mask, document boundaries and the head's offset let through. "
            "`all`: every position of the head's logits, whatever the labels, loss_mask and document_ids say "
            "(only for losses whose target needs no label: z_loss, entropy, teachers). `{mask: NAME}`: the "
            "positions of the run-time mask `masks={NAME: tensor}` (a loss against labels keeps only those "
            "that are also targets)."
        ),
    )
    normalizer: TermNormalizer = Field(
        "positions",
        description=(
            "What the terms' sums are divided by under `normalization: tokens`. `positions` (default): the "
            "count (or weight sum) of the term's own positions, so `positions: all` divides by every position "
            "of the head. `targets`: the head's target count (or `num_items`), whatever the positions are. "
            "Under `sum` and `batch` both divide alike (by 1, by the number of positions)."
        ),
    )
    description: str | None = Field(None, description="Free text shown by `lossgraph show`.")

    @field_validator("weight")
    @classmethod
    def _weight_not_negative(cls, weight: Any, info: ValidationInfo) -> Any:
        kind = _kind_name(cls)
        if not _rules_apply(info) or cls.allows_negative_weight:
            return weight
        problems = [
            (key, f"weight {value:g} is negative, which would maximize the {kind} loss; use a value >= 0")
            for key, value in schedule_values(weight)
            if value < 0
        ]
        if problems:
            _refuse(weight, problems)
        return weight

    @field_validator("head_weights")
    @classmethod
    def _one_weight_per_head(cls, head_weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        heads = info.data.get("heads")  # absent when `heads` itself is invalid
        if not _rules_apply(info) or head_weights is None or heads is None:
            return head_weights
        if len(head_weights) != len(heads):
            count = f"{len(heads)} head{'' if len(heads) == 1 else 's'}"
            _refuse(head_weights, [("", f"{len(head_weights)} head_weights for {count}; give one per head")])
        return head_weights


class TemperedLoss(LossNode):
    """A loss read at a softmax temperature."""

    temperature: ScheduledTemperature = Field(
        1.0,
        description="Softmax temperature applied to the student logits and the target (a number or a schedule).",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature_in_range(cls, temperature: Any, info: ValidationInfo) -> Any:
        if not _rules_apply(info):
            return temperature
        _check_temperature_range(temperature, "temperature")
        return temperature


def _check_temperature_range(temperature: Any, field: str) -> None:
    """Refuse a temperature schedule whose ends leave [MIN_TEMPERATURE, MAX_TEMPERATURE] (a fixed
    temperature is range-checked by its type; a schedule's ends only here)."""
    problems = []
    for key, value in schedule_values(temperature):
        if value <= 0:
            problems.append((key, f"{field} must be > 0, got {value:g}"))
        elif not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
            problems.append(
                (key, f"{field} must be between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {value:g}")
            )
    if problems:
        _refuse(temperature, problems)


class TargetLoss(TemperedLoss):
    """A loss that compares the student with a target source."""

    target: Name = Field(description="Name of the source the student is compared with.")
    temperature_scaling: bool = Field(
        False,
        description=(
            "Multiply the loss by temperature squared (Hinton's convention); always the student's "
            "`temperature`, also when `teacher_temperature` differs."
        ),
    )
    teacher_temperature: ScheduledTemperature | None = Field(
        None,
        description=(
            "Softmax temperature of the target's teacher logits alone (a number or a schedule): the "
            "student is read at `temperature`, the teacher at this one (Fast-LLM's "
            "`teacher_softmax_temperature`). Defaults to `temperature`. Only for targets that read a "
            "teacher; labels and label smoothing have no temperature."
        ),
    )

    @field_validator("teacher_temperature")
    @classmethod
    def _teacher_temperature_in_range(cls, temperature: Any, info: ValidationInfo) -> Any:
        if temperature is not None and _rules_apply(info):
            _check_temperature_range(temperature, "teacher_temperature")
        return temperature
