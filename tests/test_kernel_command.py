"""`lossgraph kernel FILE`: the generated Triton source of a graph's fused launches, each after a comment
line naming its head, launch and phase; --head, --launch and --phase narrow it; a selection that names
nothing is a usage error (exit 2) naming the choices. The module it prints imports only the primitives
its code uses. That it imports no torch is checked in test_cli.py, and that it sees plugin kinds in
test_plugins.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lossgraph.kernels import codegen

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MTP = EXAMPLES / "mtp_distill.yaml"  # heads next, mtp2, mtp3; one launch each
EVERY_LOSS = EXAMPLES / "every_loss.yaml"  # head mtp2 has a second read of the row (a reduce phase); next not
HEADER = re.compile(r"^# ===== head (\S+), launch (\d+) of (\d+), phase (\w+) =====$", re.MULTILINE)


def kernels(output: str) -> list[tuple[tuple[str, ...], str]]:
    """(header fields, module source) of each kernel printed."""
    headers = list(HEADER.finditer(output))
    ends = [match.start() for match in headers[1:]] + [len(output)]
    return [(match.groups(), output[match.end() + 1 : end]) for match, end in zip(headers, ends)]


def test_prints_every_launch_of_every_head(cli):
    result = cli("kernel", MTP)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# ===== head next, launch 1 of 1, phase single =====\n")
    printed = kernels(result.stdout)
    assert [fields for fields, _ in printed] == [
        ("next", "1", "1", "single"),
        ("mtp2", "1", "1", "single"),
        ("mtp3", "1", "1", "single"),
    ]
    for fields, source in printed:
        assert "@triton.jit" in source and "def fused_head_kernel(" in source
        compile(source, f"kernel {fields}", "exec")  # each printed module is valid Python


def test_head_and_launch_select(cli):
    result = cli("kernel", MTP, "--head", "mtp2", "--launch", "1")
    assert result.exit_code == 0, result.output
    assert [fields for fields, _ in kernels(result.stdout)] == [("mtp2", "1", "1", "single")]


@pytest.mark.parametrize("phase", ["stats", "reduce", "apply"])
def test_phase_selects_the_vocab_parallel_kernel(cli, phase: str):
    result = cli("kernel", EVERY_LOSS, "--phase", phase)
    assert result.exit_code == 0, result.output
    printed = kernels(result.stdout)
    # only a launch with a second read of the row has a reduce phase
    assert [fields[0] for fields, _ in printed] == (["mtp2"] if phase == "reduce" else ["next", "mtp2"])
    for fields, source in printed:
        assert fields[3] == phase
        assert f"(phase {phase})" in source and "def fused_head_kernel(" in source
        compile(source, f"kernel {fields}", "exec")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--head", "nxt"], "error: unknown head 'nxt'; the graph's heads are: next, mtp2, mtp3"),
        (["--launch", "2"], "error: no launch 2; launches per head: next 1, mtp2 1, mtp3 1"),
        (["--head", "mtp2", "--launch", "2"], "error: no launch 2; launches per head: mtp2 1"),
        (["--phase", "reduce"], "error: no selected launch has a reduce phase"),
        (["--phase", "all"], "'all' is not one of 'single', 'stats', 'reduce', 'apply'"),
    ],
    ids=["head", "launch", "head-launch", "no-reduce", "phase"],
)
def test_a_selection_of_nothing_is_a_usage_error(cli, args: list[str], message: str):
    result = cli("kernel", MTP, *args)
    assert result.exit_code == 2, result.output
    assert message in re.sub(r"[\s│]+", " ", result.stderr)  # click's error box wraps lines
    assert "Traceback" not in result.output and result.stdout == ""


def test_an_invalid_graph_exits_1(cli, tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nvocab_size: 10\nheads: {next: {offset: 1}}\nlosses: {lm: {type: nope}}\n")
    result = cli("kernel", path)
    assert result.exit_code == 1 and "unknown type 'nope'" in result.output


def test_the_module_imports_only_the_primitives_it_uses(cli):
    result = cli("kernel", EVERY_LOSS)
    for _, source in kernels(result.stdout):
        imported = re.search(r"from lossgraph\.kernels\.primitives import \(\n(.*?)\)\n", source, re.DOTALL)
        names = re.findall(r"^    (\w+),$", imported.group(1), re.MULTILINE)
        code = "\n".join(line.split("#")[0] for line in source[imported.end() :].splitlines())
        used = {name for name in codegen.PRIMITIVES if re.search(rf"\b{name}\b", code)}
        assert names == [name for name in codegen.PRIMITIVES if name in used]
        assert names and len(names) < len(codegen.PRIMITIVES)


def test_primitive_imports_reads_code_not_comments():
    code = "x = fast_exp(y)  # soft_cap would go here\n# round_to\nz = LN2 * lane_max(x, 4)\n"
    assert codegen.primitive_imports(code) == [
        "from lossgraph.kernels.primitives import (",
        "    LN2,",
        "    fast_exp,",
        "    lane_max,",
        ")",
    ]
    assert codegen.primitive_imports("x = 1\n") == []
