"""DTensor logits and teachers from PyTorch's tensor parallelism, passed to a graph as they come.

torchtitan-style tensor parallelism: `parallelize_module(model, mesh, {"lm_head":
ColwiseParallel(use_local_output=False)})` makes the LM head hand out its logits as a DTensor split on
the vocab (`Shard(-1)`). On 2 gloo processes on the CPU, such logits (and a teacher given the same way,
or whole) passed straight to a graph give what one process gives on the whole vocab: the loss, the
logits' gradient (handed back as a DTensor with the same placement) and the trunk's and the head's
parameter gradients, on both backends. A replicated DTensor works whole; other placements are refused
by name; the vocab message under vocab parallel gives both sizes; docs/distributed.md's example runs.

Every spawn costs seconds, so one spawn (module-scoped fixture) runs every check and saves what each
rank saw; the tests read the saved results.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fused_cases import FUSED_SKIP_REASON, INTERPRETED, interpreter_warnings
from helpers import assert_close, free_port, random_labels, random_logits

import lossgraph

pytestmark = interpreter_warnings
# the ranks run on the CPU (gloo), where the fused backend runs through Triton's interpreter; the fused
# vocab-parallel machinery on GPUs (gloo and NCCL) is tested by tests/test_distributed.py
FUSED_SKIP = FUSED_SKIP_REASON or (
    "" if INTERPRETED else "these ranks run on the CPU: the fused backend needs TRITON_INTERPRET=1 there"
)
requires_fused = pytest.mark.skipif(bool(FUSED_SKIP), reason=FUSED_SKIP or "runs")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "distributed.md"
WORLD = 2
VOCAB, HIDDEN = 24, 8
B, S = 2, 5

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


def _example(name: str):
    """A module of examples/ (the test uses what the example ships, not a copy)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Megatron's "copy to tensor-parallel region", as examples/distributed_train.py ships it
ToTensorParallel = _example("distributed_train").ToTensorParallel


class Tiny(torch.nn.Module):
    """A trunk and an LM head; `copy_group` puts ToTensorParallel between them (the doubling mistake)."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        self.copy_group = None

    def forward(self, hidden):
        hidden = torch.tanh(self.trunk(hidden))
        if self.copy_group is not None:
            hidden = ToTensorParallel.apply(hidden, self.copy_group)
        return self.lm_head(hidden)


def _model() -> Tiny:
    torch.manual_seed(0)  # the same weights in every process
    return Tiny()


def _batch():
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, S, HIDDEN, generator=generator)
    return hidden, random_labels(B, S, vocab=VOCAB, seed=3), random_logits(B, S, VOCAB, seed=4)


def _doc_example() -> str:
    """docs/distributed.md's tensor-parallel example: its python block that uses ColwiseParallel."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    found = [block for block in blocks if "ColwiseParallel(use_local_output=False)" in block]
    assert len(found) == 1, "docs/distributed.md needs one python block with the ColwiseParallel example"
    return found[0]


def _grads(model: Tiny) -> dict[str, torch.Tensor]:
    """Parameter gradients as plain tensors (a DTensor's: this rank's part)."""
    found = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        found[name] = (grad.to_local() if hasattr(grad, "to_local") else grad).detach().clone()
    return found


def _message(call) -> str:
    try:
        call()
    except lossgraph.InputError as error:
        return str(error)
    return "no error"


