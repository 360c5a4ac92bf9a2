"""Reading loss-graph YAML: safe parsing with positions, schema validation with located messages.

Only PyYAML's safe machinery is used (no arbitrary objects). The document is composed into a node
tree first so that every value keeps its line and column; duplicate keys, which plain PyYAML silently
collapses, are errors here. Schema errors from pydantic are translated into messages that name the
dotted path and, where it helps, suggest the name that was probably meant.

A file is untrusted input, so reading it is bounded: nesting depth and what aliases expand to are
limited while the node tree is composed (before anything is expanded), numbers have a length limit,
and every failure of PyYAML (bad characters, bad tags, bad scalars) becomes a located diagnostic.
"""

from __future__ import annotations

import codecs
import itertools
import os
import re
import stat
import types
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, Diagnostic, SourceFileError, quote, shorten
from ..kinds import loss_kinds, source_kinds
from .models import BOUND_REASONS, LossGraphSpec
from .nodes import NODE_RULE, WITHOUT_NODE_RULES, Head
from .sourcemap import Path, SourceMap, dotted
from .suggest import did_you_mean

# A loss graph nests about five levels (losses.distill.weight.start); deeper documents are mistakes or
# attacks, and the composer and `_Composer.build` recurse once per level.
MAX_DEPTH = 32
# Values that aliases may add to a document once expanded. Merge keys (`<<: *defaults`) need a few
# dozen; nested aliases can otherwise grow a 1 KB file exponentially (a "billion laughs" bomb).
MAX_ALIAS_VALUES = 10_000
# Longer numbers are never meant; the limit also keeps big-integer arithmetic (and printing) cheap.
MAX_NUMBER_CHARS = 100
# A loss graph is a few kilobytes; pure-Python parsing takes about a second per 100 KB on a slow core.
MAX_DOCUMENT_CHARS = 256 * 1024
# A character takes at most 4 bytes of UTF-8, so this many bytes of a longer file decode to more than
# MAX_DOCUMENT_CHARS characters even when the last one is cut: `read_text` reads no more.
_MAX_READ_BYTES = 4 * (MAX_DOCUMENT_CHARS + 1)
# Values (scalars, lists and mappings) in a document as written. A loss graph has a few hundred; composing
# takes about 80 microseconds per value, so the bound keeps any document well under a second.
MAX_NODES = 10_000

# how to get a kind lossgraph does not know, said after an unknown `type:` (lossgraph.kinds.plugins loads them)
PLUGIN_HINT = (
    "kinds from plugins load with `lossgraph --plugin MODULE`, LOSSGRAPH_PLUGINS=MODULE,... "
    "or an installed package's `lossgraph.kinds` entry point"
)

