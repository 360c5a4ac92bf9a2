"""Vocab-parallel and data-parallel training with lossgraph over torch.distributed.

    torchrun --nproc-per-node 2 examples/distributed_train.py            # 2-way vocab parallel
    torchrun --nproc-per-node 2 examples/distributed_train.py --tp 1     # 2-way data parallel
    torchrun --nproc-per-node 4 examples/distributed_train.py --tp 2     # both
    torchrun --nproc-per-node 1 examples/distributed_train.py            # one process (one GPU: NCCL)

Picks NCCL when every process of a node has a GPU of its own (rank r on cuda:LOCAL_RANK), gloo on the
CPUs otherwise (--backend chooses). Ranks are grouped into tensor-parallel groups of
`--tp` consecutive ranks, which split the LM head (and the teacher's) over the vocabulary, and
data-parallel groups across them, which split the batch. lossgraph combines the vocab slices of every
head (`vocab_parallel_group`) and normalizes by the global token count (`normalize_across`), so the
training is the same as on one device whatever the layout.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import lossgraph

VOCAB = 64
HIDDEN = 32

GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}}}
sources: {{labels: {{type: labels}}, teacher: {{type: teacher}}}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], head_weights: [1.0, 0.5], target: labels}}
  distill: {{type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}}
  z: {{type: z_loss, heads: [next], weight: 1.0e-4}}
"""


class ToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tensor-parallel group.

    The hidden states are the same on every rank of the group, but each rank's head slice only sees
    its part of the gradient with respect to them. Needed here because the heads are split by hand
    (plain tensors). Never with PyTorch's ColwiseParallel (DTensor): its backward already sums this
    gradient, and a second sum doubles every trunk gradient (see docs/distributed.md).
    """

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class Student(torch.nn.Module):
    """An embedding, a small MLP trunk, and each head's slice of the vocabulary."""

    def __init__(self, heads: list[str], columns: slice, tp_group):
        super().__init__()
        self.tp_group = tp_group
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN)
        )
        full = {name: torch.randn(VOCAB, HIDDEN) * HIDDEN**-0.5 for name in heads}  # same seed on every rank
        self.heads = torch.nn.ParameterDict({name: torch.nn.Parameter(w[columns].clone()) for name, w in full.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = ToTensorParallel.apply(self.trunk(self.embed(tokens)), self.tp_group)
        return {name: hidden @ weight.T for name, weight in self.heads.items()}


def groups(world: int, tp: int):
    """This rank's tensor-parallel group (consecutive ranks) and data-parallel group (one per TP rank)."""
    rank = dist.get_rank()
    tp_group = dp_group = None
    for start in range(0, world, tp):  # every rank must create every group, in the same order
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            tp_group = group
    for offset in range(tp):
        group = dist.new_group(list(range(offset, world, tp)))
        if rank % tp == offset:
            dp_group = group
    return tp_group, dp_group


def backend_and_device(requested: str) -> tuple[str, torch.device]:
    """The process group's backend and this process's device: NCCL needs one GPU per process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = requested
    if requested == "auto":
        backend = "nccl" if gpus >= local_world else "gloo"
    if backend == "gloo":
        return backend, torch.device("cpu")
    if gpus < local_world:
        raise SystemExit(f"--backend nccl needs a GPU per process: {local_world} processes, {gpus} GPU(s)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return backend, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=None, help="vocab-parallel ranks per group (default: all)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--backend",
        choices=["auto", "nccl", "gloo"],
        default="auto",
        help="nccl: one GPU per process; gloo: CPUs (default auto: nccl when there are enough GPUs)",
    )
    args = parser.parse_args()

    backend, device = backend_and_device(args.backend)
    dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = args.tp or world
    if world % tp or VOCAB % tp:
        raise SystemExit(f"--tp {tp} must divide the world size {world} and the vocab {VOCAB}")
    tp_group, dp_group = groups(world, tp)
    tp_rank, dp_rank = rank % tp, rank // tp
    columns = slice(tp_rank * VOCAB // tp, (tp_rank + 1) * VOCAB // tp)

    torch.manual_seed(0)  # identical initial weights everywhere; each rank keeps its slice
    student = Student(["next", "mtp2"], columns, tp_group).to(device)
    teacher_head = (torch.randn(VOCAB, HIDDEN)[columns] * 0.5).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    graph = lossgraph.compile(
        lossgraph.loads(GRAPH), vocab_parallel_group=tp_group if tp > 1 else None, normalize_across=dp_group
    )

    data = torch.Generator().manual_seed(100 + dp_rank)  # each data-parallel rank reads other tokens
    for step in range(args.steps):
        starts = torch.randint(0, VOCAB, (4, 1), generator=data)
        tokens = ((starts + torch.arange(16)) % VOCAB).to(device)  # counting sequences: learnable from the last token
        labels = tokens.roll(-1, dims=1)
        labels[:, -1] = -100
        with torch.no_grad():
            teacher_logits = student.embed(tokens) @ teacher_head.T  # a frozen stand-in teacher, sliced too
        out = graph(student(tokens), labels=labels, teachers={"teacher": teacher_logits}, step=step)
        optimizer.zero_grad()
        out.loss.backward()
        # each data-parallel rank's loss is its share of the global mean: the gradients add up
        for parameter in student.parameters():
            dist.all_reduce(parameter.grad, group=dp_group)
        optimizer.step()
        total = out.loss.detach().clone()
        dist.all_reduce(total, group=dp_group)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            terms = ", ".join(f"{key} {float(value):.3f}" for key, value in out.terms.items())
            print(
                f"step {step}: loss {float(total):.4f}; rank 0's shares: {terms} "
                f"[tp={tp}, dp={world // tp}, {backend} on {device.type}]",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
