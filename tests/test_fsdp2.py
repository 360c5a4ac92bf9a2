"""FSDP2 (torch's `fully_shard`) with lossgraph's MTP heads, on two gloo CPU processes; and
`LossGraphTrainer` under accelerate's FSDP2 on two GPUs (skipped with fewer).

Each rank takes half of a batch whose rows hold different numbers of targets; the graph is compiled
with `normalize_across`, so each rank's loss is its share of the global mean, and the loss is scaled
by the number of ranks because FSDP2 averages the gradients (docs/distributed.md, "FSDP2"). Three
optimizer steps must give the loss and the parameters of one process on the whole batch, for every
head style, with every decoder layer and the root sharded (`root`), with `lm_head` as its own unit as
well (`lm_head`: the deepseek heads predict through `lm_head`, so it is gathered for each depth), and
with every `Linear` its own unit (`linears`: lm_head and the heads' own layers; what the Trainer test
below asks of accelerate). All the cases run in one spawn: starting the processes costs more than the
tiny models' training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
from helpers import assert_close, free_port  # noqa: E402
from tiny_models import VOCAB, one_thread, tiny_llama  # noqa: E402, F401 (one_thread: an autouse fixture)

import lossgraph  # noqa: E402
from lossgraph.integrations.transformers import attach_mtp_heads, compute_loss, head_logits  # noqa: E402

GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}, mtp3: {{offset: 3}}}}
sources: {{labels: {{type: labels}}}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2, mtp3], target: labels}}
  z: {{type: z_loss, heads: [next], weight: 1.0e-2}}
"""
ROWS, LENGTH, STEPS, WORLD = 4, 8, 3, 2
# (head style, what is an FSDP2 unit besides the decoder layers and the root)
CASES = [(style, wrap) for style in ("medusa", "linear", "deepseek") for wrap in ("root", "lm_head", "linears")]


def _batch(rows: slice) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    for row in range(ROWS):
        labels[row, : 2 * row] = -100  # the ranks hold different numbers of targets
    return {"input_ids": input_ids[rows], "attention_mask": torch.ones_like(input_ids[rows]), "labels": labels[rows]}


def _train(style: str, wrap: str, group=None) -> dict:
    """STEPS steps of SGD; the global loss of each step and the full parameters after the last one."""
    from torch.distributed.fsdp import fully_shard

    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch", normalize_across=group)
    model = attach_mtp_heads(tiny_llama(0), graph, style=style)
    if group is not None:
        if wrap == "linears":
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    fully_shard(module)
        elif wrap == "lm_head":
            fully_shard(model.lm_head)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # the root: embeddings, final norm, and the MTP heads and lm_head unless above
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    losses = []
    for _ in range(STEPS):
        out = compute_loss(model, _batch(rows), graph)
        (out.loss * world).backward()  # FSDP2 averages the gradients over the ranks; the shares add up
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach()
        if group is not None:
            dist.all_reduce(loss, group=group)
        losses.append(loss)
    params = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        params[name] = full.detach().clone()
    return {"losses": torch.stack(losses), "params": params}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for style, wrap in CASES:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result = _train(style, wrap, dist.group.WORLD)
                except Exception as error:  # noqa: BLE001 (reported by the test, case by case)
                    result = {"error": f"{type(error).__name__}: {error}"}
            # the model's own output (the MTP tie) is no view; an nn.Linear with a bias on [B, S, H] returns
            # one (addmm, then view), which FSDP2 warns about for medusa's blocks as their own units
            views = {str(w.message) for w in caught if "ForCausalLM) returned a view" in str(w.message)}
            result["warnings"] = sorted(views)
            results[(style, wrap)] = result
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # the results are on disk; gloo's teardown at the interpreter's exit aborts now and then


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(WORLD, free_port(), str(folder)), nprocs=WORLD)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize(("style", "wrap"), CASES, ids=[f"{style}-{wrap}" for style, wrap in CASES])
def test_fsdp2_trains_like_one_process(sharded, style, wrap):
    expected = _train(style, wrap)
    assert expected["losses"][-1] < expected["losses"][0] - 0.5  # it trains (the heads too: they share the loss)
    for rank, results in enumerate(sharded):
        got = results[(style, wrap)]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        assert got["warnings"] == [], f"rank {rank}"
        assert_close(got["losses"], expected["losses"], rtol=1e-5, atol=1e-6, what=f"rank {rank} losses")
        assert got["params"].keys() == expected["params"].keys()
        for name, value in expected["params"].items():
            assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, what=f"rank {rank} {name}")


