"""Hostile and broken YAML: every document is rejected with a located message, in bounded time and memory.

The classes: alias bombs and recursive aliases, nesting deep enough to exhaust the
recursion limit, characters the YAML reader refuses, explicit tags on scalars that cannot be read,
numbers out of the range the kernels and float32 honour, and bad indentation reported on the wrong
line. tests/invalid/ holds one document per class with the exact messages; this file checks the
command line end to end and the edges of each limit.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lossgraph
from lossgraph.compiler.passes import MAX_MIXTURE_PARTS
from lossgraph.document import check_file, check_text
from lossgraph.errors import Diagnostic
from lossgraph.spec import loader
from lossgraph.spec import models as spec

ROOT = Path(__file__).resolve().parents[1]
INVALID = ROOT / "tests" / "invalid"
TRACEBACK = "Traceback (most recent call last)"

# One document of each class (in tests/invalid/), and the start of its first message.
HOSTILE_FILES = {
    "alias_bomb.yaml": (14, 10, "with alias *a3, aliases add more than 10000 values"),
    "alias_recursive.yaml": (7, 49, "alias *losses is used inside the value it names"),
    "nesting_too_deep.yaml": (7, 45, "the document nests deeper than 32 levels"),
    "control_character.yaml": (6, 62, "character U+0007 is not allowed in YAML text"),
    "tag_on_bad_scalar.yaml": (6, 13, "vocab_size: '' cannot be read as a number; remove the `!!float` tag"),
    "tag_not_plain.yaml": (7, 14, "description: unsupported YAML tag 'tag:yaml.org,2002:timestamp'"),
    "numbers_out_of_range.yaml": (12, 13, "vocab_size: 1000000000000000000000000000000 is too large"),
    "dedented_key.yaml": (14, 4, "YAML syntax error: this line is indented 3 spaces, but line 13 above"),
    "dedented_schedule_key.yaml": (17, 6, "YAML syntax error: this line is indented 5 spaces, but line 16 above"),
    "lone_surrogate.yaml": (8, 65, "losses.z.description: '\\ud800' holds U+D800, half of a UTF-16 surrogate pair"),
    "yaml11_numbers.yaml": (12, 73, "losses.lm.weight: '1:30' is read as the number 90 by YAML 1.1 but as text"),
}

# What `lossgraph validate` may take on a hostile file, start-up included (it needs about 0.4 s and 60 MB).
CLI_SECONDS = 2.0
CLI_ADDRESS_SPACE = 200 * 1024 * 1024

HEADER = "version: 1\nvocab_size: 32000\nheads: {next: {offset: 1}}\n"
Z_LOSS = "losses: {z: {type: z_loss, heads: [next]}}\n"


def errors(text: str) -> list[Diagnostic]:
    return lossgraph.check_text(text, "h.yaml").errors


def only_error(text: str) -> Diagnostic:
    found = errors(text)
    assert len(found) == 1, "\n".join(d.format() for d in found)
    return found[0]


def alias_bomb(width: int, depth: int) -> str:
    lines = ["description:", "  - &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"  - &a{level} [{', '.join([f'*a{level - 1}'] * width)}]" for level in range(1, depth + 1)]
    return HEADER + Z_LOSS + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The command line: exit code 1, the located message, never a traceback.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE_FILES), ids=[Path(name).stem for name in HOSTILE_FILES])
def test_validate_reports_the_located_problem(cli, name: str):
    line, column, message = HOSTILE_FILES[name]
    path = INVALID / name
    result = cli("validate", path)
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[0].startswith(f"{path}:{line}:{column}: {message}"), result.output
    assert TRACEBACK not in result.output


def run_bounded(*args: str | Path) -> subprocess.CompletedProcess:
    """`lossgraph ARGS...` in a real process whose address space is capped at 200 MB (past it, Python
    raises MemoryError: a traceback); checks the time it took and that it printed no traceback."""

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CLI_ADDRESS_SPACE, CLI_ADDRESS_SPACE))

    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "lossgraph", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,  # a file that blocks fails here, not in the CI job's own limit
        preexec_fn=cap_memory,
    )
    seconds = time.perf_counter() - started
    assert TRACEBACK not in result.stdout + result.stderr, result.stderr
    assert seconds < CLI_SECONDS, f"{seconds:.2f} s"
    return result


def test_validate_in_a_real_process_prints_no_traceback():
    paths = [INVALID / name for name in HOSTILE_FILES]
    result = subprocess.run(
        [sys.executable, "-m", "lossgraph", "validate", "--json", *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    files = json.loads(result.stdout)["files"]
    assert [f["valid"] for f in files] == [False] * len(paths)
    assert all(d["line"] and d["column"] for f in files for d in f["diagnostics"])


def test_a_wide_deep_alias_bomb_is_refused_fast_and_small(tmp_path: Path):
    # Width 9, depth 7 used to pass 3 GB and keep growing; now the loader stops at the alias that
    # crosses the limit, before anything is expanded.
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9, 7), encoding="utf-8")
    assert path.stat().st_size < 1500
    # VmHWM, the peak RSS of this program (ru_maxrss would include the pytest process it was forked from).
    code = (
        "import sys; from lossgraph.document import check_file; "
        "report = check_file(sys.argv[1]); print(report.errors[0].format()); "
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    seconds = time.perf_counter() - started
    message, peak_kb = result.stdout.splitlines()
    assert message.startswith(f"{path}:10:10: with alias *a3, aliases add more than")
    assert int(peak_kb) < 200 * 1024, f"peak RSS {int(peak_kb) // 1024} MB"
    assert seconds < 10, f"{seconds:.1f} s, start-up included"


# --------------------------------------------------------------------------------------------------
# Anchors and aliases: allowed within the limit, counted before they are expanded.
# --------------------------------------------------------------------------------------------------


def test_aliases_within_the_limit_are_read():
    values = loader.MAX_ALIAS_VALUES // 100  # the anchored list: itself and its items
    anchored = f"[&a [{', '.join(['x'] * (values - 1))}], " + ", ".join(["*a"] * 100) + "]"
    text = HEADER + Z_LOSS + f"description: {anchored}\n"
    assert only_error(text).message == "expected a string, got a list"  # read in full
    bomb = text.replace("*a]", "*a, *a]")
    assert "aliases add more than 10000 values" in only_error(bomb).message


def test_merge_keys_that_multiply_are_refused():
    lines = ["version: 1", "base: &m0 {a: 1, b: 2, c: 3}"]
    lines += [f"l{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}" for i in range(1, 8)]
    diagnostic = only_error("\n".join(lines) + "\n")
    assert diagnostic.line == 6 and "aliases add more than 10000 values" in diagnostic.message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: &a [*a]\n", (1, 8)),
        ("a: &a {b: *a}\n", (1, 11)),
        ("a: &a {<<: *a}\n", (1, 12)),
        ("&root {a: [1, {b: *root}]}\n", (1, 19)),
    ],
    ids=["list", "mapping", "merge", "deep"],
)
def test_recursive_aliases_are_refused_at_the_alias(text: str, where: tuple[int, int]):
    diagnostic = only_error(text)
    assert (diagnostic.line, diagnostic.column) == where
    assert "is used inside the value it names" in diagnostic.message


def test_aliases_cannot_nest_deeper_than_the_limit():
    # Each anchor nests the one before once more: the text is shallow, the expanded document is not.
    lines = ["version: 1", "chain:", "  - &a0 [x]"]
    lines += [f"  - &a{i} [*a{i - 1}]" for i in range(1, loader.MAX_DEPTH + 5)]
    diagnostic = only_error("\n".join(lines) + "\n")
    assert "nests the document deeper than 32 levels" in diagnostic.message


# --------------------------------------------------------------------------------------------------
# Nesting.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000 + "]" * 5000 + "\n",
        "a: " + "{b: " * 1200 + "1" + "}" * 1200 + "\n",
        "".join("  " * level + f"k{level}:\n" for level in range(400)),
        "".join("  " * level + "-\n" for level in range(400)),
    ],
    ids=["flow-lists", "flow-mappings", "block-mappings", "block-lists"],
)
def test_deep_nesting_is_refused_without_recursion_error(text: str):
    diagnostic = only_error(text)
    assert "the document nests deeper than 32 levels" in diagnostic.message
    assert diagnostic.line is not None and diagnostic.column is not None


def test_nesting_up_to_the_limit_is_read():
    lists = loader.MAX_DEPTH - 2  # in the top-level mapping, under `description` (a scalar: one more level)
    at_limit = HEADER + Z_LOSS + "description: " + "[" * lists + "x" + "]" * lists + "\n"
    assert only_error(at_limit).message == "expected a string, got a list"
    assert "nests deeper" in only_error(at_limit.replace("[x]", "[[x]]")).message


# --------------------------------------------------------------------------------------------------
# Characters and encodings.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("character", "name"),
    [("\x00", "U+0000 (NUL)"), ("\x1b", "U+001B"), ("\x7f", "U+007F"), ("\ufffe", "U+FFFE"), ("\ud800", "U+D800")],
    ids=["nul", "escape", "delete", "non-character", "lone-surrogate"],
)
def test_characters_yaml_refuses_are_located(character: str, name: str):
    diagnostic = only_error(f"version: 1\nvocab_size: 32{character}000\n")
    assert (diagnostic.line, diagnostic.column) == (2, 15)
    assert diagnostic.message.startswith(f"character {name} is not allowed in YAML text")


def test_byte_order_marks():
    graph = HEADER + Z_LOSS
    assert lossgraph.check_text("\ufeff" + graph).ok  # at the start, as some editors write it
    diagnostic = only_error(graph + "\ufeffdescription: x\n")  # in the middle it is part of a key
    assert diagnostic.message.startswith("unknown key '\\ufeffdescription'; did you mean 'description'?")


def test_invalid_utf8_is_unreadable_with_its_position(cli, tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\n# caf\xe9 au lait\n")
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert f"error: {path}:2:6: not UTF-8 text (invalid continuation byte at byte 16)" in result.stderr
    assert TRACEBACK not in result.output


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda tmp: Path("/dev/zero"), "a character device"),
        (lambda tmp: Path("/dev/urandom"), "a character device"),
        (lambda tmp: (tmp / "fifo.yaml", os.mkfifo(tmp / "fifo.yaml"))[0], "a FIFO (named pipe)"),
    ],
    ids=["dev-zero", "dev-urandom", "fifo-without-writer"],
)
def test_special_files_are_refused_before_they_are_read(tmp_path: Path, make, kind: str):
    # /dev/zero used to grow to 1.9 GB and end in MemoryError; a FIFO without a writer blocked forever.
    path = make(tmp_path)
    result = run_bounded("validate", path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {path}: is {kind}, not a regular file; give the path of a loss-graph YAML file\n"


def test_a_huge_sparse_file_is_refused_without_being_read_whole(tmp_path: Path):
    # 1 GiB of NUL bytes that take no disk: reading it whole took 1.08 GB.
    path = tmp_path / "sparse.yaml"
    with path.open("wb") as file:
        file.truncate(1 << 30)
    result = run_bounded("validate", path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith(f"{path}:1:1: the document has more than the 262144 characters"), result.stdout


def test_a_file_is_read_up_to_the_character_limit_whatever_its_characters(tmp_path: Path):
    path = tmp_path / "wide.yaml"
    wide = "\U0001f600"  # 4 bytes of UTF-8, the most a character takes
    path.write_text(wide * loader.MAX_DOCUMENT_CHARS, encoding="utf-8")
    assert loader.read_text(path) == wide * loader.MAX_DOCUMENT_CHARS  # within the limit: read whole
    path.write_text("x" + wide * loader.MAX_DOCUMENT_CHARS, encoding="utf-8")  # cut inside a character
    assert len(loader.read_text(path)) == loader.MAX_DOCUMENT_CHARS + 1  # enough for parse_yaml to refuse


def test_documents_larger_than_the_limit_are_refused():
    text = HEADER + Z_LOSS + "# padding\n" * (loader.MAX_DOCUMENT_CHARS // 10)
    diagnostic = only_error(text)
    assert diagnostic.message.startswith("the document has more than the 262144 characters a loss graph may have")
    assert diagnostic.line == text.count("\n", 0, loader.MAX_DOCUMENT_CHARS) + 1


def test_documents_with_more_values_than_the_limit_are_refused_fast():
    """A runaway list is refused at the value past the limit, before the rest is even parsed."""
    text = HEADER + Z_LOSS + "description: [" + ", ".join(["1"] * 5 * loader.MAX_NODES) + "]\n"
    started = time.perf_counter()
    diagnostic = only_error(text)
    assert time.perf_counter() - started < 2.0
    assert diagnostic.message.startswith(f"the document holds more than {loader.MAX_NODES} values")
    assert diagnostic.line == 5  # the list, after the header and the losses


def test_documents_within_the_value_limit_are_read():
    values = loader.MAX_NODES - 100
    text = HEADER + Z_LOSS + "description: [" + ", ".join(["1"] * values) + "]\n"
    assert "more than" not in "\n".join(d.message for d in check_text(text).diagnostics)


def test_a_lone_surrogate_is_refused_so_that_show_cannot_fail_to_print_it():
    # It used to validate; `lossgraph show` then died with UnicodeEncodeError, and model_dump_json() raised.
    path = INVALID / "lone_surrogate.yaml"
    for command in ("validate", "show"):
        result = run_bounded(command, path)
        assert result.returncode == 1, result.stderr
        output = result.stdout if command == "validate" else result.stderr
        assert output.startswith(f"{path}:8:65: losses.z.description: '\\ud800' holds U+D800"), output
    # a key too, and both halves of a pair written as two escapes
    diagnostic = only_error(HEADER + Z_LOSS + '"k\\ud83d\\ude00": 1\n')
    assert (diagnostic.line, diagnostic.column) == (5, 1)
    assert "holds U+D83D" in diagnostic.message and "\\U0001F600, not \\ud83d\\ude00" in diagnostic.message


def test_characters_that_do_not_print_are_escaped_in_every_diagnostic(tmp_path: Path):
    # A line break or U+202E (right-to-left override) in a key was printed raw inside the dotted path:
    # one diagnostic split across lines, or read backwards on screen.
    path = tmp_path / "keys.yaml"
    path.write_text(HEADER + "losses:\n  z: {type: z_loss, heads: [next]}\n" + '  "a\\nb": 1\n  "x\\u202ey": 2\n')
    result = run_bounded("validate", path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}:6:3: losses.a\\nb: 'a\\nb' is not a valid name: use letters, digits and underscores, "
        "not starting with a digit",
        f"{path}:6:11: losses.a\\nb: expected a mapping, got int 1",
        f"{path}:7:3: losses.x\\u202ey: 'x\\u202ey' is not a valid name: use letters, digits and underscores, "
        "not starting with a digit",
        f"{path}:7:15: losses.x\\u202ey: expected a mapping, got int 2",
        f"{path}: invalid (4 error(s), 0 warning(s))",
    ]


def test_show_escapes_descriptions(cli, tmp_path: Path):
    # Escapes in quoted strings may write any character: ESC would drive the terminal, U+202E reorder the line.
    path = tmp_path / "described.yaml"
    path.write_text(HEADER.replace("{offset: 1}", '{offset: 1, description: "a\\e[2J\\u202eb\\nc"}') + Z_LOSS)
    result = cli("show", path)
    assert result.exit_code == 0, result.output
    assert "next  predicts t+1, vocab 32000  a\\x1b[2J\\u202eb\\nc" in result.stdout
    assert not any(character in result.stdout for character in "\x1b\u202e")


def test_huge_names_are_cut_in_messages(tmp_path: Path):
    # A 200,000-character unknown source was repeated whole: 200 KB of output for one error.
    path = tmp_path / "huge.yaml"
    losses = f"losses: {{lm: {{type: cross_entropy, heads: [next], target: {'a' * 200_000}}}}}\n"
    path.write_text(HEADER + "sources: {labels: {type: labels}}\n" + losses)
    result = run_bounded("validate", path)
    assert result.returncode == 1, result.stderr
    shown = "a" * 57 + "..."
    assert f"{path}:5:59: losses.lm.target: unknown source '{shown}' (declared sources: labels)\n" in result.stdout
    assert len(result.stdout) < 1000, result.stdout[:2000]
    # the dotted path too (YAML keys end at 1024 characters; values do not)
    diagnostic = only_error(HEADER + Z_LOSS.replace("heads: [next]", f"heads: [next], {'k' * 1000}: 1"))
    assert diagnostic.format() == (
        f"h.yaml:4:43: losses.z.{'k' * 57}...: unknown key '{'k' * 57}...'; "
        "allowed keys: description, head_weights, heads, normalizer, positions, type, weight"
    )


def test_messages_list_a_few_declared_names_each_cut(tmp_path: Path):
    sources = "".join(f"  s{i}_{'x' * 100}: {{type: teacher}}\n" for i in range(30))
    text = HEADER + "sources:\n" + sources + "losses: {d: {type: forward_kl, heads: [next], target: nope}}\n"
    (found,) = [d for d in errors(text) if d.path == "losses.d.target"]
    assert found.message.endswith(
        f"(declared sources: s0_{'x' * 54}..., "
        + "..., ".join(f"s{i}_{'x' * (54 if i < 10 else 53)}" for i in range(1, 12))
        + "... and 18 more)"
    )


def test_yaml11_only_numbers_are_refused_in_a_real_process():
    # `weight: 1:30` was read as 90 without a word.
    path = INVALID / "yaml11_numbers.yaml"
    result = run_bounded("validate", path)
    assert result.returncode == 1, result.stderr
    assert f"{path}:12:73: losses.lm.weight: '1:30' is read as the number 90 by YAML 1.1" in result.stdout
    assert "write 90, or quote it to make it text" in result.stdout


@pytest.mark.parametrize(
    ("value", "read"),
    [("0x1F", 31), ("1.", 1.0), (".5", 0.5), ("1e-4", 1e-4), ("-3", -3), ("007", 7), ("!!str 1:30", "1:30")],
)
def test_numbers_yaml_1_1_and_1_2_read_alike_are_kept(value: str, read: object):
    assert loader.parse_yaml(f"x: {value}\n").data == {"x": read}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1:30:00", "'1:30:00' is read as the number 5400 by YAML 1.1 but as text by YAML 1.2"),
        ("1:30.5", "write 90.5, or quote it to make it text"),
        ("1_000", "'1_000' is read as the number 1000 by YAML 1.1"),
        ("1_0e5", "write 1000000, or quote it"),
        ("+0x1F", "'+0x1F' is read as the number 31"),
        ("-017", "'-017' is read as -15 by YAML 1.1 (a leading zero means octal) but as -17 by YAML 1.2"),
    ],
)
def test_numbers_only_yaml_1_1_reads_are_refused(value: str, message: str):
    diagnostic = only_error(f"x: {value}\n")
    assert (diagnostic.path, diagnostic.line, diagnostic.column) == ("x", 1, 4)
    assert message in diagnostic.message


def test_numbers_only_yaml_1_2_reads_stay_text():
    assert loader.parse_yaml("a: 0o17\nb: -.5\n").data == {"a": "0o17", "b": "-.5"}


# --------------------------------------------------------------------------------------------------
# Tags and scalars.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("!!float ''", "'' cannot be read as a number; remove the `!!float` tag or fix the value"),
        ("!!float '-'", "'-' cannot be read as a number"),
        ("!!int ''", "'' cannot be read as an integer"),
        ("!!int 0x", "'0x' cannot be read as an integer"),
        ("!!int 1:x", "'1:x' cannot be read as an integer"),
        ("!!bool maybe", "'maybe' cannot be read as true or false"),
        ("._e1", "'._e1' looks like a number but is not one; fix it, or quote it to make it text"),
        ("!!timestamp foo", "unsupported YAML tag 'tag:yaml.org,2002:timestamp' on a value"),
        ("!!timestamp 2024-01-01", "unsupported YAML tag 'tag:yaml.org,2002:timestamp' on a value"),
        ("!!binary aGVsbG8=", "unsupported YAML tag 'tag:yaml.org,2002:binary' on a value"),
        ("!!set {a}", "unsupported YAML tag 'tag:yaml.org,2002:set' on a mapping"),
        ("!!omap [a: 1]", "unsupported YAML tag 'tag:yaml.org,2002:omap' on a list"),
        ("!local x", "unsupported YAML tag '!local' on a value"),
        ("9" * 101, "is read as an integer of 101 characters; numbers have at most 100"),
        ("1" + "0" * 120 + ".5", "is read as a number of 123 characters"),
    ],
)
def test_scalars_that_cannot_be_read_are_located(value: str, message: str):
    diagnostic = only_error(f"version: 1\nvocab_size: {value}\n{HEADER[HEADER.index('heads') :]}{Z_LOSS}")
    assert (diagnostic.line, diagnostic.column, diagnostic.path) == (2, 13, "vocab_size")
    assert message in diagnostic.message


def test_a_key_that_cannot_be_read_is_located():
    diagnostic = only_error(HEADER + Z_LOSS + "!!int x: 1\n")
    assert (diagnostic.line, diagnostic.column) == (5, 1)
    assert "'x' cannot be read as an integer" in diagnostic.message


def test_an_aliased_bad_scalar_is_reported_each_time_it_is_used():
    found = errors(HEADER + Z_LOSS + "description: &bad !!float ''\nextra: *bad\n")
    assert [(d.path, d.line) for d in found] == [("description", 5), ("extra", 5)]  # the value is where its anchor is
    assert all("cannot be read as a number" in d.message for d in found)


def test_plain_core_tags_still_work():
    spec_ = lossgraph.loads("version: !!int 1\nvocab_size: !!int '32000'\nheads: {next: {offset: !!int 1}}\n" + Z_LOSS)
    assert spec_.vocab_size == 32000


# --------------------------------------------------------------------------------------------------
# Number ranges: the largest accepted value passes, the next one is refused with the limit and why.
# --------------------------------------------------------------------------------------------------

GRAPH = """\
version: 1
vocab_size: {vocab}
heads:
  next: {{offset: 1}}
  far: {{offset: {offset}}}
