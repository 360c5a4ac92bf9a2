"""The backend interface (lossgraph.runtime.backend) and "each fact once".

- The runtime's modules import each other without a cycle (imports inside functions count too), and no
  backend imports the compiled graph: a backend is built from a frozen `BackendOptions` and plan objects.
- Both backends implement `HeadBackend`, and evaluate a head without a `CompiledGraph`, as the compiled
  graph does.
- The fused backend's temperature slots are the plan's (`Launch.slots`).
- The compiler's passes run once per graph: `compile(path)`, `compile(load(path))` and `lossgraph plan`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import pickle
from pathlib import Path

import networkx as nx
import pytest
import torch
from fused_cases import DEVICE, graph_yaml, interpreter_warnings, make_inputs, requires_fused, spec_of

import lossgraph
import lossgraph.compiler.pipeline as pipeline
from lossgraph.document import analysis, check_spec, check_text
from lossgraph.runtime.backend import BackendOptions, HeadBackend, TermStep
from lossgraph.runtime.compiled import term_step
from lossgraph.runtime.fused import FusedBackend, FusedHead
from lossgraph.runtime.inputs import prepare_batches
from lossgraph.runtime.reference_backend import ReferenceBackend
from lossgraph.spec.schedules import evaluate, temperature_key

RUNTIME = Path(lossgraph.__file__).resolve().parent / "runtime"

V = 48
# two launches (five dense teachers), four temperatures (one a schedule), and terms fixed at T = 1
SPLIT = graph_yaml(
    "\n".join(
        ["lm: {type: cross_entropy, heads: [next], target: labels}"]
        + [
            f"kd{i}: {{type: forward_kl, heads: [next], target: t{i}, temperature: {t}}}"
            for i, t in enumerate(["1.0", "2.0", "{schedule: linear, start: 1.0, end: 3.0, steps: 10}", "0.5", "2.0"])
        ]
        + [
            "z: {type: z_loss, heads: [next], weight: 1.0e-3}",
            "bucket: {type: reverse_kl, heads: [next], target: cached}",
        ]
    ),
    sources="\n".join(
        ["labels: {type: labels}", "cached: {type: topk_teacher, k: 4, tail: bucket}"]
        + [f"t{i}: {{type: teacher}}" for i in range(5)]
    ),
    vocab=V,
)


# --------------------------------------------------------------------------------------------------
# Layering.
# --------------------------------------------------------------------------------------------------


def _runtime_imports(path: Path) -> set[str]:
    """The lossgraph.runtime modules `path` imports, anywhere in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y, from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
            elif node.module and node.module.startswith("lossgraph.runtime."):
                names = [node.module.removeprefix("lossgraph.runtime.")]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lossgraph.runtime."):
                    found.add(alias.name.removeprefix("lossgraph.runtime.").split(".")[0])
    return found


def test_the_runtime_modules_import_each_other_without_a_cycle():
    modules = {path.stem: path for path in RUNTIME.glob("*.py") if path.stem != "__init__"}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, imported) for imported in _runtime_imports(path) if imported in modules)
    assert nx.is_directed_acyclic_graph(graph), list(nx.simple_cycles(graph))
    # the backends sit below the compiled graph and beside each other
    for backend in ("fused", "reference_backend", "linear", "backend"):
        assert "compiled" not in nx.descendants(graph, backend), backend
    assert "fused" not in nx.descendants(graph, "reference_backend")
    assert "reference_backend" not in nx.descendants(graph, "fused")


def test_backend_options_are_frozen_and_hold_what_compile_was_given():
    graph = lossgraph.compile(
        lossgraph.loads(SPLIT), backend="torch", chunk_size=8, accumulate_fp32=True, check_inputs=False
    )
    assert graph.options == BackendOptions(backend="torch", chunk_size=8, accumulate_fp32=True, check_inputs=False)
    assert graph.backend == "torch"
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.options.chunk_size = 4
    assert graph.reference_backend.options is graph.options


def test_compile_takes_an_options_object_or_its_fields_as_keywords():
    """`options=BackendOptions(...)` and the keyword shortcuts give the same options; keywords replace
    the object's fields; a name that is not an option, a bad backend or chunk size fail clearly."""
    spec = lossgraph.loads(SPLIT)
    options = lossgraph.BackendOptions(backend="torch", chunk_size=8, check_inputs=False)
    by_object = lossgraph.compile(spec, options=options)
    by_keywords = lossgraph.compile(spec, "torch", chunk_size=8, check_inputs=False)
    assert by_object.options == by_keywords.options == options
    assert lossgraph.compile(spec, options=options, chunk_size=4).options.chunk_size == 4
    assert lossgraph.compile(spec, "torch", options=lossgraph.BackendOptions(backend="triton")).backend == "torch"
    with pytest.raises(lossgraph.InputError, match="unknown option 'inplace_gradient'; the options are backend"):
        lossgraph.compile(spec, inplace_gradient=True)
    with pytest.raises(lossgraph.BackendError, match="unknown backend 'cuda'"):
        lossgraph.compile(spec, options=lossgraph.BackendOptions(backend="torch"), backend="cuda")
    with pytest.raises(lossgraph.InputError, match="chunk_size must be a positive number of rows"):
        lossgraph.BackendOptions(chunk_size=0)