_NULL_TAG = "tag:yaml.org,2002:null"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
# The plain scalars a loss graph is written with, and what each is called in messages.
_SCALAR_NOUNS = {
    _NULL_TAG: "null",
    _BOOL_TAG: "true or false",
    _INT_TAG: "an integer",
    _FLOAT_TAG: "a number",
    _STR_TAG: "text",
}
# Half of a UTF-16 surrogate pair: no character, though an escape (`"\\ud800"`) can write one.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Numbers as the YAML 1.2 core schema reads them. PyYAML reads YAML 1.1, whose numbers also include
# base 60 (`1:30` is 90), binary (`0b101`), digits grouped by `_` (`1_000`), signed hexadecimal and
# octal with a leading zero (`017` is 15): YAML 1.2, and so editors checking the file against its schema,
# read those as text, or `017` as 17. The loader refuses them, naming the number to write, rather than
# let a file mean one thing here and another there. Forms both read alike are kept (`10`, `0x1F`,
# `1e-4`, `.inf`, `.nan`); forms only YAML 1.2 reads as numbers (`0o17`, `-.5`) stay text, which a
# key that wants a number refuses by type.
_CORE_INT = re.compile(r"[-+]?[0-9]+|0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
# Implicit types of YAML 1.1 that a loss graph never means: `2024-13-45` read as a date (which can
# fail), a lone `=` read as a "value" key. Without them such scalars are plain text.
_DROPPED_IMPLICIT_TAGS = {"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value", "tag:yaml.org,2002:yaml"}


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads YAML 1.2 floats such as `1e-4` (YAML 1.1 wants `1.0e-4`) and composes
    the node tree within `MAX_DEPTH`, `MAX_NODES` and `MAX_ALIAS_VALUES`."""

    def __init__(self, text: str, file: str | None):
        super().__init__(text)
        self.file = file
        self._depth = 0
        self._nodes = 0
        self._alias_values = 0
        # id(node) -> (values, levels) of every node composed so far, counted as if aliases were expanded.
        self._expanded: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                self._refuse(
                    f"the document nests deeper than {MAX_DEPTH} levels; a loss graph needs about 5 "
                    "(check for unclosed brackets or runaway indentation)",
                    event.start_mark,
                )
            if isinstance(event, yaml.AliasEvent):
                self._count_alias(event)
            else:
                self._nodes += 1
                if self._nodes > MAX_NODES:
                    self._refuse(
                        f"the document holds more than {MAX_NODES} values; a loss graph needs a few hundred "
                        "(check for a runaway list)",
                        event.start_mark,
                    )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if not isinstance(event, yaml.AliasEvent):
            self._measure(node)
        return node

    def _count_alias(self, event: yaml.AliasEvent) -> None:
        """Bound what an alias adds before anything is expanded; refuse an alias inside its own anchor."""
        target = self.anchors.get(event.anchor)
        if target is None:
            return  # undefined: PyYAML reports it
        measured = self._expanded.get(id(target))
        if measured is None:  # the anchored collection is still open, so it would contain itself
            self._refuse(
                f"alias *{event.anchor} is used inside the value it names, which would nest without end; "
                "remove the alias",
                event.start_mark,
            )
        values, levels = measured
        self._alias_values += values
        if self._alias_values > MAX_ALIAS_VALUES:
            self._refuse(
                f"with alias *{event.anchor}, aliases add more than {MAX_ALIAS_VALUES} values to this document "
                "(nested aliases multiply); write the values out instead: a loss graph needs no nested aliases",
                event.start_mark,
            )
        if self._depth - 1 + levels > MAX_DEPTH:
            self._refuse(
                f"alias *{event.anchor} nests the document deeper than {MAX_DEPTH} levels; "
                "write the values out instead",
                event.start_mark,
            )

    def _measure(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        sizes = [self._expanded[id(child)] for child in children]
        self._expanded[id(node)] = (1 + sum(v for v, _ in sizes), 1 + max((lv for _, lv in sizes), default=0))

    def _refuse(self, message: str, mark: yaml.Mark) -> typing.NoReturn:
        raise ConfigError([Diagnostic("error", "", message, self.file, mark.line + 1, mark.column + 1)])


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED_IMPLICIT_TAGS]
    for first, resolvers in _YamlLoader.yaml_implicit_resolvers.items()
}


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
        if node.tag not in _SCALAR_NOUNS:
            self._error(path, _unsupported_tag(node.tag, "a value"), mark)
            return None
        value, problem = self._scalar(node)
        if problem:
            self._error(path, problem, mark)
        return value

    def _scalar(self, node: yaml.ScalarNode) -> tuple[Any, str | None]:
        """The value of a plain scalar, or None and why it cannot be read (PyYAML would raise)."""
        noun = _SCALAR_NOUNS[node.tag]
        if node.tag in (_INT_TAG, _FLOAT_TAG) and len(node.value) > MAX_NUMBER_CHARS:
            return None, (
                f"{quote(node.value)} is read as {noun} of {len(node.value)} characters; "
                f"numbers have at most {MAX_NUMBER_CHARS}"
            )
        try:
            # The constructor itself, not construct_object: a failure must not leave its state half-set.
            value = self.loader.yaml_constructors[node.tag](self.loader, node)
        except (ValueError, LookupError):  # e.g. `!!float ''`, `!!int abc`, `!!bool maybe`, `._`
            shown = quote(node.value)
            if self.loader.resolve(yaml.ScalarNode, node.value, (True, False)) != node.tag:
                tag = node.tag.rsplit(":", 1)[-1]
                return None, f"{shown} cannot be read as {noun}; remove the `!!{tag}` tag or fix the value"
            return None, f"{shown} looks like {noun} but is not one; fix it, or quote it to make it text"
        if isinstance(value, str):
            problem = _lone_surrogate(value)
        elif node.tag in (_INT_TAG, _FLOAT_TAG):
            problem = _yaml11_only_number(node.value, value)
        else:
            problem = None
        return (None, problem) if problem else (value, None)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        if node.tag != _MAP_TAG:
            self._error(path, _unsupported_tag(node.tag, "a mapping"), node.start_mark)
        first_seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not self._plain_key(key_node):
                continue
            key, problem = self._scalar(key_node)
            if problem:
                continue  # reported below
            line = key_node.start_mark.line + 1
            if key in first_seen:
                self._error(
                    (*path, key),
                    f"duplicate key {quote(key)} (first defined at line {first_seen[key]}); "
                    "remove one of them or rename it",
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
            key, problem = self._scalar(key_node)
            if problem:
                self._error(path, problem, key_node.start_mark)
                continue
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
        """A scalar key with a plain tag (not a `<<` merge key, not a Python or other explicit tag)."""
        return isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_NOUNS

    def _error(self, path: Path, message: str, mark: yaml.Mark) -> None:
        self.diagnostics.append(
            Diagnostic("error", dotted(path), message, self.source_map.file, mark.line + 1, mark.column + 1)
        )


def _lone_surrogate(text: str) -> str | None:
    """Why a string holding half of a UTF-16 surrogate pair is refused (the reader refuses one written as
    a character; an escape in a double-quoted string, `"\\ud800"`, makes one)."""
    surrogate = _SURROGATE.search(text)
    if surrogate is None:
        return None
    return (
        f"{quote(text)} holds U+{ord(surrogate[0]):04X}, half of a UTF-16 surrogate pair, which is no character "
        "(it cannot be printed or saved as UTF-8); write the character itself, or one \\U escape for it "
        "(\\U0001F600, not \\ud83d\\ude00)"
    )


def _yaml11_only_number(text: str, value: int | float) -> str | None:
    """Why a number that PyYAML reads the YAML 1.1 way is refused: YAML 1.2 reads it otherwise."""
    if isinstance(value, float):
        if _CORE_FLOAT.fullmatch(text):
            return None
        other = None
    elif _CORE_INT.fullmatch(text):
        other = int(text, 16) if text.startswith("0x") else int(text)
        if other == value:
            return None
    else:
        other = None
    number = _number(value)
    if other is None:
        return (
            f"{quote(text)} is read as the number {number} by YAML 1.1 but as text by YAML 1.2 (and by editors "
            f"that check the file against its schema); write {number}, or quote it to make it text"
        )
    return (
        f"{quote(text)} is read as {number} by YAML 1.1 (a leading zero means octal) but as {other} by YAML 1.2; "
        f"write {number} or {other}, without the leading zero"
    )


def _unsupported_tag(tag: str, what: str) -> str:
    return (
        f"unsupported YAML tag {quote(tag)} on {what}; remove it: a loss graph holds plain mappings, lists and values"
    )


# PyYAML's own phrases ("found undefined alias", "while scanning an anchor") with a name of a readable length.
_MAX_YAML_PHRASE_CHARS = 160
# Hints for PyYAML's terse syntax messages, keyed by a fragment of the problem.
_SYNTAX_HINTS = {
    "'\\t'": "indent with spaces (YAML does not allow tabs)",
    "expected <block end>": "check the indentation of this line",
    "found another document": "a loss-graph file holds one document (remove the extra `---`)",
}


def parse_yaml(text: str, file: str | None = None) -> ParsedDocument:
    """Parse one YAML document safely; raise `ConfigError` for syntax errors and duplicate keys."""
    source_map = SourceMap(file=file)
    if len(text) > MAX_DOCUMENT_CHARS:
        line = text.count("\n", 0, MAX_DOCUMENT_CHARS) + 1
        # No count: a file is read only up to the limit (see `read_text`), so its length is not known.
        message = f"the document has more than the {MAX_DOCUMENT_CHARS} characters a loss graph may have"
        raise ConfigError([Diagnostic("error", "", f"{message} (the limit is crossed on this line)", file, line, 1)])
    loader: _YamlLoader | None = None
    try:
        loader = _YamlLoader(text, file)  # checks every character first
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
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_character_diagnostic(text, exc, file)]) from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_diagnostic(text, exc, file)]) from None
    except yaml.YAMLError as exc:
        message = f"YAML error: {shorten(str(exc), _MAX_YAML_PHRASE_CHARS)}"
        raise ConfigError([Diagnostic("error", "", message, file, 1, 1)]) from None
    finally:
        if loader is not None:
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


def _character_diagnostic(text: str, exc: yaml.reader.ReaderError, file: str | None) -> Diagnostic:
    """A character YAML does not allow (NUL, control characters, lone surrogates), located."""
    line = text.count("\n", 0, exc.position) + 1
    column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    name = " (NUL)" if code == 0 else ""
    message = f"character U+{code:04X}{name} is not allowed in YAML text; remove it, or write it as an escape in quotes"
    return Diagnostic("error", "", message, file, line, column)


def _syntax_diagnostic(text: str, exc: yaml.MarkedYAMLError, file: str | None) -> Diagnostic:
    """PyYAML's message with hints, or, for bad indentation, the line to fix and how."""
    mark = exc.problem_mark or exc.context_mark
    if mark is not None and isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError)):
        found = _misindented_line(text, mark.line)
        if found is not None:
            line, column, message = found
            return Diagnostic("error", "", f"YAML syntax error: {message}", file, line, column)
    context = exc.context
    if context and context.startswith("while") and exc.context_mark and mark and exc.context_mark.line != mark.line:
        context += f" (started at line {exc.context_mark.line + 1})"  # where an unclosed `[` or `{` opened
    # PyYAML's phrases are short; what can make one long is a name it repeats (an undefined alias, a tag).
    problem = " ".join(shorten(part, _MAX_YAML_PHRASE_CHARS) for part in (context, exc.problem) if part)
    problem += "".join(f"; {hint}" for fragment, hint in _SYNTAX_HINTS.items() if fragment in problem)
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    return Diagnostic("error", "", f"YAML syntax error: {problem}", file, line, column)


