"""The fusion plan: how many kernel launches each graph compiles to, and what each launch does.

Everything here is pure Python (the planner imports neither torch nor triton); the plans come from
`lossgraph.document.check_file(path).context.fusion`, as `lossgraph plan` builds them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lossgraph.compiler.fusion import (
    DTYPE_BYTES,
    MAX_TEACHERS_PER_LAUNCH,
    FusionPlan,
    Launch,
    SoftmaxState,
    floor_bytes_per_token,
)
from lossgraph.document import check_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def write(tmp_path: Path, losses: str, sources: str = "labels: {type: labels}", vocab: int = 1000) -> Path:
    """A one-head graph file; `losses` and `sources` are the lines of those mappings."""

    def block(lines: str) -> str:
        return "".join(f"\n  {line}" for line in textwrap.dedent(lines).strip().splitlines())

    path = tmp_path / "graph.yaml"
    path.write_text(
        f"version: 1\nvocab_size: {vocab}\nheads:\n  next: {{offset: 1}}\n"
        f"sources:{block(sources)}\nlosses:{block(losses)}\n"
    )
    return path


def fusion_of(path: Path) -> FusionPlan:
    report = check_file(path)
    assert report.ok, [d.format() for d in report.diagnostics]
    assert report.context is not None and report.context.fusion is not None
    return report.context.fusion


def only_launch(fusion: FusionPlan) -> Launch:
    assert len(fusion.launches) == 1, [(launch.head, launch.index) for launch in fusion.launches]
    return fusion.launches[0]


# --------------------------------------------------------------------------------------------------
# Launch counts.
# --------------------------------------------------------------------------------------------------


def test_mtp_distill_is_one_launch_per_head():
    fusion = fusion_of(EXAMPLES / "mtp_distill.yaml")
    assert len(fusion.launches) == 3
    assert [launch.head for launch in fusion.launches] == ["next", "mtp2", "mtp3"]
    assert [[term.key for term in launch.terms] for launch in fusion.launches] == [
        ["lm/next", "distill/next", "z/next"],
        ["lm/mtp2"],
        ["lm/mtp3"],
    ]
    for launch in fusion.launches:
        assert fusion.for_head(launch.head) == (launch,)
        assert launch.index == 0 and not launch.accumulate and launch.notes == ()
        assert launch.passes == 2
    assert [d.name for d in fusion.launches[0].dense] == ["teacher"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_is_one_launch_per_head(path):
    """No example reads more than MAX_TEACHERS_PER_LAUNCH dense teachers on a head: one launch per head."""
    report = check_file(path)
    fusion = report.context.fusion
    heads = [head.name for head in report.context.plan.heads if head.terms]
    assert [launch.head for launch in fusion.launches] == heads
    terms = [term.key for head in report.context.plan.heads for term in head.terms]
    assert [term.key for launch in fusion.launches for term in launch.terms] == terms


def test_lm_distillation_and_z_loss_on_one_head_is_one_launch(tmp_path):
    path = write(
        tmp_path,
        """
        lm: {type: cross_entropy, heads: [next], target: labels}
        kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}
        z: {type: z_loss, heads: [next], weight: 1.0e-4}
        """,
        "labels: {type: labels}\nteacher: {type: teacher}",
    )
    launch = only_launch(fusion_of(path))
    assert [term.key for term in launch.terms] == ["lm/next", "kd/next", "z/next"]
    assert launch.passes == 2 and not launch.accumulate and launch.notes == ()
    assert launch.softmaxes == (
        SoftmaxState("student", "1"),
        SoftmaxState("student", "2"),
        SoftmaxState("teacher", "2"),
    )


TWO_TEACHERS = """
lm: {type: cross_entropy, heads: [next], target: labels}
hot: {type: forward_kl, heads: [next], target: big, temperature: 2.0, temperature_scaling: true}
cold: {type: forward_kl, heads: [next], target: small, temperature: 0.5}
z: {type: z_loss, heads: [next], weight: 1.0e-4}
"""


def test_two_teachers_at_two_temperatures_is_one_launch_with_their_softmaxes(tmp_path):
    path = write(tmp_path, TWO_TEACHERS, "labels: {type: labels}\nbig: {type: teacher}\nsmall: {type: teacher}")
    launch = only_launch(fusion_of(path))
    assert [d.name for d in launch.dense] == ["big", "small"]
    # the student at each temperature (z_loss shares the one at 1), each teacher at its own temperature
    assert list(launch.softmaxes) == [
        SoftmaxState("student", "1"),
        SoftmaxState("student", "2"),
        SoftmaxState("student", "0.5"),
        SoftmaxState("big", "2"),
        SoftmaxState("small", "0.5"),
    ]
    assert launch.passes == 2


def test_one_teacher_read_at_two_temperatures_keeps_two_states(tmp_path):
    path = write(
        tmp_path,
        """
        kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0}
        rkl: {type: reverse_kl, heads: [next], target: teacher}
        ce: {type: cross_entropy, heads: [next], target: teacher, temperature: 2.0}
        """,
        "teacher: {type: teacher}",
    )
    launch = only_launch(fusion_of(path))
    assert list(launch.softmaxes) == [
        SoftmaxState("student", "2"),
        SoftmaxState("student", "1"),
        SoftmaxState("teacher", "2"),
        SoftmaxState("teacher", "1"),
    ]


def test_scheduled_temperature_is_its_own_softmax_state(tmp_path):
    path = write(
        tmp_path,
        """
        lm: {type: cross_entropy, heads: [next], target: labels}
        kd:
          type: forward_kl
          heads: [next]
          target: teacher
          temperature: {schedule: linear, start: 1.0, end: 3.0, steps: 100}
        """,
        "labels: {type: labels}\nteacher: {type: teacher}",
    )
    launch = only_launch(fusion_of(path))
    schedule = "linear 1 -> 3 over 100 steps"
    assert list(launch.softmaxes) == [
        SoftmaxState("student", "1"),
        SoftmaxState("student", schedule),
        SoftmaxState("teacher", schedule),
    ]


# --------------------------------------------------------------------------------------------------
# Passes over the logits.
# --------------------------------------------------------------------------------------------------

PASS_CASES = {
    # name: (loss line, extra passes expected)
    "jsd-teacher": ("t: {type: jsd, heads: [next], target: teacher, beta: 0.3}", True),
    "tvd-teacher": ("t: {type: tvd, heads: [next], target: teacher}", True),
    "jsd-smoothing": ("t: {type: jsd, heads: [next], target: smooth}", True),
    "tvd-mixture": ("t: {type: tvd, heads: [next], target: mix}", True),
    "cross_entropy-labels": ("t: {type: cross_entropy, heads: [next], target: labels}", False),
    "cross_entropy-teacher": ("t: {type: cross_entropy, heads: [next], target: teacher, temperature: 2.0}", False),
    "forward_kl-mixture": ("t: {type: forward_kl, heads: [next], target: mix}", False),
    "reverse_kl-teacher": ("t: {type: reverse_kl, heads: [next], target: teacher}", False),
    "reverse_kl-smoothing": ("t: {type: reverse_kl, heads: [next], target: smooth}", False),
    "entropy": ("t: {type: entropy, heads: [next], weight: 0.1}", False),
    "z_loss": ("t: {type: z_loss, heads: [next]}", False),
    "jsd-topk": ("t: {type: jsd, heads: [next], target: cached}", False),
    "tvd-topk": ("t: {type: tvd, heads: [next], target: cached}", False),
}
PASS_SOURCES = """
labels: {type: labels}
teacher: {type: teacher}
smooth: {type: label_smoothing, source: labels, epsilon: 0.1}
mix: {type: mixture, sources: [teacher, smooth], weights: [0.5, 0.5]}
cached: {type: topk_teacher, k: 16, tail: renormalize}
"""


@pytest.mark.parametrize("case", list(PASS_CASES))
def test_jsd_and_tvd_need_a_third_pass(tmp_path, case):
    line, extra = PASS_CASES[case]
    # every source is read (an unread one is a warning): lm reads the labels, the others go through `u`
    losses = (
        f"{line}\nlm: {{type: cross_entropy, heads: [next], target: labels}}\n"
        "u: {type: forward_kl, heads: [next], target: mix}\nk: {type: forward_kl, heads: [next], target: cached}"
    )
    launch = only_launch(fusion_of(write(tmp_path, losses, PASS_SOURCES)))
    notes = [note for note in launch.notes if note.startswith("extra pass")]
    if extra:
        kind = line.split("type: ")[1].split(",")[0]
        assert launch.passes == 3
        assert len(notes) == 1 and "t/next" in notes[0] and f"({kind})" in notes[0], launch.notes
        assert len(launch.layout.pass_reads) == 3
    else:
        assert launch.passes == 2
        assert notes == [], launch.notes
        assert len(launch.layout.pass_reads) == 2


def test_reverse_kl_against_a_mixture_needs_a_third_pass(tmp_path):
    path = write(
        tmp_path,
        "rkl: {type: reverse_kl, heads: [next], target: mix}",
        "a: {type: teacher}\nb: {type: teacher}\nmix: {type: mixture, sources: [a, b], weights: [0.5, 0.5]}",
    )
    launch = only_launch(fusion_of(path))
    assert launch.passes == 3
    assert any("rkl/next" in note and "reverse_kl" in note for note in launch.notes), launch.notes


# --------------------------------------------------------------------------------------------------
# Heads split into several launches.
# --------------------------------------------------------------------------------------------------


def teachers_graph(tmp_path: Path, count: int) -> Path:
    losses = "lm: {type: cross_entropy, heads: [next], target: labels}\n" + "\n".join(
        f"kd{i}: {{type: forward_kl, heads: [next], target: t{i}, temperature: {1 + i % 2}.0}}" for i in range(count)
    )
    sources = "labels: {type: labels}\n" + "\n".join(f"t{i}: {{type: teacher}}" for i in range(count))
    return write(tmp_path, losses, sources)


def test_five_dense_teachers_split_the_head_into_two_launches(tmp_path):
    assert MAX_TEACHERS_PER_LAUNCH == 4
    fusion = fusion_of(teachers_graph(tmp_path, 5))
    assert len(fusion.launches) == 2
    first, second = fusion.launches
    assert (first.head, first.index, second.head, second.index) == ("next", 0, "next", 1)
    assert not first.accumulate and second.accumulate
    assert first.kernel_spec().accumulate is False and second.kernel_spec().accumulate is True
    assert not any("split" in note for note in first.notes)
    assert any(note.startswith("split") and "5 dense teachers" in note for note in second.notes), second.notes
    assert [d.name for d in first.dense] == ["t0", "t1", "t2", "t3"]
    assert [d.name for d in second.dense] == ["t4"]
    # every term runs exactly once, in one of the launches
    keys = [term.key for launch in fusion.launches for term in launch.terms]
    assert sorted(keys) == sorted(["lm/next"] + [f"kd{i}/next" for i in range(5)])
    assert [term.key for term in second.terms] == ["kd4/next"]
    assert fusion.for_head("next") == (first, second)
    # the second launch reads student + t4 twice, then reads the first launch's gradient and writes the sum
    assert second.bytes_per_token(2) == (2 * 1000 + 2 * 1000 + 2 * 1000) * 2


def test_four_dense_teachers_fit_one_launch(tmp_path):
    launch = only_launch(fusion_of(teachers_graph(tmp_path, MAX_TEACHERS_PER_LAUNCH)))
    assert len(launch.dense) == MAX_TEACHERS_PER_LAUNCH and launch.notes == ()


def test_one_term_reading_five_teachers_cannot_be_split(tmp_path):
    path = write(
        tmp_path,
        "kd: {type: forward_kl, heads: [next], target: mix}",
        "\n".join(f"t{i}: {{type: teacher}}" for i in range(5))
        + "\nmix: {type: mixture, sources: [t0, t1, t2, t3, t4], weights: [0.2, 0.2, 0.2, 0.2, 0.2]}",
    )
    launch = only_launch(fusion_of(path))
    assert len(launch.dense) == 5
    assert any("5 teachers" in note for note in launch.notes), launch.notes


# --------------------------------------------------------------------------------------------------
# Bytes per token.
# --------------------------------------------------------------------------------------------------


def test_bytes_per_token_of_cross_entropy_plus_forward_kl_by_hand(tmp_path):
    path = write(
        tmp_path,
        "lm: {type: cross_entropy, heads: [next], target: labels}\n"
        "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0}",
        "labels: {type: labels}\nteacher: {type: teacher}",
    )
    launch = only_launch(fusion_of(path))
    bf16 = DTYPE_BYTES["bf16"]
    # pass 1 reads student + teacher; the last pass reads student + teacher and writes the gradient
    assert launch.bytes_per_token(bf16) == 5 * 1000 * 2
    assert launch.layout.pass_reads == (frozenset({0}), frozenset({0}))
    # the same count at a production vocab
    assert launch.bytes_per_token(bf16, 128256) == 5 * 128256 * 2
    # the floor: the student and the teacher read once, the gradient written once
    assert floor_bytes_per_token(check_file(path).context.plan, bf16) == 3 * 1000 * 2


def test_bytes_per_token_of_other_launches_by_hand(tmp_path):
    lm = write(tmp_path, "lm: {type: cross_entropy, heads: [next], target: labels}")
    assert only_launch(fusion_of(lm)).bytes_per_token(2) == 3 * 1000 * 2  # read, read, write
    jsd = write(tmp_path, "t: {type: jsd, heads: [next], target: teacher}", "teacher: {type: teacher}")
    assert only_launch(fusion_of(jsd)).bytes_per_token(2) == 7 * 1000 * 2  # three passes of 2 reads, 1 write
    topk = write(
        tmp_path,
        "t: {type: forward_kl, heads: [next], target: cached}",
        "cached: {type: topk_teacher, k: 64, tail: bucket}",
    )
    # 3 x V for the logits and gradient; per stored entry an index (8), a log-prob (4), a student logit
    # gathered and a gradient entry updated (2 + 2)
    assert only_launch(fusion_of(topk)).bytes_per_token(2) == 3 * 1000 * 2 + 64 * (8 + 4 + 2 * 2)


# --------------------------------------------------------------------------------------------------
# No torch.
# --------------------------------------------------------------------------------------------------


def test_building_the_fusion_plan_imports_no_torch():
    code = textwrap.dedent(
        """
        import sys
        from lossgraph.document import check_file
        from lossgraph.compiler.fusion import plan_fusion
        from lossgraph.kernels.codegen import generate

        for name in ("mtp_distill", "every_loss", "topk_offline", "ensemble"):
            report = check_file(f"examples/{name}.yaml")
            fusion = plan_fusion(report.context.plan)
            for launch in fusion.launches:
                launch.softmaxes, launch.passes, launch.bytes_per_token(2), launch.notes
                generate(launch.kernel_spec())
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton"))
        print(len(fusion.launches))
        print(",".join(heavy))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    launches, heavy = (result.stdout.splitlines() + ["", ""])[:2]
    assert launches == "1", result.stdout
    assert heavy == "", f"building the fusion plan imported {heavy}"
