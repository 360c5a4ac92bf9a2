"""Where the fused backend runs, and what it keeps: device checks made once at compile(), a suite that
is honest about devices, and a registry that forgets collected graphs.

- The checks that torch.compile cannot trace (is triton importable, may CPU tensors go through the
  interpreter) are made when a graph is compiled, never inside a call.
- Where CUDA is available, a fused test that hands the kernels CPU tensors fails (tests/device_guard.py);
  without CUDA and without the interpreter, every fused test skips with its reason.
- The fused op's registry (`_BACKENDS`) holds a graph's fused backend, and with it the kernels found for
  its heads, only while the graph lives; a graph compiled for backend="torch" registers nothing.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from fused_cases import DEVICE, interpreter_warnings, requires_fused

import lossgraph
import lossgraph.runtime.fused as fused

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
HAS_TRITON = importlib.util.find_spec("triton") is not None

V = 64
GRAPH = f"""
version: 1
vocab_size: {V}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}}}
sources: {{labels: {{type: labels}}, teacher: {{type: teacher}}}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], target: labels}}
  kd: {{type: forward_kl, heads: [next], target: teacher, temperature: 2.0}}
"""


def _inputs(device: torch.device = DEVICE) -> dict:
    generator = torch.Generator().manual_seed(0)
    logits = {head: torch.randn(2, 6, V, generator=generator).to(device) for head in ("next", "mtp2")}
    labels = torch.randint(0, V, (2, 6), generator=generator).to(device)
    teacher = torch.randn(2, 6, V, generator=generator).to(device)
    return {"logits": logits, "labels": labels, "teachers": {"teacher": teacher}}


# --------------------------------------------------------------------------------------------------
# Checks at compile(), none in the call.
# --------------------------------------------------------------------------------------------------


def test_cpu_tensors_without_the_interpreter_are_refused_by_what_compile_found(monkeypatch):
    """TRITON_INTERPRET is read once, at compile(): setting it afterwards changes nothing."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    data = _inputs(torch.device("cpu"))
    with pytest.raises(lossgraph.BackendError, match="need a CUDA device; set TRITON_INTERPRET=1"):
        graph(data["logits"], labels=data["labels"], teachers=data["teachers"])