# --------------------------------------------------------------------------------------------------
# Bad indentation. PyYAML notices it where the structure stops making sense, which is often after the
# culprit: a dedented first key makes the next, correct, line look over-indented, and a misplaced key
# with children is noticed at its next sibling. So when parsing fails, each suspect line near the
# failure is re-indented like a neighbour and the text re-parsed. A re-indentation that lets the text
# parse names the line to fix. When several do, the likelier one wins: it indents the line by the file's
# usual step from its parent (a file indented by 2 has the odd line out at 1, 3 or 4), and lines it up
# with the lines on both sides of it.
# --------------------------------------------------------------------------------------------------

_NEAREST_SUSPECTS = 4  # the failing line and the lines just before it
_BLOCK_SUSPECTS = 3  # earlier lines that open a block (a misplaced key with children)
_LOOKBACK = 40  # lines before the failing one searched for suspects
_NEIGHBOUR_WINDOW = 8  # lines on each side whose indentation is tried
_LOOKAHEAD = 20  # lines after the failing one that a re-indented text must parse
_MAX_TRIALS = 24
_TRIAL_BUDGET = 64_000  # characters re-parsed in all (PyYAML parses some 100 KB/s on a slow core)


def _indent(line: str) -> int | None:
    """Spaces before the content, or None for blank, comment and tab-indented lines."""
    content = line.lstrip(" ")
    if not content or content.startswith("#") or content[0] == "\t":
        return None
    return len(line) - len(content)


