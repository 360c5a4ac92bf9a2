"""Generate `docs/yaml-reference.md` from the pydantic models in `lossgraph.spec.models`.

The whole page comes from here: the hand-written prose (layout, rules, schedule formulas, loss
formulas, cross-checks) lives in this module next to the generator, and every field table is built
from the models, so the page cannot drift from the contract. Regenerate it with

    python -m lossgraph.spec.docgen > docs/yaml-reference.md

`tests/test_docs.py` fails when the checked-in page differs from `yaml_reference()`. Like
`lossgraph.spec.models`, this module imports no torch.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..kinds import LossKind, SourceKind, loss_kinds, source_kinds
from . import models as spec

REGENERATE = "python -m lossgraph.spec.docgen > docs/yaml-reference.md"

# --------------------------------------------------------------------------------------------------
# The models, in page order, grouped by section.
# --------------------------------------------------------------------------------------------------


def _union_models(annotated: Any) -> tuple[type[BaseModel], ...]:
    """The models of a discriminated union such as `spec.Source` (an Annotated Union)."""
    union = typing.get_args(annotated)[0]
    return tuple(typing.get_args(union))


SCHEDULE_MODELS = _union_models(spec.Schedule)


def source_models() -> tuple[type[BaseModel], ...]:
    """The models of the registered source kinds, in registration order."""
    return tuple(kind.model for kind in source_kinds())


def loss_models() -> tuple[type[BaseModel], ...]:
    """The models of the registered loss kinds, in registration order."""
    return tuple(kind.model for kind in loss_kinds())


def documented_models() -> tuple[type[BaseModel], ...]:
    """Every model the page documents, in page order."""
    return (spec.LossGraphSpec, spec.Head, *source_models(), *loss_models(), spec.NamedMask, *SCHEDULE_MODELS)


def _loss_kind_of(model: type[BaseModel]) -> LossKind | None:
    return next((kind for kind in loss_kinds() if kind.model is model), None)


def _kind_of(model: type[BaseModel]) -> LossKind | SourceKind | None:
    """The registered loss or source kind whose model `model` is (its docs live in its module)."""
    return next((kind for kind in (*source_kinds(), *loss_kinds()) if kind.model is model), None)


# --------------------------------------------------------------------------------------------------
# Hand-written parts of the page.
# --------------------------------------------------------------------------------------------------

COMPLETE_EXAMPLE = """\
# yaml-language-server: $schema=lossgraph.schema.json
version: 1
vocab_size: 32000               # default vocabulary of every head and teacher
normalization: tokens           # tokens (default) | sum | batch
description: MTP student, distilled from a frozen teacher on the next-token head

heads:                          # the student's prediction heads, by name
  next: {offset: 1}             # predicts token t+1 (the ordinary LM head)
  mtp2: {offset: 2}             # predicts token t+2

sources:                        # where targets come from, by name; `type` picks the kind
  labels: {type: labels, ignore_index: -100}
  smooth: {type: label_smoothing, source: labels, epsilon: 0.1}
  teacher: {type: teacher}      # dense logits given at run time

losses:                         # loss nodes, by name; `type` picks the kind
  lm:
    type: cross_entropy
    heads: [next, mtp2]         # one term per head
    head_weights: [1.0, 0.5]    # the farther prediction counts half
    target: smooth
  distill:
    type: forward_kl
    heads: [next]
    target: teacher
    temperature: 2.0
    temperature_scaling: true   # multiply by T^2
    weight: {schedule: linear, start: 0.0, end: 0.5, steps: 1000, warmup: 200}
  z: {type: z_loss, heads: [next], weight: 1.0e-4}
"""

SCHEDULE_EXAMPLE = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
  distill:
    type: forward_kl
    heads: [next]
    target: teacher
    weight: {schedule: cosine, start: 0.0, end: 1.0, steps: 2000, warmup: 500}
    temperature: {schedule: step, start: 4.0, end: 2.0, steps: 10000}
"""

