"""The source graph (lossgraph.compiler.graph): the one walk over derived sources, and its users.

Small specs with diamonds, nested mixtures, smoothed labels and cycles are walked directly; then the
passes, the planner, `show`'s descriptions, the diagrams and the demo are checked to give the answers
that walk gives.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lossgraph
from lossgraph.compiler import passes
from lossgraph.compiler.graph import Member, SourceGraph, source_members
from lossgraph.compiler.passes import CompileContext
from lossgraph.compiler.pipeline import analyze
from lossgraph.compiler.plan import (
    DenseTarget,
    LabelsTarget,
    MixtureTarget,
    SmoothedTarget,
    resolve_target,
    target_leaves,
)
from lossgraph.spec.describe import source_summary
from lossgraph.spec.loader import parse_yaml, validate_schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

HEADER = "version: 1\nvocab_size: 100\nheads:\n  next: {offset: 1}\n"


def document(sources: str, losses: str = "  z: {type: z_loss, heads: [next]}\n") -> str:
    return HEADER + "sources:\n" + textwrap.indent(textwrap.dedent(sources), "  ") + "losses:\n" + losses


def graph_of(text: str) -> SourceGraph:
    """The source graph of a document that passes the schema (whether or not the passes accept it)."""
    return SourceGraph(validate_schema(parse_yaml(text)))


# A diamond: `top` reads `left` and `right`, which both read `t1` and `t2` (in opposite orders).
DIAMOND = document(
    """\
    t1: {type: teacher}
    t2: {type: teacher}
    left: {type: mixture, sources: [t1, t2]}
    right: {type: mixture, sources: [t2, t1], weights: [0.25, 0.75]}
    top: {type: mixture, sources: [left, right], weights: [0.4, 0.6]}
    """,
    "  d: {type: forward_kl, heads: [next], target: top}\n",
)

# Nested mixtures over smoothed labels: outer -> (inner -> (t1, smooth -> labels), t3).
NESTED = document(
    """\
    labels: {type: labels}
    t1: {type: teacher}
    t3: {type: teacher}
    smooth: {type: label_smoothing, source: labels, epsilon: 0.1}
    outer: {type: mixture, sources: [inner, t3]}
    inner: {type: mixture, sources: [t1, smooth]}
    """,
    "  d: {type: forward_kl, heads: [next], target: outer}\n"
    "  lm: {type: cross_entropy, heads: [next], target: labels}\n",
)

# `a` and `b` read each other; `c` reads itself.
CYCLES = document(
    """\
    t: {type: teacher}
    a: {type: mixture, sources: [b, t]}
    b: {type: mixture, sources: [a, t]}
    c: {type: mixture, sources: [c, t]}
    """,
    "  d: {type: forward_kl, heads: [next], target: a}\n",
)


# --------------------------------------------------------------------------------------------------
# Members: the one function that knows which field of a source names other sources.
# --------------------------------------------------------------------------------------------------


def test_members_of_each_source_kind():
    graph = graph_of(NESTED)
    assert graph.members("smooth") == [Member("labels", ("source",), None)]
    assert graph.members("inner") == [Member("t1", ("sources", 0), 0.5), Member("smooth", ("sources", 1), 0.5)]
    assert graph.members("labels") == graph.members("t1") == graph.members("unknown") == []
    weighted = graph_of(DIAMOND)
    assert [(m.name, m.weight) for m in weighted.members("right")] == [("t2", 0.25), ("t1", 0.75)]


def test_members_keep_unknown_names_and_duplicates_and_weights_of_the_wrong_length():
    spec = validate_schema(
        parse_yaml(document("t: {type: teacher}\nm: {type: mixture, sources: [t, t, ghost], weights: [0.5, 0.5]}\n"))
    )
    assert source_members(spec.sources["m"]) == [
        Member("t", ("sources", 0), 0.5),
        Member("t", ("sources", 1), 0.5),
        Member("ghost", ("sources", 2), None),
    ]
    graph = SourceGraph(spec)
    assert graph.postorder("m") == ["t", "m"]  # the unknown member is listed but not walked
    assert graph.leaves("m") == ["t"]


def test_derived_sources():
    graph = graph_of(NESTED)
    assert [name for name in graph.spec.sources if graph.is_derived(name)] == ["smooth", "outer", "inner"]
    assert not graph.is_derived("unknown")
    assert "smooth" in graph and "unknown" not in graph


# --------------------------------------------------------------------------------------------------
# The walk.
# --------------------------------------------------------------------------------------------------


def test_diamond_is_walked_once_per_source():
    graph = graph_of(DIAMOND)
    assert graph.postorder("top") == ["t1", "t2", "left", "right", "top"]
    assert graph.postorder("right") == ["t2", "t1", "right"]
    assert graph.leaves("top") == ["t1", "t2"]
    assert graph.leaves("right") == ["t2", "t1"]
    # Each leaf once per derived source that lists it, readers before what they read.
    assert graph.leaf_inputs("top") == [("t2", "right"), ("t1", "right"), ("t1", "left"), ("t2", "left")]


def test_nested_mixtures_and_smoothed_labels():
    graph = graph_of(NESTED)
    assert graph.postorder("outer") == ["t1", "labels", "smooth", "inner", "t3", "outer"]
    assert graph.leaves("outer") == ["t1", "labels", "t3"]
    assert graph.leaves("smooth") == ["labels"]
    assert graph.leaf_inputs("smooth") == [("labels", "smooth")]
    assert graph.leaf_inputs("outer") == [("t3", "outer"), ("t1", "inner"), ("labels", "smooth")]


def test_a_leaf_is_its_own_leaf():
    graph = graph_of(NESTED)
    assert graph.postorder("labels") == graph.leaves("labels") == ["labels"]
    assert graph.leaf_inputs("labels") == [("labels", "")]
    assert graph.postorder("unknown") == graph.leaves("unknown") == graph.leaf_inputs("unknown") == []


def test_whole_graph_postorder_lists_every_source_once_after_what_it_reads():
    graph = graph_of(NESTED)
    order = graph.postorder()
    assert order == ["labels", "t1", "t3", "smooth", "inner", "outer"]
    for name in order:
        assert all(order.index(m.name) < order.index(name) for m in graph.members(name))


def test_a_cycle_is_walked_without_looping():
    graph = graph_of(CYCLES)
    assert graph.postorder("a") == ["t", "b", "a"]
    assert graph.postorder("c") == ["t", "c"]
    assert graph.leaves("a") == ["t"]
    assert graph.leaf_inputs("a") == [("t", "a"), ("t", "b")]


def test_cycles_one_per_knot_from_the_first_source():
    graph = graph_of(CYCLES)
    assert sorted(graph.cycles()) == [["a", "b"], ["c"]]
    assert ["b", "a"] in graph.cycles(first=lambda name: name != "b")  # starts where `first` says
    assert graph_of(DIAMOND).cycles() == graph_of(NESTED).cycles() == []


@pytest.fixture
def default_recursion_limit():
    """Python's default recursion limit, whatever the process holds: torch.compile raises it to 2000, but
    only when it really compiles (a cold cache), and a chain longer than that exceeds the loader's cap."""
    held = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield 1000
    sys.setrecursionlimit(held)