sources:
  labels: {{type: labels, ignore_index: {ignore}}}
  cached: {{type: topk_teacher, k: {k}, vocab_size: 65536, vocab_map: pad}}
losses:
  lm: {{type: cross_entropy, heads: [next], target: labels, weight: {weight}, head_weights: [{head}]}}
  distill: {{type: forward_kl, heads: [next], target: cached, temperature: {temperature}}}
  spread:
    type: entropy
    heads: [next]
    weight: {{schedule: linear, start: {start}, end: 0, steps: {steps}, warmup: {warmup}}}
"""
LARGEST = {
    "vocab": spec.MAX_VOCAB_SIZE,
    "offset": spec.MAX_OFFSET,
    "ignore": spec.MAX_INDEX,
    "k": spec.MAX_TOPK,
    "weight": "1.0e+6",
    "head": "1.0e+6",
    "temperature": spec.MAX_TEMPERATURE,
    "start": "-1.0e+6",
    "steps": spec.MAX_STEPS,
    "warmup": spec.MAX_STEPS,
}
BEYOND = {
    "vocab": (spec.MAX_VOCAB_SIZE + 1, "vocab_size", "use a value <= 16777216"),
    "offset": (spec.MAX_OFFSET + 1, "heads.far.offset", "use a value <= 4096"),
    "ignore": (spec.MIN_INDEX - 1, "sources.labels.ignore_index", "use a value >= -2147483648"),
    "k": (spec.MAX_TOPK + 1, "sources.cached.k", "use a value <= 65536"),
    "weight": ("1.000001e+6", "losses.lm.weight", "use a value <= 1000000"),
    "head": ("-0.5", "losses.lm.head_weights[0]", "-0.5 is negative; use a value >= 0"),
    "temperature": ("0.0009", "losses.distill.temperature", "use a value >= 0.001"),
    "start": ("-1.5e+6", "losses.spread.weight.start", "use a value >= -1000000"),
    "steps": (spec.MAX_STEPS + 1, "losses.spread.weight.steps", "use a value <= 1000000000"),
    "warmup": (-1, "losses.spread.weight.warmup", "-1 is negative; use a value >= 0"),
}


def test_the_largest_values_are_accepted():
    report = lossgraph.check_text(GRAPH.format(**LARGEST))
    assert report.ok, "\n".join(d.format() for d in report.diagnostics)
    assert [d.path for d in report.warnings] == ["heads.far"]  # no loss is bound to it


@pytest.mark.parametrize("key", list(BEYOND))
def test_a_value_beyond_its_range_is_refused(key: str):
    value, path, phrase = BEYOND[key]
    diagnostic = only_error(GRAPH.format(**{**LARGEST, key: value}))
    assert diagnostic.path == path
    assert phrase in diagnostic.message


def test_the_ranges_are_in_the_json_schema():
    defs = spec.json_schema()["$defs"]
    assert spec.json_schema()["properties"]["vocab_size"]["anyOf"][0]["maximum"] == spec.MAX_VOCAB_SIZE
    assert defs["Head"]["properties"]["offset"]["maximum"] == spec.MAX_OFFSET
    assert defs["TopKTeacherSource"]["properties"]["k"]["maximum"] == spec.MAX_TOPK
    assert defs["LabelsSource"]["properties"]["ignore_index"]["minimum"] == spec.MIN_INDEX
    fixed_weight = defs["CrossEntropyLoss"]["properties"]["weight"]["oneOf"][0]
    assert (fixed_weight["minimum"], fixed_weight["maximum"]) == (-spec.MAX_WEIGHT, spec.MAX_WEIGHT)
    fixed_temperature = defs["ForwardKLLoss"]["properties"]["temperature"]["oneOf"][0]
    assert (fixed_temperature["minimum"], fixed_temperature["maximum"]) == (1e-3, 1e3)
    assert defs["CrossEntropyLoss"]["properties"]["head_weights"]["anyOf"][0]["items"]["maximum"] == spec.MAX_WEIGHT
    assert defs["MixtureSource"]["properties"]["weights"]["anyOf"][0]["items"]["maximum"] == 1
    assert defs["LinearSchedule"]["properties"]["steps"]["maximum"] == spec.MAX_STEPS


def test_every_bounded_key_says_why():
    page = (ROOT / "docs" / "yaml-reference.md").read_text(encoding="utf-8")
    for name, reason in spec.BOUND_REASONS.items():
        assert f"| `{name}` |" in page and reason in page, name


# --------------------------------------------------------------------------------------------------
# Mixtures: webs of derived sources stay linear to check.
# --------------------------------------------------------------------------------------------------


def mixtures(lines: list[str], target: str) -> str:
    sources = "sources:\n  t0: {type: teacher}\n  t1: {type: teacher}\n" + "".join(f"  {line}\n" for line in lines)
    return HEADER + sources + f"losses: {{d: {{type: forward_kl, heads: [next], target: {target}}}}}\n"


def test_a_long_chain_of_mixtures_needs_no_recursion():
    chain = ["m0: {type: mixture, sources: [t0, t1]}"]
    chain += [f"m{i}: {{type: mixture, sources: [m{i - 1}, t0]}}" for i in range(1, 1100)]
    diagnostic = only_error(mixtures(chain, "m1099"))
    assert diagnostic.path == f"sources.m{MAX_MIXTURE_PARTS - 1}.sources"
    assert f"expands to {MAX_MIXTURE_PARTS + 1} teacher and label distributions" in diagnostic.message


def test_a_knot_of_mixtures_is_one_cycle():
    # Every mixture reads every other: thousands of simple cycles, one knot, one error.
    names = [f"m{i}" for i in range(12)]
    knot = [f"{name}: {{type: mixture, sources: [{', '.join(n for n in names if n != name)}]}}" for name in names]
    started = time.perf_counter()
    found = [d for d in errors(mixtures(knot, "m0")) if "cycle" in d.message]
    assert time.perf_counter() - started < 2
    assert [(d.path, d.message.split(";")[0]) for d in found] == [
        ("sources.m0", "sources form a cycle: m0 -> m1 -> m0")
    ]


def test_a_flat_mixture_of_the_most_parts_is_valid():
    teachers = [f"t{i}: {{type: teacher}}" for i in range(2, MAX_MIXTURE_PARTS)]
    names = ", ".join(f"t{i}" for i in range(MAX_MIXTURE_PARTS))
    assert lossgraph.check_text(mixtures([*teachers, f"m: {{type: mixture, sources: [{names}]}}"], "m")).ok
    one_more = [*teachers, "extra: {type: teacher}", f"m: {{type: mixture, sources: [{names}, extra]}}"]
    assert "at most 64" in only_error(mixtures(one_more, "m")).message


# --------------------------------------------------------------------------------------------------
# Indentation: the line to fix, also when PyYAML notices the problem later.
# --------------------------------------------------------------------------------------------------

BLOCK = """\
version: 1
vocab_size: 32000
heads:
  next: {offset: 1}
