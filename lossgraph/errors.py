"""The one exception family of lossgraph, and the diagnostics that configuration errors carry.

Every error a user can cause is a `LossGraphError` whose message says what is wrong and how to fix it.
The CLI turns them into exit codes and clean messages; the library never prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]

# The most characters of a document's text that a message repeats. Names and values take a few dozen;
# a 200,000-character name would otherwise be printed whole, once for every mention.
MAX_SHOWN_CHARS = 60


def shorten(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters, the cut marked with `...`."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote(value: object) -> str:
    """A value from a document as every message shows it: its repr (quoted, with escapes for line
    breaks, U+202E and other characters that do not print), cut to a readable length."""
    return repr(shorten(value)) if isinstance(value, str) else shorten(repr(value))


def printable(text: str) -> str:
    """`text` with each character that does not print (line breaks, tabs, bidirectional controls such
    as U+202E, lone surrogates) written as its escape, so that one message stays one line, reads in
    the order it was written and can be encoded."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a loss-graph document, located by file, line, column and dotted path."""

    severity: Severity
    path: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def format(self) -> str:
        """`FILE:LINE:COL: path: message` (missing parts left out), the form editors can jump to; on one
        line whatever the document's names hold (see `printable`)."""
        where = self.file or "<string>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        kind = "" if self.severity == "error" else f"{self.severity}: "
        path = f"{self.path}: " if self.path else ""
        return printable(f"{where}: {kind}{path}{self.message}")

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
        }


def sort_diagnostics(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """Sort by file, then line and column (unlocated last), keeping the order of equal positions."""
    big = 1 << 30
    return sorted(
        diagnostics,
        key=lambda d: (d.file or "", d.line if d.line is not None else big, d.column or 0),
    )


class LossGraphError(Exception):
    """Base of every error lossgraph raises on purpose."""


class ConfigError(LossGraphError):
    """A loss-graph document is unreadable or invalid; `diagnostics` lists every problem found."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sort_diagnostics([d for d in diagnostics if d.severity == "error"])
        count = len(self.diagnostics)
        lines = [d.format() for d in self.diagnostics]
        header = f"invalid loss graph ({count} error{'s' if count != 1 else ''})"
        super().__init__("\n".join([header, *lines]))


class SourceFileError(LossGraphError):
    """A loss-graph file could not be read at all (missing, a directory, not UTF-8)."""


class PluginError(LossGraphError):
    """A plugin that adds kinds could not be loaded (it fails to import, or registers a name that is taken).
    The message names the plugin and how it was given: entry point, `--plugin` or LOSSGRAPH_PLUGINS."""


class KindError(LossGraphError):
    """A loss kind's kernel fragments would miscompile its kernel (a built-in's bug, or a plugin's): they
    read a name that is not in scope, assign a kernel variable, or return what is not one expression. The
    message names the kind, the fragment method and the name."""


class InputError(LossGraphError):
    """A tensor or value given to a compiled graph at run time is wrong (shape, dtype, name, range)."""


class BackendError(LossGraphError):
    """The requested backend cannot run here (for example the Triton backend without Triton or a GPU)."""


class LossGraphWarning(UserWarning):
    """A loss graph is valid but probably not what was meant (an unused source, a head without losses)."""