def _tensor_parallel_run(mesh, backend: str, teacher_form: str, *, replicate=False, copy=False, group=None):
    """One step of the tiny model with lm_head = ColwiseParallel: what this rank sees."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    hidden, labels, teacher = _batch()
    model = _model()
    layout = ColwiseParallel(output_layouts=Replicate(), use_local_output=False) if replicate else None
    parallelize_module(model, mesh, {"lm_head": layout or ColwiseParallel(use_local_output=False)})
    if copy:
        model.copy_group = mesh.get_group()
    logits = model(hidden)
    seen = []
    logits.register_hook(seen.append)
    width = VOCAB // WORLD
    columns = slice(dist.get_rank() * width, (dist.get_rank() + 1) * width)
    given = {
        "dtensor": lambda: DTensor.from_local(teacher[..., columns], mesh, [Shard(2)], run_check=False),
        "whole": lambda: teacher,
    }[teacher_form]()
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend=backend, vocab_parallel_group=group)
    out = graph({"next": logits}, labels=labels, teachers={"teacher": given})
    out.loss.backward()
    (grad,) = seen
    return {
        "loss": out.loss.detach(),
        "loss_type": type(out.loss).__name__,
        "values": out.values,
        "placements": str(logits.placements),
        "grad_type": type(grad).__name__,
        "grad_placements": str(grad.placements),
        "logits_grad": grad.to_local().detach().clone(),
        "params": _grads(model),
    }


def _worker(rank: int, port: int, folder: str, backends: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        namespace = {"__name__": "tp_example"}
        exec(compile(_doc_example(), f"{DOC.name} (ColwiseParallel example)", "exec"), namespace)  # noqa: S102
        results = {"doc": {"losses": namespace["losses"]}}
        mesh = namespace["mesh"]  # the doc's process group (gloo) and 1-D mesh over both ranks
        for backend in backends:
            for form in ("dtensor", "whole"):
                results[f"{backend}/{form}"] = _tensor_parallel_run(mesh, backend, form)
            results[f"{backend}/replicate"] = _tensor_parallel_run(mesh, backend, "whole", replicate=True)
        results["group"] = _tensor_parallel_run(mesh, "torch", "dtensor", group=mesh.get_group())
        results["copy"] = _tensor_parallel_run(mesh, "torch", "dtensor", copy=True)

        hidden, labels, teacher = _batch()
        full = _model()(hidden).detach()
        width = VOCAB // WORLD
        rows, columns = slice(rank, rank + 1), slice(rank * width, (rank + 1) * width)
        graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")
        split = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch", vocab_parallel_group=mesh.get_group())
        by_rows = DTensor.from_local(full[rows], mesh, [Shard(0)], run_check=False)
        partial = DTensor.from_local(full, mesh, [Partial()], run_check=False)
        whole = DTensor.from_local(full, mesh, [Replicate()], run_check=False)
        split_teacher = DTensor.from_local(teacher[..., columns], mesh, [Shard(-1)], run_check=False)
        results["messages"] = {
            "shard0": _message(lambda: graph({"next": by_rows}, labels=labels, teachers={"teacher": teacher})),
            "partial": _message(lambda: graph({"next": partial}, labels=labels, teachers={"teacher": teacher})),
            "whole_plain": _message(lambda: split({"next": full}, labels=labels, teachers={"teacher": teacher})),
            "narrow_plain": _message(
                lambda: split({"next": full[..., :10]}, labels=labels, teachers={"teacher": teacher})
            ),
            "split_teacher": _message(
                lambda: graph({"next": whole}, labels=labels, teachers={"teacher": split_teacher})
            ),
        }
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py's workers: gloo's teardown aborts now and then


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("dtensor")
    backends = ["torch"] + ([] if FUSED_SKIP else ["triton"])
    mp.spawn(_worker, args=(free_port(), str(folder), backends), nprocs=WORLD)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


def _single_process(backend: str):
    """The whole vocab in one process: (output, logits' gradient, parameter gradients)."""
    hidden, labels, teacher = _batch()
    model = _model()
    logits = model(hidden)
    logits.retain_grad()
    out = lossgraph.compile(lossgraph.loads(GRAPH), backend=backend)(
        {"next": logits}, labels=labels, teachers={"teacher": teacher}
    )
    out.loss.backward()
    return out, logits.grad, _grads(model)


def _check_against_one_process(result: dict, backend: str, rank: int, *, split: bool, what: str) -> None:
    out, grad, params = _single_process(backend)
    width = VOCAB // WORLD
    rows = slice(rank * width, (rank + 1) * width)  # lm_head's weight is ColwiseParallel's: split in every case
    columns = rows if split else slice(None)
    assert result["loss_type"] == "Tensor", what  # a plain tensor, not a DTensor
    assert_close(result["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6, what=f"{what} loss")
    for key, value in out.values.items():
        assert_close(result["values"][key], value, rtol=1e-5, atol=1e-6, what=f"{what} {key}")
    assert_close(result["logits_grad"], grad[..., columns], rtol=1e-5, atol=1e-7, what=f"{what} logits grad")
    for name, value in params.items():
        expected = value[rows] if name == "lm_head.weight" else value
        assert_close(result["params"][name], expected, rtol=1e-5, atol=1e-7, what=f"{what} {name}")


BACKENDS = [
    pytest.param("torch", id="reference"),
    pytest.param("triton", id="fused", marks=requires_fused),
]


@pytest.mark.parametrize("form", ["dtensor", "whole"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_colwise_parallel_logits_equal_one_process(ranks, backend, form):
    """Shard(-1) logits from ColwiseParallel(use_local_output=False), straight into the graph with no
    vocab_parallel_group, with a teacher split the same way (a DTensor) or given whole on every rank."""
    for rank, found in enumerate(ranks):
        result = found[f"{backend}/{form}"]
        assert result["placements"] == "(Shard(dim=2),)"
        assert result["grad_type"] == "DTensor" and result["grad_placements"] == "(Shard(dim=2),)"
        _check_against_one_process(result, backend, rank, split=True, what=f"rank {rank} {backend}/{form}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicated_dtensor_works_whole(ranks, backend):
    for rank, found in enumerate(ranks):
        result = found[f"{backend}/replicate"]
        assert result["placements"] == "(Replicate(),)"
        assert result["grad_type"] == "DTensor" and result["grad_placements"] == "(Replicate(),)"
        _check_against_one_process(result, backend, rank, split=False, what=f"rank {rank} replicate")


def test_dtensor_with_its_own_group_as_vocab_parallel_group(ranks):
    for rank, found in enumerate(ranks):
        _check_against_one_process(found["group"], "torch", rank, split=True, what=f"rank {rank} group")


def test_copy_to_tensor_parallel_region_doubles_the_trunk_gradient_under_colwise_parallel(ranks):
    """What docs/distributed.md warns of: ToTensorParallel on top of ColwiseParallel sums the trunk's
    gradient twice. The loss and the head's gradient are right; the trunk's are exactly 2x."""
    _, _, params = _single_process("torch")
    for found in ranks:
        copied = found["copy"]
        assert_close(copied["loss"], found["torch/dtensor"]["loss"], rtol=0, atol=0, what="loss")
        for name in ("trunk.weight", "trunk.bias"):
            assert_close(copied["params"][name], 2 * params[name], rtol=1e-6, atol=1e-7, what=name)


def test_other_placements_are_refused_by_name(ranks):
    for found in ranks:
        messages = found["messages"]
        assert "logits['next'] is a DTensor with placements (Shard(dim=0),)" in messages["shard0"]
        assert "batch rows" in messages["shard0"] and "Shard(-1)" in messages["shard0"]
        assert "normalize_across" in messages["shard0"]
        assert "logits['next'] is a DTensor with placements (Partial(sum),)" in messages["partial"]
        assert "teachers['teacher'] is a DTensor split over the vocab" in messages["split_teacher"]
        assert "full_tensor()" in messages["split_teacher"]


def test_vocab_message_names_the_whole_and_the_per_rank_vocab(ranks):
    for rank, found in enumerate(ranks):
        messages = found["messages"]
        assert messages["whole_plain"].startswith(
            "logits['next'] holds 24 columns, the whole vocab of head 'next'; under vocab parallel over 2 "
            f"ranks each rank passes its 12 columns (this rank: [{12 * rank}, {12 * rank + 12}))"
        ), messages["whole_plain"]
        assert "logits.to_local()" in messages["whole_plain"]
        assert messages["narrow_plain"].startswith(
            "logits['next'] holds 10 columns; head 'next' declares vocab_size 24, and under vocab parallel over "
            "2 ranks each rank passes its 12 columns"
        ), messages["narrow_plain"]


def test_doc_tensor_parallel_example_trains(ranks):
    first, second = (found["doc"]["losses"] for found in ranks)
    assert first == second  # the same loss on every rank
    assert len(first) == 20 and first[-1] < 0.7 * first[0], first
