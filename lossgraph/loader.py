"""Reading loss-graph YAML: safe parsing with positions, schema validation with located messages.

Only PyYAML's safe machinery is used (no arbitrary objects). The document is composed into a node
tree first so that every value keeps its line and column; duplicate keys, which plain PyYAML silently
collapses, are errors here. Schema errors from pydantic are translated into messages that name the
dotted path and, where it helps, suggest the name that was probably meant.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, Diagnostic, SourceFileError
from .sourcemap import Path, SourceMap, dotted
from .spec import LossGraphSpec
from .suggest import did_you_mean


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as `1e-4` (YAML 1.1 wants `1.0e-4`)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


@dataclass
class ParsedDocument:
    """Plain data of a YAML document plus where each node came from."""

    data: Any
    source_map: SourceMap


class _Composer:
    """Turns a composed YAML node tree into plain data, recording positions and duplicate keys."""

    def __init__(self, loader: _YamlLoader, source_map: SourceMap):
        self.loader = loader
        self.source_map = source_map
        self.diagnostics: list[Diagnostic] = []

    def build(self, node: yaml.Node, path: Path) -> Any:
        mark = node.start_mark
        self.source_map.values[path] = (mark.line + 1, mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self._error(path, _unsupported_tag(node.tag, "a list"), mark)
            return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]
        if node.tag not in self.loader.yaml_constructors:
            self._error(path, _unsupported_tag(node.tag, "a value"), mark)
            return None
        return self.loader.construct_object(node, deep=True)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        if node.tag != _MAP_TAG:
            self._error(path, _unsupported_tag(node.tag, "a mapping"), node.start_mark)
        first_seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not self._plain_key(key_node):
                continue
            key = self.loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_seen:
                self._error(
                    (*path, key),
                    f"duplicate key {key!r} (first defined at line {first_seen[key]}); remove one of them or rename it",
                    key_node.start_mark,
                )
            else:
                first_seen[key] = line
        self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._error(path, "mapping keys must be plain names, not lists or mappings", key_node.start_mark)
                continue
            if not self._plain_key(key_node):
                self._error(path, _unsupported_tag(key_node.tag, "a key"), key_node.start_mark)
                continue
            key = self.loader.construct_object(key_node)
            if not isinstance(key, str):
                # YAML 1.1 reads unquoted yes/no/on/off as booleans and digits as numbers, even as keys.
                raw = key_node.value
                hint = f"quote it: '{raw}'" if isinstance(key, bool) else "names start with a letter or underscore"
                self._error(path, f"key {raw} is read as {_kind(key)}, not a name; {hint}", key_node.start_mark)
                continue
            self.source_map.keys[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = self.build(value_node, (*path, key))
        return result

    def _plain_key(self, node: yaml.Node) -> bool:
        """A scalar key with a tag the safe loader knows (not a `<<` merge key, not a Python tag)."""
        return isinstance(node, yaml.ScalarNode) and node.tag in self.loader.yaml_constructors

    def _error(self, path: Path, message: str, mark: yaml.Mark) -> None:
        self.diagnostics.append(
            Diagnostic("error", dotted(path), message, self.source_map.file, mark.line + 1, mark.column + 1)
        )


def _unsupported_tag(tag: str, what: str) -> str:
    return f"unsupported YAML tag {tag!r} on {what}; remove it: a loss graph holds plain mappings, lists and values"


# Hints for PyYAML's terse syntax messages, keyed by a fragment of the problem.
_SYNTAX_HINTS = {
    "'\\t'": "indent with spaces (YAML does not allow tabs)",
    "expected <block end>": "check the indentation of this line",
    "found another document": "a loss-graph file holds one document (remove the extra `---`)",
}


def parse_yaml(text: str, file: str | None = None) -> ParsedDocument:
    """Parse one YAML document safely; raise `ConfigError` for syntax errors and duplicate keys."""
    source_map = SourceMap(file=file)
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(
                [
                    Diagnostic(
                        "error",
                        "",
                        "the document is empty; write a loss graph (`lossgraph init` creates a starter file)",
                        file,
                        1,
                        1,
                    )
                ]
            )
        composer = _Composer(loader, source_map)
        data = composer.build(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = exc.context
        if context and context.startswith("while") and exc.context_mark and mark and exc.context_mark.line != mark.line:
            context += f" (started at line {exc.context_mark.line + 1})"  # where an unclosed `[` or `{` opened
        problem = " ".join(part for part in (context, exc.problem) if part)
        problem += "".join(f"; {hint}" for fragment, hint in _SYNTAX_HINTS.items() if fragment in problem)
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ConfigError([Diagnostic("error", "", f"YAML syntax error: {problem}", file, line, column)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Diagnostic("error", "", f"YAML error: {exc}", file, 1, 1)]) from None
    finally:
        loader.dispose()
    if composer.diagnostics:
        raise ConfigError(composer.diagnostics)
    if not isinstance(data, dict):
        raise ConfigError(
            [
                Diagnostic(
                    "error",
                    "",
                    f"the document must be a mapping with version, heads, sources and losses; got {_kind(data)}",
                    file,
                    1,
                    1,
                )
            ]
        )
    return ParsedDocument(data, source_map)


def read_text(path: str | FilePath) -> str:
    """Read a loss-graph file, turning OS and encoding failures into `SourceFileError`."""
    try:
        return FilePath(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SourceFileError(f"{path}: is a directory, not a loss-graph file") from None
    except UnicodeDecodeError as exc:
        raise SourceFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SourceFileError(f"{path}: cannot be read ({exc.strerror})") from None


# --------------------------------------------------------------------------------------------------
# Schema validation with located, readable messages.
# --------------------------------------------------------------------------------------------------

_TYPE_NAMES = {
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "literal_error": None,
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _strip_annotated(tp: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(tp) is typing.Annotated:
        metadata.extend(tp.__metadata__)
        tp = typing.get_args(tp)[0]
    return tp, metadata


def _union_member(members: tuple[Any, ...], tag: Any) -> Any | None:
    """The member of a tagged union that a pydantic location element `tag` selects."""
    for member in members:
        inner, metadata = _strip_annotated(member)
        if any(getattr(item, "tag", None) == tag for item in metadata):
            return member
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            for name in ("type", "schedule"):
                field = inner.model_fields.get(name)
                if field is not None and tag in typing.get_args(field.annotation):
                    return member
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validated the mapping at pydantic location `loc` (tags included)."""
    tp: Any = LossGraphSpec
    index = 0
    while True:
        tp, _ = _strip_annotated(tp)
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            members = tuple(m for m in typing.get_args(tp) if m is not type(None))
            if len(members) == 1:
                tp = members[0]
                continue
            if index >= len(loc):
                return None
            chosen = _union_member(members, loc[index])
            if chosen is None:
                return None
            tp, index = chosen, index + 1
            continue
        if index >= len(loc):
            return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
        element = loc[index]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(element)
            if field is None:
                return None
            tp = field.annotation
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif origin is list:
            tp = typing.get_args(tp)[0]
        else:
            return None
        index += 1


