"""Where each part of a loss-graph document came from: file, line and column by dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Diagnostic, Severity, shorten

PathPart = str | int
Path = tuple[PathPart, ...]


def dotted(path: Path) -> str:
    """`("losses", "lm", "heads", 0)` -> `losses.lm.heads[0]`; each name cut to a readable length."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{shorten(part)}" if text else shorten(part)
    return text


@dataclass
class SourceMap:
    """Line and column (1-based) of every node of a parsed document, for values and for mapping keys."""

    file: str | None = None
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int] | None:
        """Position of `path` (its key when `key`), else of its nearest located ancestor."""
        table = self.keys if key else self.values
        if path in table:
            return table[path]
        for cut in range(len(path) - 1, -1, -1):
            if path[:cut] in self.values:
                return self.values[path[:cut]]
        return None

    def diagnostic(self, path: Path, message: str, *, severity: Severity = "error", key: bool = False) -> Diagnostic:
        """A diagnostic for `path`, located in this document."""
        where = self.locate(path, key=key)
        line, column = where if where else (None, None)
        return Diagnostic(severity, dotted(path), message, self.file, line, column)