def test_a_long_chain_needs_no_recursion(default_recursion_limit):
    count = default_recursion_limit + 100
    lines = ["t0: {type: teacher}", "t1: {type: teacher}", "m0: {type: mixture, sources: [t0, t1]}"]
    lines += [f"m{i}: {{type: mixture, sources: [m{i - 1}, t0]}}" for i in range(1, count)]
    graph = graph_of(document("\n".join(lines) + "\n"))
    order = graph.postorder(f"m{count - 1}")
    assert order[:3] == ["t0", "t1", "m0"] and len(order) == count + 2
    assert graph.leaves(f"m{count - 1}") == ["t0", "t1"]
    # The planner resolves the chain along the same walk.
    target = resolve_target(graph.spec, f"m{count - 1}", graph)
    assert isinstance(target, MixtureTarget) and target.parts[1][1] == DenseTarget("t0", 100, None)


def test_loss_sources():
    graph = graph_of(NESTED)
    assert graph.loss_sources("d") == graph.postorder("outer")
    assert graph.loss_sources("lm") == ["labels"]
    no_target = graph_of(document("t: {type: teacher}\n"))
    assert no_target.loss_sources("z") == no_target.loss_sources("unknown") == []


# --------------------------------------------------------------------------------------------------
# The users of the walk.
# --------------------------------------------------------------------------------------------------


def test_the_compile_context_holds_the_graph():
    spec = lossgraph.loads(NESTED)
    context = analyze(spec)
    assert isinstance(context.graph, SourceGraph) and context.graph.spec is spec
    # A pass run on its own builds the graph it needs.
    alone = CompileContext(spec=spec, source_map=spec.source_map)
    passes.warn_unused(alone)
    assert isinstance(alone.graph, SourceGraph) and not alone.diagnostics


def test_passes_report_cycles_once_per_knot():
    report = lossgraph.check_text(CYCLES, "cycles.yaml")
    cycles = [(d.path, d.message.split(";")[0]) for d in report.errors if "cycle" in d.message]
    assert sorted(cycles) == [
        ("sources.a", "sources form a cycle: a -> b -> a"),
        ("sources.c", "sources form a cycle: c -> c"),
    ]


