"""'Did you mean' hints for misspelled names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from ..errors import quote


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest choice, or an empty string when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {quote(matches[0])}?" if matches else ""