def _significant(lines: list[str], numbers: range) -> list[int]:
    return [number for number in numbers if _indent(lines[number]) is not None]


def _opens_block(lines: list[str], number: int) -> bool:
    """True for a key without a value on its line (`losses:`) whose next significant line is deeper."""
    if not lines[number].split(" #")[0].rstrip().endswith(":"):
        return False
    following = _significant(lines, range(number + 1, min(len(lines), number + 1 + _NEIGHBOUR_WINDOW)))
    return bool(following) and _indent(lines[following[0]]) > _indent(lines[number])


def _suspects(lines: list[str], error_line: int) -> list[int]:
    """Lines whose indentation may have broken parsing at `error_line`: the nearest ones, the first of
    the lines deeper than it just before it (a key indented like its own children), earlier lines
    that open a block."""
    before = _significant(lines, range(error_line, max(-1, error_line - _LOOKBACK), -1))
    suspects = before[:_NEAREST_SUSPECTS]
    deeper = list(itertools.takewhile(lambda n: _indent(lines[n]) > _indent(lines[error_line]), before[1:]))
    if deeper and deeper[-1] not in suspects:
        suspects.append(deeper[-1])
    openers = [n for n in before[_NEAREST_SUSPECTS:] if n not in suspects and _opens_block(lines, n)]
    return suspects + openers[:_BLOCK_SUSPECTS]


