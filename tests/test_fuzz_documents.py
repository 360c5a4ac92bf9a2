"""Fuzzing the YAML front door: no document makes `lossgraph validate` crash, hang or bloat.

Documents come from Hypothesis strategies of three families:

- textual mutations of the example graphs (examples/*.yaml): characters inserted or deleted, lines
  re-indented, moved or cut, numbers swapped for edge cases, values tagged or replaced by hostile YAML;
- structural mutations: an example parsed, keys dropped, renamed or added, values replaced by random
  trees, then dumped back in block or flow style;
- hostile YAML: alias bombs, recursive aliases, merge chains, deep nesting, control characters and
  invalid UTF-8, huge numbers everywhere, webs of mixtures.

Each document goes through the `validate` command in-process. It must exit with 0 or 1 (2 only for
bytes that are not UTF-8), raise nothing, print no traceback, locate every diagnostic by line and
column, and answer within MAX_SECONDS.

`make test` runs a fixed, derandomized slice of FAST_EXAMPLES documents (a few seconds). The long run
is `make fuzz FUZZ_EXAMPLES=10000`, which runs this file as a script (`python tests/test_fuzz_documents.py
10000`), outside pytest so that the peak memory it reports is that of validating, not of the test
suite's imports: random documents, and it prints the counts, the time per document, the slowest
document and the peak memory of the process, which must stay under MAX_PEAK_MB.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import lossgraph
from lossgraph.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_TEXTS = [path.read_text(encoding="utf-8") for path in sorted((ROOT / "examples").glob("*.yaml"))]
EXAMPLE_DATA = [yaml.safe_load(text) for text in EXAMPLE_TEXTS]

FAST_EXAMPLES = 60
TRACEBACK = "Traceback (most recent call last)"
MAX_SECONDS = 2.0
MAX_PEAK_MB = 200

# --------------------------------------------------------------------------------------------------
# Ingredients.
# --------------------------------------------------------------------------------------------------

# Characters that mean something to YAML, and characters it refuses or treats specially.
YAML_SYNTAX = ":-?,[]{}#&*!|>'\"%@` \n\t"
ODD_CHARACTERS = "\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\u2028\u2029\ufeff\ufffe\uffff\u00e9\U0001f600"
EDGE_NUMBERS = [
    "0", "-0", "1e308", "1.0e+308", "-1.0e+308", "1e999", "10**30", "1" + "0" * 30, "2147483648",
    "-2147483649", "4294967296", "16777217", "1000001", "1000000", "1e-3", "0.001", "1000.0", "1e-320",
    "5e-324", "0x7fffffff", "0o777", "0b101", "1_000_000", "1:30", "190:20:30", ".inf", "-.inf", ".nan",
    "9" * 101, "1" * 5000, "1:" * 40 + "1", "._", "._e1", ".e5", "1__0", "0_", "+", "-", "~", "null",
    "yes", "2024-13-45", "2001-12-14t21:59:43.10-05:00", "=", "<<",
]  # fmt: skip
TAGS = [
    "!!float", "!!int", "!!bool", "!!null", "!!str", "!!timestamp", "!!binary", "!!set", "!!omap",
    "!!pairs", "!!map", "!!seq", "!!merge", "!!value", "!!python/object/apply:os.system",
    "!!python/name:os.system", "!local", "!<tag:yaml.org,2002:int>", "!",
]  # fmt: skip
HOSTILE_VALUES = [
    "&a [*a]", "*undefined", "{<<: 5}", "{<<: [1, 2]}", "[" * 60, "{a: " * 60, "'unterminated", '"\\x"',
    '"\\ud800"', "|\n  block text", ">-\n  folded", "? complex", "- item", "{a: 1, a: 2}", "&x 1", "*x",
    "!!binary AAAA", "[1, [2, [3]]]", "{? [a]: 1}", "&a {x: 1}", "{<<: *a}", "---", "...", "%YAML 1.1",
    "@reserved", "`reserved", "!!python/object:os.system {}", "- - - -", ": :",
]  # fmt: skip
SPEC_WORDS = [
    "version", "vocab_size", "heads", "sources", "losses", "next", "mtp2", "labels", "teacher", "type",
    "offset", "target", "weight", "temperature", "schedule", "linear", "mixture", "weights", "k", "tail",
    "cross_entropy", "forward_kl", "start", "end", "steps", "warmup", "head_weights", "ignore_index",
]  # fmt: skip

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)
PLAIN_VALUE = re.compile(r"(?<=: )[^\s,{}\[\]#]+")

# --------------------------------------------------------------------------------------------------
# Textual mutations of an example: each takes Hypothesis's `draw` and a text, and returns a text.
# --------------------------------------------------------------------------------------------------


def _insert_characters(draw, text: str) -> str:
    at = draw(st.integers(0, len(text)))
    piece = draw(st.text(alphabet=YAML_SYNTAX + ODD_CHARACTERS + "az09", min_size=1, max_size=6))
    return text[:at] + piece + text[at:]


def _delete_span(draw, text: str) -> str:
    start = draw(st.integers(0, len(text)))
    stop = draw(st.integers(start, min(len(text), start + 40)))
    return text[:start] + text[stop:]


def _reindent_line(draw, text: str) -> str:
    lines = text.split("\n")
    number = draw(st.integers(0, len(lines) - 1))
    indent = draw(st.sampled_from([" " * n for n in range(9)] + ["\t", " \t"]))
    lines[number] = indent + lines[number].lstrip(" \t")
    return "\n".join(lines)


def _move_line(draw, text: str) -> str:
    lines = text.split("\n")
    source = draw(st.integers(0, len(lines) - 1))
    line = lines[source] if draw(st.booleans()) else lines.pop(source)  # copy or move
    lines.insert(draw(st.integers(0, len(lines))), line)
    return "\n".join(lines)


def _replace_number(draw, text: str) -> str:
    matches = list(NUMBER.finditer(text))
    if not matches:
        return text
    match = draw(st.sampled_from(matches))
    number = draw(
        st.one_of(
            st.sampled_from(EDGE_NUMBERS),
            st.integers().map(str),
            st.floats().map(lambda value: f"{value!r}".replace("inf", ".inf").replace("nan", ".nan")),
        )
    )
    return text[: match.start()] + number + text[match.end() :]


def _tag_value(draw, text: str) -> str:
    matches = list(PLAIN_VALUE.finditer(text))
    if not matches:
        return text
    match = draw(st.sampled_from(matches))
    return text[: match.start()] + draw(st.sampled_from(TAGS)) + " " + text[match.start() :]


def _replace_value(draw, text: str) -> str:
    matches = list(PLAIN_VALUE.finditer(text))
    if not matches:
        return text
    match = draw(st.sampled_from(matches))
    return text[: match.start()] + draw(st.sampled_from(HOSTILE_VALUES)) + text[match.end() :]


def _truncate(draw, text: str) -> str:
    return text[: draw(st.integers(0, len(text)))]


TEXT_MUTATIONS = [
    _insert_characters,
    _delete_span,
    _reindent_line,
    _move_line,
    _replace_number,
    _tag_value,
    _replace_value,
    _truncate,
]


@st.composite
def textual_mutants(draw) -> str:
    text = draw(st.sampled_from(EXAMPLE_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        text = draw(st.sampled_from(TEXT_MUTATIONS))(draw, text)
    return text


# --------------------------------------------------------------------------------------------------
# Structural mutations: change the parsed tree of an example and dump it again.
# --------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(SPEC_WORDS),
)
TREES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(SPEC_WORDS) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a tree of dicts and lists (the root excluded)."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    found = []
    for key, child in children:
        found.append((*path, key))
        found.extend(_paths(child, (*path, key)))
    return found


def _at(tree: Any, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


@st.composite
def structural_mutants(draw) -> str:
    data = copy.deepcopy(draw(st.sampled_from(EXAMPLE_DATA)))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(data, path[:-1]), path[-1]
        action = draw(st.sampled_from(["delete", "replace", "rename", "add"]))
        if action == "delete":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(TREES)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(SPEC_WORDS) | st.text(max_size=8))] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(SPEC_WORDS))] = draw(TREES)
        else:
            parent.append(draw(TREES))
    flow = draw(st.sampled_from([None, True, False]))
    return yaml.safe_dump(data, default_flow_style=flow, sort_keys=draw(st.booleans()), allow_unicode=True)


# --------------------------------------------------------------------------------------------------
# Hostile YAML.
# --------------------------------------------------------------------------------------------------

HEADER = "version: 1\nvocab_size: 32000\nheads: {next: {offset: 1}}\n"


@st.composite
def alias_bombs(draw) -> str:
    width, depth = draw(st.integers(2, 9)), draw(st.integers(1, 9))
    lines = [HEADER.rstrip("\n"), "description:", "  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &a{level} [{', '.join([f'*a{level - 1}'] * width)}]" for level in range(1, depth + 1)]
    lines.append("losses: {z: {type: z_loss, heads: [next]}}")
    return "\n".join(lines) + "\n"


@st.composite
def merge_chains(draw) -> str:
    count = draw(st.integers(1, 60))
    lines = [HEADER.rstrip("\n"), "sources: {labels: {type: labels}}", "losses:"]
    lines.append("  l0: &l0 {type: cross_entropy, heads: [next], target: labels}")
    for index in range(1, count):
        parents = ", ".join(f"*l{draw(st.integers(0, index - 1))}" for _ in range(draw(st.integers(1, 4))))
        lines.append(f"  l{index}: &l{index} {{<<: [{parents}], weight: 0.5}}")
    return "\n".join(lines) + "\n"


RECURSIVE_ALIASES = [
    "a: &a [*a]\n",
    "a: &a {b: *a}\n",
    "a: &a {<<: *a}\n",
    HEADER + "losses: &l {z: {type: z_loss, heads: [next], description: *l}}\n",
    "&root {a: *root}\n",
    "a: &x [&y [*x, *y]]\n",
]


@st.composite
def deep_nesting(draw) -> str:
    depth = draw(st.integers(20, 3000))
    style = draw(st.sampled_from(["flow list", "flow mapping", "block mapping", "block list", "mixed"]))
    if style == "flow list":
        return "description: " + "[" * depth + "]" * depth + "\n"
    if style == "flow mapping":
        return "description: " + "{a: " * depth + "1" + "}" * depth + "\n"
    if style == "block mapping":
        return "".join("  " * level + f"k{level}:\n" for level in range(depth))
    if style == "block list":
        return "".join("  " * level + "-\n" for level in range(depth))
    return "a: " + "[{b: " * (depth // 2) + "1" + "}]" * (depth // 2) + "\n"


@st.composite
def odd_characters(draw) -> str:
    text = draw(st.sampled_from(EXAMPLE_TEXTS))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(ODD_CHARACTERS)) + text[at:]
    return text


@st.composite
def invalid_utf8(draw) -> bytes:
    data = draw(st.sampled_from(EXAMPLE_TEXTS)).encode("utf-8")
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe9t\xe9", b"\x80"])) + data[at:]


@st.composite
def huge_numbers(draw) -> str:
    text = draw(st.sampled_from(EXAMPLE_TEXTS))
    return NUMBER.sub(lambda _: draw(st.sampled_from(EDGE_NUMBERS)), text)


@st.composite
def mixture_webs(draw) -> str:
    """Many mixtures reading each other: cycles, diamonds and long chains."""
    count = draw(st.integers(2, 40))
    lines = [HEADER.rstrip("\n"), "sources:", "  t0: {type: teacher}", "  t1: {type: teacher}"]
    names = ["t0", "t1"] + [f"m{index}" for index in range(count)]
    for index in range(count):
        members = draw(st.lists(st.sampled_from(names), min_size=2, max_size=5))
        lines.append(f"  m{index}: {{type: mixture, sources: [{', '.join(members)}]}}")
    target = draw(st.sampled_from(names))
    lines.append(f"losses: {{d: {{type: reverse_kl, heads: [next], target: {target}}}}}")
    return "\n".join(lines) + "\n"


HOSTILE = st.one_of(
    alias_bombs(),
    merge_chains(),
    st.sampled_from(RECURSIVE_ALIASES),
    deep_nesting(),
    odd_characters(),
    huge_numbers(),
    mixture_webs(),
)

DOCUMENTS = st.one_of(
    textual_mutants(),
    structural_mutants(),
    HOSTILE,
    invalid_utf8(),
)

# --------------------------------------------------------------------------------------------------
# The check, and what the long run reports.
# --------------------------------------------------------------------------------------------------


@dataclass
class FuzzStats:
    documents: int = 0
    exit_codes: Counter = field(default_factory=Counter)
    tracebacks: int = 0
    over_time: int = 0
    total_seconds: float = 0.0
    slowest_seconds: float = 0.0
    slowest_document: str = ""

    def summary(self) -> str:
        mean_ms = 1000 * self.total_seconds / max(1, self.documents)
        codes = ", ".join(f"exit {code}: {count}" for code, count in sorted(self.exit_codes.items()))
        return "\n".join(
            [
                f"fuzzed documents: {self.documents} ({codes})",
                f"tracebacks: {self.tracebacks}",
                f"runs over {MAX_SECONDS:g} s: {self.over_time}",
                f"time per document: mean {mean_ms:.1f} ms, slowest {1000 * self.slowest_seconds:.0f} ms "
                f"(starts {self.slowest_document[:60]!r})",
                f"total validate time: {self.total_seconds:.1f} s",
                f"peak RSS of the process: {peak_mb():.0f} MB",
            ]
        )


def validate_document(document: str | bytes, folder: Path, stats: FuzzStats) -> None:
    """`lossgraph validate` on one document: a clean exit, located diagnostics, in time."""
    data = document.encode("utf-8") if isinstance(document, str) else document
    path = folder / "fuzz.yaml"
    path.write_bytes(data)
    as_json = stats.documents % 2 == 0  # every other document through the text output
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", *(["--json"] if as_json else []), str(path)])
    seconds = time.perf_counter() - started

    stats.documents += 1
    stats.exit_codes[result.exit_code] += 1
    stats.total_seconds += seconds
    if seconds > stats.slowest_seconds:
        stats.slowest_seconds, stats.slowest_document = seconds, data.decode("utf-8", errors="replace")
    crashed = not isinstance(result.exception, (SystemExit, type(None))) or TRACEBACK in result.output
    stats.tracebacks += crashed
    stats.over_time += seconds > MAX_SECONDS

    shown = f"\ndocument: {data[:300]!r}\noutput: {result.output[-2000:]}"
    assert not crashed, f"validate crashed: {result.exception!r}{shown}"
    assert seconds <= MAX_SECONDS, f"validate took {seconds:.2f} s{shown}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert result.exit_code == 2, shown
        return
    assert result.exit_code in (0, 1), shown
    if not as_json:
        assert result.stdout.splitlines()[-1].startswith(f"{path}: "), shown  # the summary line
        return
    report = json.loads(result.stdout)["files"][0]
    assert report["valid"] == (result.exit_code == 0), shown
    for diagnostic in report["diagnostics"]:
        assert diagnostic["line"] is not None and diagnostic["column"] is not None, f"unlocated: {diagnostic}{shown}"
        assert diagnostic["message"], shown


def run_fuzz(examples: int, stats: FuzzStats, *, derandomize: bool, batch: int = 500) -> None:
    """Validate `examples` documents, in batches: Hypothesis remembers every document of a run, so a
    fresh run per batch keeps its memory flat."""
    with tempfile.TemporaryDirectory() as folder:
        CliRunner().invoke(app, ["validate", str(ROOT / "examples" / "lm.yaml")])  # imports, not timed

        def check(document: str | bytes) -> None:
            validate_document(document, Path(folder), stats)

        for start in range(0, examples, batch):
            options = settings(
                max_examples=min(batch, examples - start),
                derandomize=derandomize,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            options(given(document=DOCUMENTS)(check))()


def peak_mb() -> float:
    """Peak RSS of this process: VmHWM where Linux gives it (ru_maxrss counts the parent of a fork too)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def test_fuzzed_documents_are_rejected_cleanly():
    """The fast, fixed slice of `make test` (the long run is `make fuzz`)."""
    stats = FuzzStats()
    run_fuzz(FAST_EXAMPLES, stats, derandomize=True)
    print("\n" + stats.summary())
    assert stats.tracebacks == 0 and stats.over_time == 0