def test_a_missing_triton_is_found_at_compile(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
    with pytest.raises(lossgraph.BackendError, match="needs the triton package"):
        graph.backend_for(torch.device("cuda"))
    # "auto" uses the reference math off CUDA, so a missing triton matters only for CUDA tensors
    auto = lossgraph.compile(lossgraph.loads(GRAPH), backend="auto")
    assert auto.backend_for(torch.device("cpu")) is auto.reference_backend
    with pytest.raises(lossgraph.BackendError, match="needs the triton package"):
        auto.backend_for(torch.device("cuda"))


@pytest.mark.skipif(not HAS_TRITON, reason="the fused backend needs the triton package")
def test_the_call_looks_up_nothing(monkeypatch):
    """Choosing the fused backend for a device reads only what compile() found: no package lookup
    and no environment read, which torch.compile(fullgraph=True) on torch 2.11 cannot trace."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")

    def forbidden(*args, **kwargs):
        raise AssertionError("looked up at call time")

    monkeypatch.setattr(importlib.util, "find_spec", forbidden)
    monkeypatch.setattr(os.environ, "get", forbidden)
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert graph.backend_for(device) is graph.fused_backend
    with pytest.raises(lossgraph.BackendError, match="runs on CUDA devices"):
        graph.backend_for(torch.device("meta"))


# --------------------------------------------------------------------------------------------------
# The registry forgets collected graphs.
# --------------------------------------------------------------------------------------------------


def _kernel_keys(token: str) -> list[str]:
    backend = fused._BACKENDS.get(token)
    return [] if backend is None else [key for key in backend.kernels if key.startswith(f"{token}/")]


def test_registry_entries_are_freed_when_the_graph_is_collected():
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
    token = graph.fused_backend.token
    for active in ((True, True), (True, False)):
        fused.kernel_key(token, "next", active)
    fused.kernel_key(token, "next", (True, True), False)
    fused.kernel_key(token, "mtp2", (True,))
    assert fused._BACKENDS[token] is graph.fused_backend
    assert len(_kernel_keys(token)) == 4
    other = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
    assert other.fused_backend.token != token
    collected = weakref.ref(graph.fused_backend)
    del graph
    gc.collect()
    assert collected() is None  # and with it the kernels it found
    assert token not in fused._BACKENDS
    assert other.fused_backend.token in fused._BACKENDS  # the other graph keeps its entries


def test_only_a_graph_with_a_fused_backend_registers():
    """backend="torch" never runs the fused op: no backend, nothing in the registry."""
    before = set(fused._BACKENDS)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")
    assert graph.fused_backend is None
    assert set(fused._BACKENDS) == before
    auto = lossgraph.compile(lossgraph.loads(GRAPH), backend="auto")
    assert set(fused._BACKENDS) == before | {auto.fused_backend.token}
    assert not _kernel_keys(auto.fused_backend.token)  # no kernels until a call needs them


def test_a_copy_of_a_graph_outlives_the_original():
    """copy.deepcopy (a model that holds the graph, copied for an EMA or a teacher) and pickle give
    graphs with registry entries of their own."""
    import copy
    import pickle

    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
    copies = [copy.deepcopy(graph), pickle.loads(pickle.dumps(graph))]
    tokens = {graph.fused_backend.token, *(c.fused_backend.token for c in copies)}
    assert len(tokens) == 3
    for made in copies:
        assert made.fused_backend.fallback is None and made.fused_backend.support == graph.fused_backend.support
    del graph
    gc.collect()
    for made in copies:
        key = fused.kernel_key(made.fused_backend.token, "next", (True, True))
        assert key in made.fused_backend.kernels
    del made, copies
    gc.collect()
    assert not tokens & set(fused._BACKENDS)


@requires_fused
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_called_graph_is_collected_too():
    """After a forward and a backward, nothing (autograd's saved state, closures) keeps the graph alive."""
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
    token = graph.fused_backend.token
    data = _inputs()
    logits = {head: value.requires_grad_() for head, value in data["logits"].items()}
    graph(logits, labels=data["labels"], teachers=data["teachers"]).loss.backward()
    assert _kernel_keys(token)
    collected = weakref.ref(graph)
    del graph
    gc.collect()
    assert collected() is None
    assert token not in fused._BACKENDS


# --------------------------------------------------------------------------------------------------
# An honest suite: the device guard trips, the fused tests skip without a place to run.
# --------------------------------------------------------------------------------------------------

GUARDED_TESTS = (
    textwrap.dedent(
        """
    import pytest
    import torch

    import lossgraph

    GRAPH = GRAPH_TEXT
    V = VOCAB


    def run_on_the_cpu():
        graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
        logits = {head: torch.randn(2, 6, V, requires_grad=True) for head in ("next", "mtp2")}
        teachers = {"teacher": torch.randn(2, 6, V)}
        graph(logits, labels=torch.randint(0, V, (2, 6)), teachers=teachers).loss.backward()


    def test_cpu_tensors_for_the_fused_backend():
        run_on_the_cpu()


    def test_cpu_tensors_and_the_error_swallowed():
        try:
            run_on_the_cpu()
        except AssertionError:
            pass


    @pytest.mark.interpreter
    def test_the_interpreter_path_itself():
        run_on_the_cpu()


    def test_the_reference_backend_on_the_cpu():
        graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")
        logits = {head: torch.randn(2, 6, V) for head in ("next", "mtp2")}
        graph(logits, labels=torch.randint(0, V, (2, 6)), teachers={"teacher": torch.randn(2, 6, V)})
    """
    )
    .replace("GRAPH_TEXT", repr(GRAPH))
    .replace("VOCAB", str(V))
)

# CUDA "available" in a process without CUDA: the guard's condition, nothing else of torch.cuda is used
SIMULATED_CUDA = (
    "import sys, torch; torch.cuda.is_available = lambda: True; import pytest; "
    "sys.exit(pytest.main(sys.argv[1:], plugins=[]))"
)


@pytest.mark.skipif(not HAS_TRITON, reason="the interpreter path needs the triton package")
@pytest.mark.slow
def test_the_device_guard_fails_fused_tests_that_build_cpu_tensors_while_cuda_is_available(tmp_path):
    (tmp_path / "test_guarded.py").write_text(GUARDED_TESTS)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    interpreter: the interpreter path itself\n"
        "filterwarnings =\n    ignore::RuntimeWarning\n    ignore::DeprecationWarning\n"
    )
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(TESTS)}
    command = [sys.executable, "-c", SIMULATED_CUDA, "-p", "device_guard", "-q", "-rA", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, str(tmp_path / "test_guarded.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "FAILED test_guarded.py::test_cpu_tensors_for_the_fused_backend" in output, output[-3000:]
    assert "ERROR test_guarded.py::test_cpu_tensors_and_the_error_swallowed" in output, output[-3000:]
    assert "PASSED test_guarded.py::test_the_interpreter_path_itself" in output, output[-3000:]
    assert "PASSED test_guarded.py::test_the_reference_backend_on_the_cpu" in output, output[-3000:]
    assert "build the fused tests' inputs on fused_cases.DEVICE" in output
    assert "logits (12, 64)" in output  # the guard names the stray tensor


# not this file: its tests that need no kernels would run, this one among them, over and over
FUSED_TEST_FILES = ["test_fused_backend.py", "test_fused_regressions.py", "test_linear_heads.py", "test_distributed.py"]


@pytest.mark.slow
def test_without_cuda_or_the_interpreter_every_fused_test_skips_with_its_reason():
    """The fused tests (names with "fused" or "triton", and every test of the fused files) of a process
    that has neither CUDA nor TRITON_INTERPRET=1: all skipped, none failed, each with the reason."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["CUDA_VISIBLE_DEVICES"] = ""
    files = [str(TESTS / name) for name in FUSED_TEST_FILES]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files, "-k", "fused or triton"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1]
    assert result.returncode == 0, output[-3000:]
    assert "passed" not in summary and "failed" not in summary and "error" not in summary, summary
    skipped = int(summary.split(" skipped")[0].split()[-1])
    assert skipped >= 200, summary
    reasons = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    # the fused backend's reason (TRITON_INTERPRET=1 or the triton package), or a GPU-only test's
    assert reasons and all("CUDA" in line or "triton package" in line for line in reasons), reasons


pytestmark = interpreter_warnings