def test_deepseek_depths_call_lm_head_and_the_tie_copies_nothing():
    """What FSDP2 relies on, in one process: each deepseek depth's logits are the output of a call of
    lm_head (FSDP2 gathers its weight around the call, and again in backward from a hook on that
    output), the heads run once, and the model's logits come back as no view and no copy."""
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")
    model = attach_mtp_heads(tiny_llama(0), graph, style="deepseek")
    outputs, runs = [], []
    model.lm_head.register_forward_hook(lambda module, args, output: outputs.append(output))
    model.lossgraph_heads.register_forward_hook(lambda *_: runs.append(1))
    logits = head_logits(model, graph, _batch(slice(None))["input_ids"])
    assert runs == [1] and len(outputs) == 3  # the model's call of lm_head, and one per depth
    depths = [output for output in outputs if output is logits["mtp2"] or output is logits["mtp3"]]
    assert len(depths) == 2
    (own,) = [output for output in outputs if all(output is not depth for depth in depths)]
    assert logits["next"]._base is None and logits["next"].data_ptr() == own.data_ptr()
    assert logits["next"].grad_fn is not own.grad_fn  # tied to the depths' logits (DDP's unused-parameter search)


# --------------------------------------------------------------------------------------------------
# LossGraphTrainer under accelerate's FSDP2: GPUs only (on the CPU accelerate quietly runs DDP instead).
# --------------------------------------------------------------------------------------------------

TESTS = Path(__file__).resolve().parent
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

# As in test_transformers_ddp.py: the worker destroys the group itself and leaves without the
# interpreter's teardown once its results are printed.
TRAINER_WORKER = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_fsdp2 import run_trainer
result = run_trainer(sys.argv[1], sys.argv[2], fsdp=sys.argv[3] == "fsdp")
if result is not None:
    print("RESULT " + json.dumps(result))
if dist.is_initialized():
    dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def run_trainer(output_dir: str, style: str, fsdp: bool) -> dict | None:
    """Two steps of 8 examples (one process, or 2 per rank and 2 accumulated micro-batches on two ranks
    under FSDP2, lm_head in the root unit and as its own unit too); on rank 0: the logs and the full
    parameters."""
    from transformers import TrainingArguments

    from lossgraph.integrations.transformers import LossGraphTrainer

    torch.set_num_threads(1)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")
    input_ids = torch.randint(0, VOCAB, (16, LENGTH), generator=torch.Generator().manual_seed(0))
    rows = []
    for i in range(16):
        labels = input_ids[i].clone()
        labels[: i % 5] = -100  # ranks and micro-batches hold different numbers of targets
        rows.append(
            {"input_ids": input_ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels}
        )
    extra = {}
    if fsdp:  # every decoder layer, and lm_head (whose weight the deepseek depths read) as its own unit
        layers = ["LlamaDecoderLayer", "Linear"] if style == "deepseek" else ["LlamaDecoderLayer"]
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": layers}}
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=2 if fsdp else 8,
        gradient_accumulation_steps=2 if fsdp else 1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
        seed=0,
        **extra,
    )
    model = attach_mtp_heads(tiny_llama(0), graph, style=style)
    trainer = LossGraphTrainer(model=model, args=args, train_dataset=rows, loss_graph=graph)
    trainer.train()
    params, sharded = {}, False
    for name, parameter in trainer.model.named_parameters():
        sharded = sharded or hasattr(parameter, "full_tensor")
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        params[name] = full.detach().float().cpu().tolist()
    if trainer.args.process_index != 0:
        return None
    return {
        "world": trainer.args.world_size,
        "sharded": sharded,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "params": params,
    }


def _launch(tmp_path: Path, style: str, mode: str) -> dict:
    worker = tmp_path / "worker.py"
    worker.write_text(TRAINER_WORKER.format(tests=str(TESTS)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode == "fsdp":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0,1")
    else:  # one process on one GPU (with several visible, the Trainer would use DataParallel)
        launcher = [sys.executable]
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    command = [*launcher, str(worker), str(tmp_path / mode), style, mode]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason=f"accelerate's FSDP needs a CUDA GPU per rank: 2 ranks, {GPUS} GPU(s)")
@pytest.mark.parametrize("style", ["medusa", "linear", "deepseek"])
def test_trainer_under_accelerate_fsdp2_equals_one_process(style, tmp_path):
    sharded = _launch(tmp_path, style, "fsdp")
    single = _launch(tmp_path, style, "single")
    assert sharded["world"] == 2 and single["world"] == 1
    assert sharded["sharded"], "accelerate did not shard the model with FSDP2"
    assert len(sharded["logs"]) == len(single["logs"]) == 2
    for a, b in zip(sharded["logs"], single["logs"]):
        for key in [key for key in b if key == "loss" or key.startswith("lossgraph/")]:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert sharded["params"].keys() == single["params"].keys()
    for name, value in single["params"].items():
        assert_close(torch.tensor(sharded["params"][name]), torch.tensor(value), rtol=1e-4, atol=1e-5, what=name)