def _usual_step(lines: list[str]) -> int:
    """How much deeper than its parent the file indents a block, most often (2 when it has no blocks)."""
    numbers = _significant(lines, range(len(lines)))
    steps = Counter(
        _indent(lines[child]) - _indent(lines[parent])
        for parent, child in itertools.pairwise(numbers)
        if _indent(lines[child]) > _indent(lines[parent])
    )
    return steps.most_common(1)[0][0] if steps else 2


def _step_from_parent(lines: list[str], number: int, indent: int) -> int:
    """How much deeper than its parent line `number` would be at `indent` (the indent itself at top level)."""
    for other in _significant(lines, range(number - 1, -1, -1)):
        if _indent(lines[other]) < indent:
            return indent - _indent(lines[other])
    return indent


def _orphans_children(lines: list[str], number: int, indent: int) -> bool:
    """True when line `number` opens a block that `indent` would no longer contain (only the line moves)."""
    following = _significant(lines, range(number + 1, min(len(lines), number + 1 + _NEIGHBOUR_WINDOW)))
    return _opens_block(lines, number) and _indent(lines[following[0]]) <= indent


def _lines_up(lines: list[str], number: int, indent: int) -> bool:
    """True when the significant lines on both sides of line `number` are indented `indent`."""
    above = _significant(lines, range(number - 1, -1, -1))[:1]
    below = _significant(lines, range(number + 1, min(len(lines), number + 1 + _NEIGHBOUR_WINDOW)))[:1]
    return bool(above and below) and _indent(lines[above[0]]) == indent == _indent(lines[below[0]])