# --------------------------------------------------------------------------------------------------
# The generators themselves produce what they are meant to.
# --------------------------------------------------------------------------------------------------


def test_examples_are_the_seed_corpus():
    assert len(EXAMPLE_TEXTS) >= 5
    assert all(lossgraph.check_text(text).ok for text in EXAMPLE_TEXTS)


@settings(max_examples=10, derandomize=True, deadline=None, database=None)
@given(document=alias_bombs())
def test_alias_bombs_are_bombs(document: str):
    assert "*a0" in document


@settings(max_examples=10, derandomize=True, deadline=None, database=None)
@given(document=structural_mutants())
def test_structural_mutants_are_yaml(document: str):
    yaml.safe_load(document)


def main(arguments: list[str]) -> int:
    """`python tests/test_fuzz_documents.py [N]`: the long run of `make fuzz`; exit 1 on any failure."""
    examples = int(arguments[0]) if arguments else int(os.environ.get("FUZZ_EXAMPLES", "10000"))
    started = time.perf_counter()
    stats = FuzzStats()
    try:
        run_fuzz(examples, stats, derandomize=False)
    finally:  # the counts so far, also when a document failed
        print(f"wall time: {time.perf_counter() - started:.0f} s")
        print(stats.summary(), flush=True)
    failed = stats.tracebacks or stats.over_time or peak_mb() >= MAX_PEAK_MB
    print(f"{'FAILED' if failed else 'passed'}: limits are {MAX_SECONDS:g} s per document and {MAX_PEAK_MB} MB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