# One short example per model, written as it appears inside its parent mapping (a loss kind's is
# in its module, `LossKind.example`; see `examples()`).
EXAMPLES: dict[type[BaseModel], str] = {
    spec.Head: "mtp2: {offset: 2, description: predicts the token after next}",
    spec.NamedMask: "positions: {mask: answer}",
    spec.ConstantSchedule: "weight: {schedule: constant, start: 0.5}",
    spec.LinearSchedule: "weight: {schedule: linear, start: 0.0, end: 1.0, steps: 1000, warmup: 100}",
    spec.CosineSchedule: "weight: {schedule: cosine, start: 0.0, end: 1.0, steps: 2000, warmup: 500}",
    spec.StepSchedule: "temperature: {schedule: step, start: 4.0, end: 2.0, steps: 10000}",
}

SCHEDULE_FORMULAS: dict[type[BaseModel], str] = {
    spec.ConstantSchedule: "Value at every step: `start`.",
    spec.LinearSchedule: "Value at `step`: `start + (end − start) · frac`, with `frac` as defined above.",
    spec.CosineSchedule: (
        "Value at `step`: `start + (end − start) · (1 − cos(π · frac)) / 2`, with `frac` as defined above."
    ),
    spec.StepSchedule: "Value at `step`: `start` while `step < warmup + steps`, then `end`.",
}

# What the validation passes check beyond the field types (lossgraph/compiler/passes.py); a loss
# kind's own checks are in its module (`LossKind.checks`).
CHECKS: dict[type[BaseModel], list[str]] = {
    spec.LossGraphSpec: [
        "Heads, sources and losses share one namespace: a name may be used once across the three.",
        "Every head, and every teacher or top-k teacher, needs a vocabulary size: its own `vocab_size` "
        "or the top-level one.",
        "A source that no loss reads, and a head that no loss binds, give a warning.",
    ],
}

# Short explanations shown under a model's docstring (a loss kind's: `LossKind.note`).
NOTES: dict[type[BaseModel], str] = {}

LOSS_COMMON_CHECKS = [
    "Every name in `heads` must be a declared head, listed once.",
    "`head_weights`, when given, has one entry per head, each >= 0.",
    "`weight` may not be negative (except for @NEGATIVE@); for a schedule, `start` and `end` are checked.",
    "`temperature` must be in [0.001, 1000]; for a schedule, `start` and `end` are checked.",
    "`temperature_scaling: true` at temperature 1 gives a warning (it has no effect).",
    "A loss whose target is a top-k teacher with `tail: bucket` must use temperature 1 (and "
    "teacher_temperature 1, if given).",
    "`teacher_temperature` is in the same range as `temperature`, and only for a target that reads a teacher "
    "(not labels or label smoothing alone).",
    "A schedule whose `start` equals its `end` gives a warning: write the number instead.",
    "`positions: all` is refused for a loss whose target reads the labels (`labels`, `label_smoothing`, or a "
    "mixture with either): only the head's targets have a label.",
]

# --------------------------------------------------------------------------------------------------
# Types in YAML terms.
# --------------------------------------------------------------------------------------------------

_MODEL_NOUNS: dict[type[BaseModel], str] = {spec.Head: "[head](#heads)", spec.NamedMask: "[named mask](#named-mask)"}
_MODEL_NOUNS.update({model: "[schedule](#schedules)" for model in SCHEDULE_MODELS})


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """Strip `Annotated` layers; return the bare type and the constraints found on the way."""
    constraints: list[Any] = []
    while typing.get_origin(tp) is typing.Annotated:
        for item in tp.__metadata__:
            if isinstance(item, FieldInfo):
                constraints.extend(item.metadata)
            else:
                constraints.append(item)
        tp = typing.get_args(tp)[0]
    return tp, constraints


def _constraint(constraints: list[Any], name: str) -> Any:
    for item in constraints:
        value = getattr(item, name, None)
        if value is not None:
            return value
    return None