sources:
  labels: {type: labels}
  teacher: {type: teacher}
losses:
  lm:
    type: cross_entropy
    heads: [next]
    target: labels
  distill:
    type: forward_kl
    heads: [next]
    target: teacher
    temperature: 2.0
    weight:
      schedule: linear
      start: 0.0
      end: 1.0
      steps: 100
"""


@pytest.mark.parametrize("shift", [-1, 1], ids=["dedented", "indented"])
@pytest.mark.parametrize("number", [6, 7, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22])
def test_a_line_indented_by_one_space_too_few_or_many_is_the_one_reported(number: int, shift: int):
    lines = BLOCK.splitlines()
    line = lines[number - 1]
    indent = len(line) - len(line.lstrip(" "))
    lines[number - 1] = " " * (indent + shift) + line.lstrip(" ")
    diagnostic = only_error("\n".join(lines) + "\n")
    assert diagnostic.line == number, diagnostic.format()
    assert diagnostic.column == indent + shift + 1
    assert f"this line is indented {indent + shift} space" in diagnostic.message
    assert diagnostic.message.endswith("keys of one mapping must line up, so check the indentation of this line")


def test_other_syntax_errors_keep_their_message():
    diagnostic = only_error(HEADER + "losses: {z: {type: z_loss, heads: [next}}\n")
    assert "indented" not in diagnostic.message
    assert diagnostic.message.startswith("YAML syntax error: while parsing a flow sequence")


def test_valid_documents_are_not_slowed_down():
    text = (ROOT / "examples" / "every_loss.yaml").read_text(encoding="utf-8")
    lossgraph.check_text(text)  # imports
    started = time.perf_counter()
    for _ in range(5):
        assert lossgraph.check_text(text).ok
    assert (time.perf_counter() - started) / 5 < 0.5


def test_check_file_of_every_invalid_document_is_located():
    for path in sorted(INVALID.glob("*.yaml")):
        report = check_file(path)
        assert report.errors and all(d.line and d.column for d in report.errors), path.name
