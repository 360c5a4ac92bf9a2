"""Host time of one loss call and its backward: what the CPU spends in lossgraph per training step while
the GPU works (issue 14 asks for at most 0.3 ms for a one-head graph).

    python benchmarks/host_overhead.py                                   # on a GPU: real launches
    TRITON_INTERPRET=1 python benchmarks/host_overhead.py --device cpu   # a CPU proxy, see below
    python benchmarks/host_overhead.py --json host.json                  # also write the numbers

The graph is case a's (cross-entropy and forward KL on one head) over --rows rows of --vocab columns.
On a GPU each call starts with the device idle (a synchronize outside the timed region), so the time is
the host's alone: the call and `loss.backward()` only queue work.

On a CPU the fused backend runs through Triton's interpreter, whose kernels are Python; with --device cpu
the kernel launches are replaced by no-ops (their outputs stay uninitialized), so what is timed is the
host path without the kernels. It is a proxy: a GPU's torch ops and Triton's launcher cost more host
time per call than the CPU's do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import lossgraph
from lossgraph.apps.bench import standard_cases


def case_a(vocab: int) -> lossgraph.CompiledGraph:
    (case,) = [case for case in standard_cases(vocab=vocab) if case.name == "a"]
    return lossgraph.compile(lossgraph.loads(case.yaml()), backend="triton", check_inputs=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", type=int, default=64, help="rows per call (small: the GPU keeps up)")
    parser.add_argument("--vocab", type=int, default=None, help="default: 128256 on a GPU, 1024 on a CPU")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="the best round's median is reported")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("host_overhead: no CUDA device; use --device cpu (with TRITON_INTERPRET=1) for the proxy")
        return 2
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("host_overhead: --device cpu needs TRITON_INTERPRET=1 (set before Python starts)")
            return 2
        from lossgraph.kernels import launcher

        launcher._run = lambda spec, phase, call: None  # the host path alone
    vocab = args.vocab or (128256 if device.type == "cuda" else 1024)
    graph = case_a(vocab)
    logits = torch.randn(args.rows, vocab, dtype=torch.bfloat16, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (args.rows,), device=device)
    teacher = torch.randn(args.rows, vocab, dtype=torch.bfloat16, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        logits.grad = None
        graph({"next": logits}, labels, {"teacher": teacher}).loss.backward()

    for _ in range(20):  # kernels compiled, caches warm
        step()
    medians = []
    for _ in range(args.rounds):
        times = []
        for _ in range(args.calls):
            sync()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        sync()
        medians.append(statistics.median(times) * 1e3)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU proxy, kernel launches stubbed"
    print(
        f"host time per call (forward + backward, one head, {args.rows} x {vocab} bf16): "
        f"{min(medians):.3f} ms (best of {args.rounds} medians of {args.calls}: "
        f"{', '.join(f'{m:.3f}' for m in medians)}); {where}; torch {torch.__version__}"
    )
    if args.json:
        args.json.write_text(json.dumps({"device": where, "rows": args.rows, "vocab": vocab, "medians_ms": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
