"""Where the time of a fused-linear head goes (benchmark case e: cross-entropy and forward KL from hidden
states and head weights, student and teacher), phase by phase, and how the chunk size trades time for
memory.

    python benchmarks/linear_breakdown.py                      # on a GPU: case e's sizes
    python benchmarks/linear_breakdown.py --json linear.json   # also write the numbers
    python benchmarks/linear_breakdown.py --device cpu --tokens 64 --vocab 256 --hidden 32 --repeats 1
                                                               # plumbing only (reference loss on the CPU)

1. The chunked pipeline at the chunk size lossgraph picks, each phase timed on its own over every chunk:
   the student's and the teacher's logits (two matmuls), the loss kernel (loss and logits gradient in
   one launch), the gradient of the hidden states and the accumulation of the weight's gradient (two
   more matmuls), against the four matmuls of the whole batch at once.
2. The whole call (forward and backward) at several chunk sizes, with its time and peak extra memory.

Each phase is timed with CUDA events around its calls on their own; the loss phase's includes the host
time of a call when the GPU waits for it (a small chunk's kernel can take less). On a CPU the loss phase
runs the reference math (`backend="torch"`): the numbers say nothing about a GPU; the run only checks
the script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import lossgraph
from lossgraph.apps.bench import time_step
from lossgraph.compiler.fusion import chunk_rows
from lossgraph.runtime.inputs import Linear


def graph_text(vocab: int, head: str) -> str:
    return (
        f"version: 1\nvocab_size: {vocab}\nheads: {{next: {head}}}\n"
        "sources: {labels: {type: labels}, teacher: {type: teacher}}\n"
        "losses: {lm: {type: cross_entropy, heads: [next], target: labels},\n"
        "         kd: {type: forward_kl, heads: [next], target: teacher}}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--chunks", default="256,512,1024,2048", help="chunk sizes (rows) for part 2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("linear_breakdown: no CUDA device (use --device cpu with small sizes to check the script)")
        return 2
    backend = "triton" if device.type == "cuda" else "torch"
    dtype = torch.bfloat16
    tokens, vocab, hidden = args.tokens, args.vocab, args.hidden
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    states, weight = tensor(tokens, hidden), tensor(vocab, hidden, scale=hidden**-0.5)
    teacher_states, teacher_weight = tensor(tokens, hidden), tensor(vocab, hidden, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)

    def median(step) -> float:
        """Median milliseconds of `step()` over --repeats runs, after one warm-up run."""
        return time_step(step, device, repeats=args.repeats, warmup=1)[0]

    chunk = min(tokens, chunk_rows(vocab, [vocab], states.element_size()))
    starts = range(0, tokens, chunk)
    report: dict[str, object] = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk": chunk}

    # 1. the phases, each over every chunk
    logits_graph = lossgraph.compile(
        lossgraph.loads(graph_text(vocab, "{offset: 1}")), backend=backend, inplace_grad=True, check_inputs=False
    )
    rows = slice(0, chunk)
    logits = F.linear(states[rows], weight)
    teacher_logits = F.linear(teacher_states[rows], teacher_weight)
    block_grad = torch.randn_like(logits)
    grad_weight = torch.zeros_like(weight)

    def loss_kernel() -> None:
        # a fresh copy each time: the kernel writes the gradient over the logits
        chunk_logits = logits.clone().requires_grad_()
        logits_graph({"next": chunk_logits}, labels[rows], {"teacher": teacher_logits})

    copy = median(lambda: logits.clone())
    phases = {
        "student logits (matmul)": median(lambda: F.linear(states[rows], weight)),
        "teacher logits (matmul)": median(lambda: F.linear(teacher_states[rows], teacher_weight)),
        "loss kernel (loss + logits gradient)": max(0.0, median(loss_kernel) - copy),
        "hidden gradient (matmul)": median(lambda: torch.mm(block_grad, weight)),
        "weight gradient (addmm into V x H)": median(lambda: grad_weight.addmm_(block_grad.t(), states[rows])),
    }
    per_call = {name: ms * len(starts) for name, ms in phases.items()}
    whole = {
        "four matmuls, whole batch": median(lambda: F.linear(states, weight))
        + median(lambda: F.linear(teacher_states, teacher_weight))
        + median(lambda: torch.mm(torch.empty(tokens, vocab, device=device, dtype=dtype), weight))
        + median(lambda: torch.empty(vocab, tokens, device=device, dtype=dtype) @ states)
    }
    total = sum(per_call.values())
    print(f"fused-linear case e, {tokens} tokens, V={vocab}, H={hidden}, bf16, {len(starts)} chunks of {chunk} rows")
    print(f"{'phase':40} {'ms per call':>12} {'share':>6}")
    for name, ms in per_call.items():
        print(f"{name:40} {ms:12.3f} {ms / total:6.1%}")
    print(f"{'sum of the phases':40} {total:12.3f}")
    print(f"{'four matmuls, whole batch':40} {whole['four matmuls, whole batch']:12.3f}")
    report["phases_ms"] = per_call
    report["whole_batch_matmuls_ms"] = whole["four matmuls, whole batch"]

    # 2. the whole call at several chunk sizes
    graph_states = states.clone().requires_grad_()
    graph_weight = weight.clone().requires_grad_()
    sweep = []
    print(f"\n{'chunk rows':>10} {'call + backward ms':>19} {'peak extra GiB':>15}")
    for size in [int(value) for value in args.chunks.split(",")]:
        graph = lossgraph.compile(
            lossgraph.loads(graph_text(vocab, "{input: hidden}")), backend=backend, chunk_size=size, check_inputs=False
        )
        teacher = Linear(teacher_states, teacher_weight)

        def step(graph=graph, teacher=teacher) -> None:
            graph_states.grad = graph_weight.grad = None
            graph({"next": Linear(graph_states, graph_weight)}, labels, {"teacher": teacher}).loss.backward()

        ms = median(step)
        extra = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - before) / 2**30
        sweep.append({"chunk": size, "ms": ms, "peak_extra_gib": extra})
        print(f"{size:10d} {ms:19.3f} {'' if extra is None else f'{extra:15.2f}'}")
    report["sweep"] = sweep
    report["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (reference loss)"
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