# --------------------------------------------------------------------------------------------------
# Backends without a compiled graph.
# --------------------------------------------------------------------------------------------------


def _direct(backend_name: str):
    """Each head evaluated by a backend built from options and plan objects, next to the compiled graph."""
    spec = spec_of(SPLIT)
    context = analysis(spec)
    options = BackendOptions(backend=backend_name)
    reference = ReferenceBackend(options)
    backend = reference if backend_name == "torch" else FusedBackend(options, context.plan, context.fusion)
    assert isinstance(backend, HeadBackend)
    inputs = make_inputs(spec, (7,), seed=3)
    logits = {name: value.to(DEVICE, torch.float32) for name, value in inputs.logits.items()}
    teachers = {
        name: value.to(DEVICE, torch.float32)
        if isinstance(value, torch.Tensor)
        else lossgraph.TopK(value.indices.to(DEVICE), value.logprobs.to(DEVICE))
        for name, value in inputs.teachers.items()
    }
    labels = inputs.labels.to(DEVICE)
    batches = prepare_batches(context.plan, logits, labels, teachers, None, None, None, None)
    step = 4
    direct = {}
    for head in context.plan.heads:
        steps = [term_step(term, step) for term in head.terms]
        direct[head.name] = backend.evaluate(head, batches[head.name], steps)
    graph = lossgraph.compile(spec, backend=backend_name)
    out = graph(logits, labels=labels, teachers=teachers, step=step)
    return context.plan, direct, out


def _assert_same(plan, direct, out) -> None:
    for head in plan.heads:
        result = direct[head.name]
        for index, term in enumerate(head.terms):
            torch.testing.assert_close(result.values[index], out.values[term.key])
        torch.testing.assert_close(result.loss, out.by_head()[head.name])


def test_the_reference_backend_runs_without_a_compiled_graph():
    _assert_same(*_direct("torch"))


@requires_fused
def test_the_fused_backend_runs_without_a_compiled_graph():
    _assert_same(*_direct("triton"))


def test_float64_heads_fall_back_to_the_reference_only_under_auto():
    spec = spec_of(SPLIT)
    context = analysis(spec)
    options = BackendOptions(backend="triton")
    fused = FusedBackend(options, context.plan, context.fusion)
    assert fused.fallback is None
    inputs = make_inputs(spec, (5,), seed=1)
    batches = prepare_batches(context.plan, inputs.logits, inputs.labels, inputs.teachers, None, None, None, None)
    head = context.plan.heads[0]
    steps = [term_step(term, 0) for term in head.terms]
    with pytest.raises(lossgraph.BackendError, match="float32, bfloat16 or float16"):
        fused.evaluate(head, batches[head.name], steps)
    reference = ReferenceBackend(options)
    auto = FusedBackend(BackendOptions(backend="auto"), context.plan, context.fusion, fallback=reference)
    expected = reference.evaluate(head, batches[head.name], steps)
    torch.testing.assert_close(auto.evaluate(head, batches[head.name], steps).values, expected.values)


# --------------------------------------------------------------------------------------------------
# The plan's temperature slots.
# --------------------------------------------------------------------------------------------------


def test_the_fused_slots_are_the_plans():
    """Each slot of each launch gets 1/T of the temperature the plan put there (`Launch.slots`), at
    every step; the slots of z_loss and of a top-k bucket tail hold the constant 1."""
    context = analysis(spec_of(SPLIT))
    head = context.plan.heads[0]
    launches = context.fusion.for_head(head.name)
    assert len(launches) == 2
    fused_head = FusedHead.of(head, launches)
    slots = [value for launch in launches for value in launch.slots]
    assert len(fused_head.slot_sources) == len(slots)
    for source, value in zip(fused_head.slot_sources, slots):
        if source is None:
            assert temperature_key(value) == temperature_key(1.0)
        else:
            assert temperature_key(head.terms[source.term].temperature) == temperature_key(value)
    for step in (0, 3, 7, 20):
        steps = [term_step(term, step) for term in head.terms]
        expected = [1.0 / evaluate(value, step) for value in slots]
        assert fused_head.numbers(steps).inverse_temperatures == pytest.approx(expected, rel=1e-15)
    # the terms fixed at T = 1 (a top-k bucket tail, z_loss) read a slot that holds no term's temperature
    keys = [term.key for term in head.terms]
    held = {source.term for source in fused_head.slot_sources if source is not None}
    assert keys.index("bucket/next") not in held
    assert keys.index("z/next") not in held