def _number(value: float) -> str:
    """1, 0.5, 0.001, 16777216, 1000000: whole numbers in full, others briefly."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e16):
        return str(int(value))
    return f"{value:g}"


def _range(constraints: list[Any]) -> str:
    """`>= 1`, `> 0`, `in (0, 1)` or '' from ge/gt/le/lt constraints."""
    low = _constraint(constraints, "ge"), _constraint(constraints, "gt")
    high = _constraint(constraints, "le"), _constraint(constraints, "lt")
    lower = ("[", low[0]) if low[0] is not None else ("(", low[1]) if low[1] is not None else None
    upper = ("]", high[0]) if high[0] is not None else (")", high[1]) if high[1] is not None else None
    if lower and upper:
        return f" in {lower[0]}{_number(lower[1])}, {_number(upper[1])}{upper[0]}"
    if lower:
        return f" {'>=' if lower[0] == '[' else '>'} {_number(lower[1])}"
    if upper:
        return f" {'<=' if upper[0] == ']' else '<'} {_number(upper[1])}"
    return ""


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def yaml_type(tp: Any, constraints: list[Any] | None = None, *, plural: bool = False) -> str:
    """A type annotation in YAML terms: `integer >= 1`, `number or schedule`, `list of names`."""
    tp, found = _unwrap(tp)
    constraints = [*(constraints or []), *found]
    origin = typing.get_origin(tp)
    if _is_union(tp):
        members = [member for member in typing.get_args(tp) if member is not type(None)]
        if len(members) == 1:
            return yaml_type(members[0], constraints, plural=plural)
        words: list[str] = []
        for member in members:
            word = yaml_type(member, plural=plural)
            if word not in words:
                words.append(word)
        return " or ".join(words)
    if origin is typing.Literal:
        values = typing.get_args(tp)
        if len(values) == 1:
            return f"`{values[0]}`"
        return "one of: " + ", ".join(str(value) for value in values)
    if origin is list:
        (item,) = typing.get_args(tp)
        text = f"list of {yaml_type(item, plural=True)}"
        minimum = _constraint(constraints, "min_length")
        return text + (f" (at least {minimum})" if minimum else "")
    if origin is dict:
        key, value = typing.get_args(tp)
        text = f"mapping of {yaml_type(key)} to {yaml_type(value)}"
        minimum = _constraint(constraints, "min_length")
        return text + (f" (at least {minimum} {'entry' if minimum == 1 else 'entries'})" if minimum else "")
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        noun = _MODEL_NOUNS.get(tp) or _kind_noun(tp)
        return noun.replace("](", "s](") if plural else noun
    s = "s" if plural else ""
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"integer{s}{_range(constraints)}"
    if tp is float:
        return f"number{s}{_range(constraints)}"
    if tp is str:
        return f"name{s}" if _constraint(constraints, "pattern") else "text"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------------
# Tables and sections.
# --------------------------------------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value)


def default_text(field: FieldInfo) -> str:
    """The default of a field as it reads in YAML, 'required', or 'not set'."""
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None:
        return "not set"
    return f"`{_yaml_value(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def field_order(model: type[BaseModel]) -> list[str]:
    """Fields in page order: the kind key (`type` or `schedule`) first, then as declared."""
    names = list(model.model_fields)
    kind = [name for name in ("type", "schedule") if name in names]
    return [*kind, *(name for name in names if name not in kind)]


def field_table(model: type[BaseModel]) -> str:
    """The Markdown table of a model's fields: key, type, default, description."""
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for name in field_order(model):
        field = model.model_fields[name]
        kind = yaml_type(field.annotation, list(field.metadata))
        rows.append(f"| `{name}` | {_cell(kind)} | {default_text(field)} | {_cell(field.description or '')} |")
    return "\n".join(rows)


def _kind(model: type[BaseModel]) -> str | None:
    """The value of a model's `type` or `schedule` key, if it has one."""
    for name in ("type", "schedule"):
        field = model.model_fields.get(name)
        if field is not None:
            return typing.get_args(field.annotation)[0]
    return None