def test_passes_follow_the_diamond_for_offsets():
    text = DIAMOND.replace("t2: {type: teacher}", "t2: {type: teacher, offset: 2}")
    report = lossgraph.check_text(text, "diamond.yaml")
    messages = [d.message.split(";")[0] for d in report.errors]
    assert messages == [
        "head 'next' predicts token t+1, but teacher 't2' (through 'right') predicts t+2",
        "head 'next' predicts token t+1, but teacher 't2' (through 'left') predicts t+2",
    ]


def test_passes_follow_nested_mixtures_for_zero_mass():
    text = NESTED.replace("d: {type: forward_kl", "d: {type: reverse_kl").replace(
        "inner: {type: mixture, sources: [t1, smooth]}", "inner: {type: mixture, sources: [t1, labels]}"
    )
    text = text.replace("t1: {type: teacher}", "t1: {type: teacher, vocab_size: 90, vocab_map: pad}")
    text = text.replace("t3: {type: teacher}", "t3: {type: teacher, vocab_size: 90, vocab_map: pad}")
    report = lossgraph.check_text(text, "nested.yaml")
    assert [d.path for d in report.errors] == ["losses.d.target"], report.errors
    assert (
        "every part of mixture 'outer' does (mixture 'inner' does; teacher 't3' pads its vocab with zero mass)"
        in report.errors[0].message
    )


def test_a_source_read_only_through_nested_mixtures_is_used():
    report = lossgraph.check_text(NESTED.replace("  lm: {type: cross_entropy, heads: [next], target: labels}\n", ""))
    assert report.ok and not report.warnings, report.diagnostics


def test_plan_targets_match_the_walk():
    spec = lossgraph.loads(DIAMOND)
    left = MixtureTarget("left", ((0.5, DenseTarget("t1", 100, None)), (0.5, DenseTarget("t2", 100, None))))
    right = MixtureTarget("right", ((0.25, DenseTarget("t2", 100, None)), (0.75, DenseTarget("t1", 100, None))))
    assert resolve_target(spec, "top") == MixtureTarget("top", ((0.4, left), (0.6, right)))
    nested = lossgraph.loads(NESTED)
    smooth = resolve_target(nested, "smooth")
    assert smooth == SmoothedTarget("smooth", 0.1, LabelsTarget("labels", -100))


@pytest.mark.parametrize("text", [DIAMOND, NESTED, *(p.read_text(encoding="utf-8") for p in EXAMPLES)])
def test_target_leaves_are_the_graph_leaves(text: str):
    spec = lossgraph.loads(text)
    graph = SourceGraph(spec)
    for name in spec.sources:
        assert [leaf.name for leaf in target_leaves(resolve_target(spec, name))] == graph.leaves(name)


def test_source_summary_reads_the_members():
    spec = lossgraph.loads(NESTED)
    assert source_summary(spec, "smooth") == "label_smoothing of labels (epsilon 0.1)"
    assert source_summary(spec, "inner") == "mixture 0.5 t1 + 0.5 smooth"
    assert source_summary(lossgraph.loads(DIAMOND), "right") == "mixture 0.25 t2 + 0.75 t1"


def test_diagrams_draw_every_member_with_its_weight():
    from lossgraph.cli.viz import to_dot, to_mermaid

    spec = lossgraph.loads(NESTED)
    mermaid = to_mermaid(spec)
    assert "  source_labels --> source_smooth\n" in mermaid
    assert '  source_t1 -->|"0.5"| source_inner\n' in mermaid
    assert '  source_inner -->|"0.5"| source_outer\n' in mermaid
    assert '  source_t3 -> source_outer [label="0.5"];\n' in to_dot(spec)


def test_demo_baseline_keeps_the_sources_its_targets_derive_from():
    pytest.importorskip("torch")
    from lossgraph.apps.demo import without_teachers

    text = document(
        """\
        labels: {type: labels}
        teacher: {type: teacher}
        smooth: {type: label_smoothing, source: labels, epsilon: 0.1}
        smoother: {type: label_smoothing, source: labels, epsilon: 0.2}
        blend: {type: mixture, sources: [smooth, smoother]}
        taught: {type: mixture, sources: [teacher, smooth]}
        """,
        "  lm: {type: cross_entropy, heads: [next], target: blend}\n"
        "  d: {type: forward_kl, heads: [next], target: taught}\n",
    )
    baseline = without_teachers(lossgraph.loads(text))
    assert baseline is not None
    assert list(baseline.losses) == ["lm"]
    assert list(baseline.sources) == ["labels", "smooth", "smoother", "blend"]


def test_the_source_graph_imports_no_torch():
    heavy = "[m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')]"
    code = f"import sys, lossgraph.compiler.graph; print({heavy})"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