def test_kernels_take_one_weight_per_term_and_one_inverse_temperature_per_slot():
    graph = lossgraph.compile(lossgraph.loads(SPLIT), backend="triton")
    fused = graph.fused_backend
    head = graph.plan.heads[0]
    from lossgraph.runtime.fused import kernel_key

    key = kernel_key(fused.token, head.name, (True,) * len(head.terms))
    kernels = fused.kernels[key]
    assert kernels.terms == len(head.terms)
    assert kernels.slots == sum(len(launch.slots) for launch in graph.fusion.for_head(head.name))
    spans = [binding.slots for binding in kernels.launches]
    assert spans[0][0] == 0 and spans[-1][1] == kernels.slots
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert [len(b.spec.slot_is_one) for b in kernels.launches] == [stop - start for start, stop in spans]


def test_term_steps_are_what_the_backends_read():
    head = lossgraph.compile(lossgraph.loads(SPLIT), backend="torch").plan.heads[0]
    step = term_step(head.terms[0], 0)
    assert isinstance(step, TermStep) and step == TermStep(1.0, 1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# The passes run once.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def analyses(monkeypatch) -> list[object]:
    """Every spec lossgraph.compiler.pipeline.analyze is called on, from here on."""
    calls: list[object] = []
    real = pipeline.analyze

    def counted(spec, *args, **kwargs):
        calls.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze", counted)
    return calls


@pytest.fixture
def graph_file(tmp_path) -> Path:
    path = tmp_path / "split.yaml"
    path.write_text(SPLIT)
    return path


def test_compile_of_a_path_analyses_once(analyses, graph_file):
    graph = lossgraph.compile(graph_file, backend="torch")
    assert len(analyses) == 1
    assert analyses[0] is graph.spec
    assert graph.plan is analysis(graph.spec).plan and graph.fusion is analysis(graph.spec).fusion
    assert len(analyses) == 1


def test_compile_of_a_loaded_spec_analyses_once(analyses, graph_file):
    spec = lossgraph.load(graph_file)
    lossgraph.compile(spec, backend="torch")
    lossgraph.compile(spec, backend="auto")
    assert check_spec(spec).ok
    assert len(analyses) == 1


def test_a_spec_built_in_python_is_analysed_once_too(analyses):
    spec = lossgraph.LossGraphSpec.model_validate(lossgraph.loads(SPLIT).model_dump())
    analyses.clear()
    lossgraph.compile(spec, backend="torch")
    lossgraph.compile(spec, backend="torch")
    assert analyses == [spec]


def test_a_changed_copy_of_a_spec_is_analysed_anew(analyses):
    spec = lossgraph.loads(SPLIT)
    changed = spec.model_copy(update={"normalization": "sum"})
    graph = lossgraph.compile(changed, backend="torch")
    assert graph.plan.normalization == "sum"
    assert analyses == [spec, changed]


def test_the_analysis_stays_out_of_the_spec(analyses):
    spec, other = lossgraph.loads(SPLIT), lossgraph.loads(SPLIT)
    assert spec == other and other == spec  # both analysed: == compares the fields only
    assert spec != spec.model_copy(update={"normalization": "sum"})
    assert "_lossgraph_analysis" not in spec.model_dump() and "_lossgraph_analysis" not in spec.model_dump_json()
    analyses.clear()
    # a copy (pickle, deepcopy) carries an analysis of its own spec, and is not analysed again
    for copied in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert copied == spec
        assert analysis(copied).spec is copied and analysis(copied).plan == analysis(spec).plan
    assert analyses == []


def test_an_invalid_document_is_analysed_once_and_reported(analyses, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SPLIT.replace("target: t3", "target: t9"))
    with pytest.raises(lossgraph.ConfigError, match="unknown source 't9'"):
        lossgraph.compile(path)
    assert len(analyses) == 1
    assert not check_text(path.read_text()).ok


def test_lossgraph_plan_analyses_once(analyses, graph_file, cli):
    result = cli("plan", graph_file)
    assert result.exit_code == 0, result.output
    assert "2 fused launch(es)" in result.output
    assert len(analyses) == 1


pytestmark = interpreter_warnings