def _neighbour_indents(lines: list[str], number: int) -> list[tuple[int, int]]:
    """(indent, line) of the nearest line with each indentation other than line `number`'s, nearest first."""
    own = _indent(lines[number])
    low, high = max(0, number - _NEIGHBOUR_WINDOW), min(len(lines), number + _NEIGHBOUR_WINDOW + 1)
    nearest: dict[int, int] = {}
    for other in sorted(range(low, high), key=lambda other: (abs(other - number), other)):
        indent = _indent(lines[other])
        if indent is not None and indent != own:
            nearest.setdefault(indent, other)
    return list(nearest.items())


def _parses(text: str, cut: int | None) -> bool:
    """True when `text` parses; with `cut` (the number of lines kept of a longer text), an error on
    its last line counts as parsing, since cutting the text may break a value there."""
    loader = yaml.SafeLoader(text)
    try:
        while loader.get_event() is not None:
            pass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return cut is not None and mark is not None and mark.line >= cut - 1
    finally:
        loader.dispose()
    return True


def _misindented_line(text: str, error_line: int) -> tuple[int, int, str] | None:
    """(line, column, message) of the line whose indentation breaks parsing at `error_line`, if one does."""
    lines = text.splitlines()  # the same line breaks as YAML, once the reader has accepted the text
    if error_line >= len(lines) or _indent(lines[error_line]) is None:
        return None
    window_end = min(len(lines), error_line + 1 + _LOOKAHEAD)
    cut = window_end if window_end < len(lines) else None
    trials = min(_MAX_TRIALS, _TRIAL_BUDGET // (sum(len(line) + 1 for line in lines[:window_end]) or 1))
    step = _usual_step(lines)
    repairs: list[tuple[int, int, int, int]] = []  # (likelihood, line, indent, the line of that indent)
    attempts = [
        (number, *pair)
        for number in _suspects(lines, error_line)
        for pair in _neighbour_indents(lines, number)
        if not _orphans_children(lines, number, pair[0])
    ]
    for number, indent, other in attempts[:trials]:
        changed = [*lines[:number], " " * indent + lines[number].lstrip(" "), *lines[number + 1 : window_end]]
        if _parses("\n".join(changed) + "\n", cut):
            likelihood = (_step_from_parent(lines, number, indent) == step) + _lines_up(lines, number, indent)
            repairs.append((likelihood, number, indent, other))
            if likelihood == 2:
                break
    if not repairs:
        return None
    _, number, indent, other = max(repairs, key=lambda repair: repair[0])  # the first of the likeliest
    other = _sibling(lines, number, indent) or other
    own = _indent(lines[number])
    where = "above" if other < number else "below"
    message = (
        f"this line is indented {own} space{'s' if own != 1 else ''}, but line {other + 1} {where} it is "
        f"indented {indent}; keys of one mapping must line up, so check the indentation of this line"
    )
    return number + 1, own + 1, message


def _sibling(lines: list[str], number: int, indent: int) -> int | None:
    """The nearest line indented `indent` in the same block as line `number` (none shallower between)."""
    found = []
    for direction in (range(number - 1, -1, -1), range(number + 1, len(lines))):
        for other in _significant(lines, direction):
            if _indent(lines[other]) < indent:
                break
            if _indent(lines[other]) == indent:
                found.append(other)
                break
    return min(found, key=lambda other: abs(other - number), default=None)


def read_text(path: str | FilePath) -> str:
    """Read a loss-graph file, turning OS and encoding failures into `SourceFileError`.

    Only a regular file is read, and only as much of it as can hold `MAX_DOCUMENT_CHARS` characters
    and one more: a device (/dev/zero), a FIFO without a writer or a huge sparse file must neither
    block nor fill the memory. A longer file comes back cut, still too long, for `parse_yaml` to refuse.
    """
    try:
        # Non-blocking, so that opening a FIFO without a writer returns at once (to be refused below);
        # reads of a regular file are not affected.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SourceFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise SourceFileError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISREG(mode):
            with os.fdopen(descriptor, "rb", closefd=False) as handle:
                data = handle.read(_MAX_READ_BYTES)
    except OSError as exc:
        raise SourceFileError(f"{path}: cannot be read ({exc.strerror})") from None
    finally:
        os.close(descriptor)
    if not stat.S_ISREG(mode):
        raise SourceFileError(_not_a_regular_file(path, mode))
    try:
        # Strict, but a character cut at the end of a cut file is left out rather than an error.
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=len(data) < _MAX_READ_BYTES)
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8", errors="replace")) + 1
        raise SourceFileError(
            f"{path}:{line}:{column}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from None


def _not_a_regular_file(path: str | FilePath, mode: int) -> str:
    """Why a directory, a device, a FIFO or a socket is not read, in words."""
    if stat.S_ISDIR(mode):
        return f"{path}: is a directory, not a loss-graph file"
    kinds = {
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    return f"{path}: is {kind}, not a regular file; give the path of a loss-graph YAML file"


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
        return f"the string {quote(value)}"
    return f"{type(value).__name__} {quote(value)}"


def _number(value: Any) -> str:
    """A number as a message shows it: integers in full, floats briefly (1e+308, 0.001, 1000000)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


# pydantic's range errors: the context key of the limit, and the comparison it names.
_RANGE_ERRORS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def _range_message(kind: str, ctx: dict[str, Any], value: Any, loc: tuple[Any, ...]) -> str:
    """`1e+308 is too large; use a value <= 1000000 (why that is the limit)`."""
    key, comparison = _RANGE_ERRORS[kind]
    limit = ctx[key]
    shown = _number(value)
    if key in ("ge", "gt"):
        problem = "is negative" if limit == 0 and value < 0 else "is too small"
    else:
        problem = "is too large"
    message = f"{shown} {problem}; use a value {comparison} {_number(limit)}"
    if key in ("ge", "gt") and limit in (0, 1):
        return message  # a natural lower bound (counts, sizes, weights) needs no reason
    # The field is the last name in the location (pydantic puts union tags and indices after it).
    field = next((part for part in reversed(loc) if isinstance(part, str) and part in BOUND_REASONS), None)
    return f"{message} ({BOUND_REASONS[field]})" if field else message


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


def _section_of(value: Any) -> tuple[str, str] | None:
    """(section, why) when `value` looks like an entry of `losses`, `sources` or `heads`: its `type:`
    is a loss kind or a source kind, or it has only keys of a head (such as `offset`)."""
    if not isinstance(value, dict) or not value:
        return None
    kind = value.get("type")
    kind = kind if isinstance(kind, str) else None  # a list or a mapping there is no kind's name
    if kind in {loss.name for loss in loss_kinds()}:
        return "losses", f"`type: {kind}` is a loss kind"
    if kind in {source.name for source in source_kinds()}:
        return "sources", f"`type: {kind}` is a source kind"
    if set(value) <= set(Head.model_fields):
        return "heads", f"with {', '.join(f'`{key}`' for key in value)} it looks like a head"
    return None


def _message(error: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "missing":
        return f"missing required key {quote(loc[-1])}"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model else []
        section = _section_of(value) if model is LossGraphSpec else None
        if section:  # a loss node, source or head written at the top level (indented too little)
            hint = f"; {section[1]}, so it belongs under `{section[0]}:` (indent it there)"
        else:
            hint = did_you_mean(str(loc[-1]), allowed)
        if not hint and allowed:
            hint = f"; allowed keys: {', '.join(allowed)}"
        return f"unknown key {quote(loc[-1])}{hint}"
    if kind == "union_tag_invalid":
        expected = [tag.strip().strip("'") for tag in str(ctx.get("expected_tags", "")).split(",")]
        hint = did_you_mean(str(ctx.get("tag")), expected)
        name = str(ctx.get("discriminator", "type")).strip("'")
        section = _section_of({"type": ctx.get("tag")}) if name == "type" else None
        if section and section[0] != loc[0]:  # a loss node under `sources`, or a source under `losses`
            hint = f"; {section[1]}: move this entry under `{section[0]}:`"
        plugins = f"; {PLUGIN_HINT}" if name == "type" and not hint else ""  # no closer guess to offer
        return f"unknown {name} {quote(ctx.get('tag'))}{hint} (one of: {', '.join(expected)}){plugins}"
    if kind == "union_tag_not_found":
        name = str(ctx.get("discriminator", "type")).strip("'")
        return f"missing required key {quote(name)}, which picks the kind"
    if kind == "string_pattern_mismatch":
        return f"{quote(value)} is not a valid name: use letters, digits and underscores, not starting with a digit"
    if kind == "literal_error" and loc == ("version",):
        return f"version {quote(value)} is not supported; this lossgraph reads version 1 files"
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = [c.strip().strip("'") for c in re.split(r",| or ", expected) if c.strip()]
        hint = did_you_mean(str(value), choices) if isinstance(value, str) else ""
        return f"must be {expected}, got {_kind(value)}{hint}"
    if kind == "string_type" and isinstance(value, bool):
        return f"expected a string, got {_kind(value)}; YAML reads unquoted yes/no/on/off as booleans, so quote it"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {_kind(value)}"
    if kind in _RANGE_ERRORS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _range_message(kind, ctx, value, loc)
    if kind == NODE_RULE:
        return ctx["message"]
    if kind == "too_short":
        minimum = ctx.get("min_length", 1)
        return f"needs at least {minimum} entr{'y' if minimum == 1 else 'ies'}"
    message = str(error["msg"]).replace("Input should be", "must be")
    message = message[0].lower() + message[1:]
    return f"{message}, got {_kind(value)}"


def validate_schema(document: ParsedDocument) -> LossGraphSpec:
    """Validate parsed data against the spec; raise `ConfigError` with every located problem."""
    spec, broken_rules = check_schema(document)
    if broken_rules:
        raise ConfigError(broken_rules)
    return spec


def check_schema(document: ParsedDocument) -> tuple[LossGraphSpec, list[Diagnostic]]:
    """Validate parsed data against the spec. Raise `ConfigError` with every located problem when the
    document's shape is wrong (keys, types, ranges); when only node rules are broken (a negative weight,
    see `lossgraph.spec.nodes.NODE_RULE`), return the spec validated without them and those problems,
    so that the checks across the graph can run as well. The spec is valid only without problems."""
    try:
        spec = LossGraphSpec.model_validate(document.data)
        broken_rules: list[Diagnostic] = []
    except ValidationError as exc:
        errors = exc.errors()
        diagnostics = _unique([_diagnostic(document, error) for error in errors])
        if any(error["type"] != NODE_RULE for error in errors):
            raise ConfigError(diagnostics) from None
        spec = LossGraphSpec.model_validate(document.data, context=WITHOUT_NODE_RULES)
        broken_rules = diagnostics
    spec._source_map = document.source_map
    return spec, broken_rules


def _diagnostic(document: ParsedDocument, error: dict[str, Any]) -> Diagnostic:
    """One pydantic error, located in the document."""
    loc = tuple(error["loc"])
    path = _document_path(document.data, loc)
    if error["type"] == "missing":
        return document.source_map.diagnostic(path, _message(error, loc))
    if error["type"] == "union_tag_invalid":  # point at the `type:` (or `schedule:`) value itself
        path = (*path, str(error["ctx"]["discriminator"]).strip("'"))
    is_key = error["type"] == "extra_forbidden" or (loc and loc[-1] == "[key]")
    if error["type"] == "extra_forbidden" and path[-1:] != (loc[-1],):
        path = (*path, loc[-1])
    return document.source_map.diagnostic(path, _message(error, loc), key=bool(is_key))


def _unique(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    seen: set[Diagnostic] = set()
    return [d for d in diagnostics if not (d in seen or seen.add(d))]