def _docstring(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "")


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _kind_noun(model: type[BaseModel]) -> str:
    if _loss_kind_of(model):
        return "[loss](#losses)"
    return "[source](#sources)" if _kind_of(model) else model.__name__


def examples() -> dict[type[BaseModel], str]:
    """The example of every model that has one, the registered kinds' included."""
    return {**EXAMPLES, **{kind.model: kind.example for kind in (*source_kinds(), *loss_kinds())}}


def model_section(model: type[BaseModel], heading: str, level: int = 3) -> str:
    """One section: heading, docstring, example, field table, formulas and checks."""
    kind = _kind_of(model)
    parts = [f"{'#' * level} {heading}", _docstring(model)]
    note = kind.note if kind else NOTES.get(model)
    if note:
        parts.append(note)
    example = examples().get(model)
    if example:
        parts.append(f"```yaml\n{example}\n```")
    parts.append(field_table(model))
    if model in SCHEDULE_FORMULAS:
        parts.append(SCHEDULE_FORMULAS[model])
    if isinstance(kind, LossKind):
        parts.append("Term per position:\n\n" + _bullets(list(kind.formula)))
    checks = list(kind.checks) if kind else CHECKS.get(model)
    if checks:
        parts.append("Checked by `lossgraph validate`:\n\n" + _bullets(checks))
    return "\n\n".join(parts)


def _kind_list(models: tuple[type[BaseModel], ...]) -> str:
    """The table of kinds; a loss kind's row adds its term per position (`LossKind.formula`)."""
    losses = any(_loss_kind_of(model) for model in models)
    rows = ["| Kind | What it is | Term per position |", "| --- | --- | --- |"]
    rows = rows if losses else ["| Kind | What it is |", "| --- | --- |"]
    for model in models:
        kind = _kind(model)
        first = _docstring(model).split("\n\n")[0]
        formula = f" {_cell('; '.join(_loss_kind_of(model).formula))} |" if losses else ""
        rows.append(f"| [`{kind}`](#{kind}) | {_cell(first)} |{formula}")
    return "\n".join(rows)


def _targetless_kinds() -> str:
    """`z_loss` and `entropy`: the loss kinds that take no target, from the registry."""
    names = [f"`{kind.name}`" for kind in loss_kinds() if not kind.takes_target]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


# --------------------------------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------------------------------

_INTRO = f"""\
# YAML reference

<!-- Generated by `{REGENERATE}` from the models under lossgraph/spec/ and lossgraph/kinds/. Do not edit by hand. -->

This page lists every key of a version-1 loss-graph file. It is generated from the models in
lossgraph/spec/ and in the loss kinds' modules under lossgraph/kinds/, which are also what
`lossgraph validate` checks against. For what heads, sources and loss nodes mean, read [concepts](concepts.md).

## File layout

A loss-graph file is one YAML mapping with three named collections:

- `heads`: the student's prediction heads. A head with `offset: d` predicts the token d steps ahead.
- `sources`: where targets come from: the dataset labels, teachers, stored top-k teacher
  log-probabilities, and targets derived from those (label smoothing, mixtures).
- `losses`: loss nodes. Each compares one or more heads with a source (or, for @TARGETLESS@, looks
  at the heads alone).

Each entry has a name you choose (the mapping key). Inside `sources` and `losses` the `type` key picks
the kind. A complete example:

```yaml
{COMPLETE_EXAMPLE}```

Check a file with `lossgraph validate FILE`. The first line lets editors that use the YAML language
server complete and check keys; write the schema next to the file with
`lossgraph schema -o lossgraph.schema.json`.

## General rules

- Every mapping rejects unknown keys. A misspelled key is an error that names the closest valid key.
- Names (of heads, sources and losses) are identifiers: letters, digits and underscores, not starting
  with a digit. Heads, sources and losses share one namespace.
- Types are strict. An integer key does not accept `1.0`, and a quoted `"0.5"` is a string, not a
  number. An integer is accepted where a number is expected.
- Numbers must be finite (`.inf` and `.nan` are rejected) and inside the range of their key, shown in
  the Type column; [Limits](#limits) says why each range is what it is.
- Both `1e-4` and `1.0e-4` are read as numbers. Dates are not: `2024-01-01` is text.
- Numbers mean what YAML 1.2 says, as in editors that check the file against its schema. A number only
  YAML 1.1 reads as one is an error that names the number to write: base 60 (`1:30`, which YAML 1.1
  reads as 90), binary (`0b101`), digits grouped with `_` (`1_000`), and an integer with a leading zero
  (`017`, octal in YAML 1.1, 17 in YAML 1.2). Quote such a value to make it text.
- A key written twice in one mapping is an error. Anchors, aliases and merge keys (`<<: *defaults`)
  work, within the [limits](#limits). Explicit tags other than the plain ones (`!!str`, `!!int`,
  `!!float`, `!!bool`, `!!null`, `!!map`, `!!seq`), such as `!!python/object` or `!!timestamp`, are
  rejected.
- The Default column shows the value used when a key is left out. "required" means the key must be
  written; "not set" means it is optional and has no value of its own (the description says what
  happens then).
"""

