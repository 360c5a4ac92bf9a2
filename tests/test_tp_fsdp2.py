"""Tensor parallelism x FSDP2 on a 2x2 mesh of gloo CPU processes, torchtitan style.

`init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))`; `lm_head` is `ColwiseParallel(
use_local_output=False)` on the "tp" sub-mesh, then the model is `fully_shard`ed over the "dp" sub-mesh
(TP first, then FSDP2, as torchtitan does): lm_head's weight ends up split on both mesh dimensions, the
logits arrive as a `Shard(-1)` DTensor on the "tp" sub-mesh. Each dp rank takes half the batch, whose
rows hold different numbers of targets; the graph (cross_entropy + forward_kl against a teacher +
z_loss) is compiled with `normalize_across=` the dp group, so each dp rank's loss is its share of the
global mean, and the loss is scaled by the dp size because FSDP2 averages the gradients over dp
(docs/distributed.md, "FSDP2"). Three SGD steps must give the loss of each step and every parameter
(`full_tensor()`) of one process on the whole batch and the whole vocab. The teacher is given whole
(a plain tensor of the whole vocab: the graph takes the rank's columns) or as a `Shard(-1)` DTensor on
the "tp" sub-mesh.

One spawn (4 processes) runs every case and saves what each rank saw; the tests read the results. The
fused backend runs on the CPU only through Triton's interpreter (TRITON_INTERPRET=1), and is skipped
without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fused_cases import FUSED_SKIP_REASON, INTERPRETED, interpreter_warnings
from helpers import assert_close, free_port, random_logits

import lossgraph

pytestmark = interpreter_warnings
FUSED_SKIP = FUSED_SKIP_REASON or (
    "" if INTERPRETED else "these ranks run on the CPU: the fused backend needs TRITON_INTERPRET=1 there"
)
requires_fused = pytest.mark.skipif(bool(FUSED_SKIP), reason=FUSED_SKIP or "runs")

DP, TP = 2, 2
WORLD = DP * TP
VOCAB, HIDDEN = 16, 8
ROWS, LENGTH, STEPS = 4, 6, 3

GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}}}
sources: {{labels: {{type: labels}}, teacher: {{type: teacher}}}}
losses:
  lm: {{type: cross_entropy, heads: [next], target: labels}}
  fkl: {{type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true, weight: 0.5}}
  z: {{type: z_loss, heads: [next], weight: 1.0e-2}}
"""
# (backend, how the teacher is given)
CASES = [(backend, form) for backend in ("torch", "triton") for form in ("whole", "dtensor")]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.trunk = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens):
        return self.lm_head(torch.tanh(self.trunk(self.embed(tokens))))


def _batch(step: int):
    """Step `step`'s tokens, labels (rows with 1, 2, 3, 4 targets masked out) and teacher logits."""
    tokens = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(step))
    labels = tokens.roll(-1, dims=1)
    for row in range(ROWS):
        labels[row, : row + 1] = -100  # the dp ranks hold different numbers of targets
    return tokens, labels, random_logits(ROWS, LENGTH, VOCAB, seed=100 + step)


def _train(backend: str, teacher_form: str, mesh=None) -> dict:
    """STEPS steps of SGD; the global loss of each step and the full parameters after the last one."""
    torch.manual_seed(0)  # the same weights in every process
    model = Tiny()
    dp_group, rows, columns = None, slice(None), slice(None)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel(use_local_output=False)})
        fully_shard(model, mesh=mesh["dp"])
        dp_group = mesh["dp"].get_group()
        dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
        rows = slice(dp * ROWS // DP, (dp + 1) * ROWS // DP)
        columns = slice(tp * VOCAB // TP, (tp + 1) * VOCAB // TP)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend=backend, normalize_across=dp_group)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, placements = [], []
    for step in range(STEPS):
        tokens, labels, teacher = _batch(step)
        logits = model(tokens[rows])
        teacher = teacher[rows]
        if teacher_form == "dtensor" and mesh is not None:
            from torch.distributed.tensor import DTensor, Shard

            teacher = DTensor.from_local(teacher[..., columns].contiguous(), mesh["tp"], [Shard(2)], run_check=False)
        if mesh is not None:
            placements.append(f"{logits.device_mesh.mesh_dim_names} {logits.placements}")
        out = graph({"next": logits}, labels=labels[rows], teachers={"teacher": teacher})
        world = dist.get_world_size(dp_group) if dp_group is not None else 1
        (out.loss * world).backward()  # FSDP2 averages the gradients over dp; the dp shares add up
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach().clone()
        if dp_group is not None:
            dist.all_reduce(loss, group=dp_group)
        losses.append(loss)
    params = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        params[name] = full.detach().clone()
    found = {"losses": torch.stack(losses), "params": params, "placements": placements}
    if mesh is not None:
        found["param_placements"] = {name: str(p.placements) for name, p in model.named_parameters()}
    return found


def _worker(rank: int, port: int, folder: str, cases: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
        results = {}
        for backend, form in cases:
            try:
                results[(backend, form)] = _train(backend, form, mesh)
            except Exception as error:  # noqa: BLE001 (reported by the test, case by case)
                results[(backend, form)] = {"error": f"{type(error).__name__}: {error}"}
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)  # as tests/test_dtensor.py's workers: gloo's teardown aborts now and then


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("tp_fsdp2")
    cases = [case for case in CASES if case[0] == "torch" or not FUSED_SKIP]
    mp.spawn(_worker, args=(free_port(), str(folder), cases), nprocs=WORLD)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize(
    ("backend", "form"),
    [
        pytest.param(
            backend,
            form,
            id=f"{'reference' if backend == 'torch' else 'fused'}-{form}",
            marks=[requires_fused] if backend == "triton" else [],
        )
        for backend, form in CASES
    ],
)
def test_tp_fsdp2_2x2_trains_like_one_process(ranks, backend, form):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _train(backend, form)
    finally:
        torch.set_num_threads(threads)
    assert expected["losses"][-1] < expected["losses"][0]  # it trains
    for rank, results in enumerate(ranks):
        got = results[(backend, form)]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        what = f"rank {rank} {backend}/{form}"
        assert set(got["placements"]) == {"('tp',) (Shard(dim=2),)"}, what  # the logits: vocab split on "tp"
        # FSDP2 splits lm_head's rows over "dp" on top of ColwiseParallel's split over "tp"
        assert got["param_placements"]["lm_head.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))", what
        assert_close(got["losses"], expected["losses"], rtol=1e-5, atol=1e-6, what=f"{what} losses")
        assert got["params"].keys() == expected["params"].keys()
        for name, value in expected["params"].items():
            assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, what=f"{what} {name}")