def _document_path(data: Any, loc: tuple[Any, ...]) -> Path:
    """Map a pydantic location onto the document, dropping the union tags pydantic inserts."""
    path: list[Any] = []
    current = data
    for element in loc:
        if isinstance(current, dict) and element in current:
            path.append(element)
            current = current[element]
        elif isinstance(current, list) and isinstance(element, int) and 0 <= element < len(current):
            path.append(element)
            current = current[element]
        elif element == "[key]":
            break
        # anything else is a union tag pydantic inserted, or a key that is missing
    return tuple(path)


def _message(error: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "missing":
        return f"missing required key {loc[-1]!r}"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model else []
        hint = did_you_mean(str(loc[-1]), allowed)
        if not hint and allowed:
            hint = f"; allowed keys: {', '.join(allowed)}"
        return f"unknown key {loc[-1]!r}{hint}"
    if kind == "union_tag_invalid":
        expected = [tag.strip().strip("'") for tag in str(ctx.get("expected_tags", "")).split(",")]
        hint = did_you_mean(str(ctx.get("tag")), expected)
        name = str(ctx.get("discriminator", "type")).strip("'")
        return f"unknown {name} {ctx.get('tag')!r}{hint} (one of: {', '.join(expected)})"
    if kind == "union_tag_not_found":
        name = str(ctx.get("discriminator", "type")).strip("'")
        return f"missing required key {name!r}, which picks the kind"
    if kind == "string_pattern_mismatch":
        return f"{value!r} is not a valid name: use letters, digits and underscores, not starting with a digit"
    if kind == "literal_error" and loc == ("version",):
        return f"version {value!r} is not supported; this lossgraph reads version 1 files"
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = [c.strip().strip("'") for c in re.split(r",| or ", expected) if c.strip()]
        hint = did_you_mean(str(value), choices) if isinstance(value, str) else ""
        return f"must be {expected}, got {_kind(value)}{hint}"
    if kind == "string_type" and isinstance(value, bool):
        return f"expected a string, got {_kind(value)}; YAML reads unquoted yes/no/on/off as booleans, so quote it"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {_kind(value)}"
    if kind == "too_short":
        minimum = ctx.get("min_length", 1)
        return f"needs at least {minimum} entr{'y' if minimum == 1 else 'ies'}"
    message = str(error["msg"]).replace("Input should be", "must be")
    message = message[0].lower() + message[1:]
    return f"{message}, got {_kind(value)}"


def validate_schema(document: ParsedDocument) -> LossGraphSpec:
    """Validate parsed data against the spec; raise `ConfigError` with every located problem."""
    try:
        spec = LossGraphSpec.model_validate(document.data)
    except ValidationError as exc:
        diagnostics = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            path = _document_path(document.data, loc)
            if error["type"] == "missing":
                diagnostics.append(document.source_map.diagnostic(path, _message(error, loc)))
                continue
            if error["type"] == "union_tag_invalid":  # point at the `type:` (or `schedule:`) value itself
                path = (*path, str(error["ctx"]["discriminator"]).strip("'"))
            is_key = error["type"] == "extra_forbidden" or (loc and loc[-1] == "[key]")
            if error["type"] == "extra_forbidden" and path[-1:] != (loc[-1],):
                path = (*path, loc[-1])
            diagnostics.append(document.source_map.diagnostic(path, _message(error, loc), key=bool(is_key)))
        raise ConfigError(_unique(diagnostics)) from None
    spec._source_map = document.source_map
    return spec


def _unique(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    seen: set[Diagnostic] = set()
    return [d for d in diagnostics if not (d in seen or seen.add(d))]