_LIMITS_INTRO = """\
## Limits

A loss-graph file is untrusted input, so reading one is bounded. `lossgraph validate` reports a file
past these limits, at the line that crosses them, instead of running out of time or memory:

@DOCUMENT@

Every number has a range that the kernels and float32 arithmetic honour, so a graph that validates
cannot overflow at run time. The ranges reach far beyond what real graphs use:

@NUMBERS@
"""


def _document_limits() -> str:
    from . import loader  # loader imports nothing heavy; imported here to keep docgen's imports plain

    return _bullets(
        [
            f"Nesting: at most {loader.MAX_DEPTH} levels of mappings and lists (a loss graph needs about 5).",
            f"Aliases: together they may add at most {loader.MAX_ALIAS_VALUES} values to the document once "
            "expanded (merge keys need a few dozen; nested aliases multiply). An alias inside the value it names "
            "is an error.",
            f"Numbers: at most {loader.MAX_NUMBER_CHARS} characters.",
            f"Size: at most {loader.MAX_DOCUMENT_CHARS} characters (a loss graph has a few thousand).",
            "Characters: NUL and other control characters (except tab, line feed and carriage return) are not "
            "allowed anywhere in the file, nor is half of a UTF-16 surrogate pair written as an escape "
            '(`"\\ud800"`).',
            "Files: only regular files are read (not a FIFO or a device such as `/dev/zero`), and only as far as "
            "the size limit.",
        ]
    )


def _number_limits() -> str:
    """Key, range and reason of every bounded key (ranges from the models, reasons from `spec.BOUND_REASONS`)."""
    ranges: dict[str, str] = {}
    for model in documented_models():
        for name, field in model.model_fields.items():
            if name in spec.BOUND_REASONS and name not in ranges:
                ranges[name] = yaml_type(field.annotation, list(field.metadata))
    rows = ["| Key | Range | Why |", "| --- | --- | --- |"]
    for name, reason in spec.BOUND_REASONS.items():
        rows.append(f"| `{name}` | {_cell(ranges[name])} | {_cell(reason)} |")
    rows.append(
        f"| `temperature` and `teacher_temperature` schedules | `start` and `end` in [{_number(spec.MIN_TEMPERATURE)}, "
        f"{_number(spec.MAX_TEMPERATURE)}] | as for a fixed temperature |"
    )
    return "\n".join(rows)


