"""One compiled graph called from several threads at once gives what one thread gives.

Through Triton's interpreter (TRITON_INTERPRET=1, the kernels on a CPU), concurrent launches used to
fail now and then with a raw InterpreterError: a launch patches `triton.language` for its duration and
restores it at its end, so one thread's launch ending pulled the patches from under another's. lossgraph
runs interpreted launches one at a time (kernels/interpreter_lock.py). On CUDA launches are not
serialized; the GPU test checks that threads still get their own results there.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fused_cases import DEVICE, FUSED_SKIP_REASON, INTERPRETED, interpreter_warnings, requires_gpu

import lossgraph

pytestmark = interpreter_warnings

GRAPH = """\
version: 1
vocab_size: 64
heads: {next: {offset: 1}}
sources: {labels: {type: labels}, teacher: {type: teacher}}
losses:
  lm: {type: cross_entropy, heads: [next], target: labels}
  distill: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0}
"""
THREADS = 3
SEEDS = 2  # steps of each thread, each on the inputs drawn from one seed


def step(graph: lossgraph.CompiledGraph, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Loss, terms and logits gradient of one forward and backward (the same inputs every time)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 64, generator=generator).to(device).requires_grad_()
    labels = torch.randint(0, 64, (1, 2), generator=generator).to(device)
    teacher = torch.randn(1, 2, 64, generator=generator).to(device)
    out = graph(logits={"next": logits}, labels=labels, teachers={"teacher": teacher})
    out.loss.backward()
    return out.loss.detach(), out.terms["lm/next"].detach(), out.terms["distill/next"].detach(), logits.grad


def threads_agree_with_one_thread(device: torch.device) -> None:
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="triton")
    alone = step(graph, device)
    start = threading.Barrier(THREADS)  # every thread launches at the same moment

    def together(_: int) -> tuple[torch.Tensor, ...]:
        start.wait()
        return step(graph, device)

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(together, range(THREADS)))
    for thread, got in enumerate(concurrent):
        for expected, value in zip(alone, got, strict=True):
            assert torch.equal(expected, value), f"thread {thread}"


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED or bool(FUSED_SKIP_REASON), reason="runs through Triton's interpreter")
def test_threads_share_a_graph_through_the_interpreter(monkeypatch):
    # Whether two unserialized launches collide depends on where the threads switch; a pause inside every
    # launch hands the GIL to the others, so without the lock they would overlap every time.
    from triton.runtime.interpreter import GridExecutor

    launch = GridExecutor.__call__
    running: list[int] = []
    most = 0

    def paused_launch(self, *args, **kwargs):
        nonlocal most
        running.append(threading.get_ident())
        most = max(most, len(running))
        time.sleep(0.002)
        try:
            return launch(self, *args, **kwargs)
        finally:
            running.remove(threading.get_ident())

    monkeypatch.setattr(GridExecutor, "__call__", paused_launch)
    threads_agree_with_one_thread(torch.device("cpu"))
    assert most == 1, f"{most} interpreted launches ran at once"


@requires_gpu
@pytest.mark.skipif(bool(FUSED_SKIP_REASON), reason=FUSED_SKIP_REASON or "runs")
def test_threads_share_a_graph_on_cuda():
    threads_agree_with_one_thread(DEVICE)