_SCHEDULES_INTRO = """\
## Schedules

`weight` and `temperature` of a loss node take a number or a schedule. A number is fixed for the whole
run. A schedule is a mapping whose `schedule` key picks the kind; it is evaluated at the training step
that the caller passes to the runtime.

With `frac = clamp((step − warmup) / steps, 0, 1)`:

| Schedule | Value at `step` |
| --- | --- |
| `constant` | `start`, always |
| `linear` | `start + (end − start) · frac` |
| `cosine` | `start + (end − start) · (1 − cos(π · frac)) / 2` |
| `step` | `start` while `step < warmup + steps`, then `end` |

So every schedule holds `start` during the first `warmup` steps and holds `end` from step
`warmup + steps` on. For example, `{schedule: linear, start: 0.0, end: 1.0, steps: 1000, warmup: 100}`
gives 0 up to step 100, 0.5 at step 600 and 1 from step 1100 on.

A weight of 0 (also when a schedule is at 0) still computes and reports the term, without gradient.
A schedule whose `start` equals its `end` gives a warning: write the number instead.

```yaml
@EXAMPLE@```
"""

_SOURCES_INTRO = """\
## Sources

The `sources` mapping names where targets come from; `type` picks the kind. `sources` may be empty
when the graph only has losses without a target (@TARGETLESS@).

@KINDS@

`labels`, `teacher` and `topk_teacher` read tensors given at run time. `label_smoothing` and
`mixture` are derived: they read other sources, and may not form a cycle.
"""

_LOSSES_INTRO = """\
## Losses

The `losses` mapping names loss nodes; `type` picks the kind. A node adds one term per head in its
`heads` list. The total loss is

    total = Σ_nodes Σ_heads weight(step) · head_weight · term

where each head's term is normalized as the top-level `normalization` says. In the formulas below,
z is the student's logits row of one position, q = softmax(z / T) the student's distribution and
p the target distribution, both at the node's temperature T (the target's teachers at
`teacher_temperature` instead, where a node gives one). With `temperature_scaling: true` the term is
multiplied by the student's T².

@KINDS@

These checks apply to every loss node:

@CHECKS@
"""


def yaml_reference() -> str:
    """The full Markdown of `docs/yaml-reference.md`."""
    parts = [_INTRO.rstrip("\n")]
    parts.append(model_section(spec.LossGraphSpec, "Top level", level=2))
    parts.append(model_section(spec.Head, "Heads", level=2))
    parts.append(_SOURCES_INTRO.replace("@KINDS@", _kind_list(source_models())).rstrip("\n"))
    parts += [model_section(model, f"`{_kind(model)}`") for model in source_models()]
    losses_intro = _LOSSES_INTRO.replace("@KINDS@", _kind_list(loss_models()))
    parts.append(losses_intro.replace("@CHECKS@", _bullets(LOSS_COMMON_CHECKS)).rstrip("\n"))
    parts += [model_section(model, f"`{_kind(model)}`") for model in loss_models()]
    parts.append(model_section(spec.NamedMask, "Named mask"))
    parts.append(_SCHEDULES_INTRO.replace("@EXAMPLE@", SCHEDULE_EXAMPLE).rstrip("\n"))
    parts += [model_section(model, f"`{_kind(model)}`") for model in SCHEDULE_MODELS]
    limits = _LIMITS_INTRO.replace("@DOCUMENT@", _document_limits()).replace("@NUMBERS@", _number_limits())
    parts.append(limits.rstrip("\n"))
    negative = ", ".join(f"`{kind.name}`" for kind in loss_kinds() if kind.model.allows_negative_weight)
    return "\n\n".join(parts).replace("@TARGETLESS@", _targetless_kinds()).replace("@NEGATIVE@", negative) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the page: `python -m lossgraph.spec.docgen > docs/yaml-reference.md`. Installed plugins and
    LOSSGRAPH_PLUGINS load as everywhere; `--plugin MODULE` (repeatable) adds a plugin's kinds too."""
    import argparse

    from ..errors import PluginError
    from ..kinds import plugins

    parser = argparse.ArgumentParser(prog="python -m lossgraph.spec.docgen", description="Print the YAML reference.")
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE", help="load this plugin's kinds (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        plugins.load(args.plugin)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
