"""LossGraphTrainer under DDP (two CPU processes, gloo, launched with torch.distributed.run): two ranks
with batches of 2 and gradient accumulation 2 log, evaluate and train exactly like one process with
batches of 8. The heads run inside DDP's forward (transformers' default find_unused_parameters=True
walks the graph back from the output), each head is normalized by its target count over both ranks,
and the logged terms are averaged over the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

TESTS = Path(__file__).resolve().parent

# The Trainer leaves the process group to the interpreter's teardown, where gloo's worker threads then
# and again aborted the rank ("terminate called without an active exception", SIGABRT) after its work
# was done; the worker destroys the group itself and leaves without the teardown, as a training script
# should (docs/transformers.md).
WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_transformers_ddp import run
result = run(sys.argv[1], batch_size=2, accumulation=2, ddp=True)
if result is not None:
    print("RESULT " + json.dumps(result))
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def run(output_dir: str, batch_size: int, accumulation: int, ddp: bool) -> dict | None:
    """Train 2 steps and evaluate; on rank 0, the logs, the eval metrics and the heads' weights."""
    from test_transformers_trainer import GRAPH, LENGTH, VOCAB, tiny_llama
    from transformers import TrainingArguments

    import lossgraph
    from lossgraph.integrations.transformers import LossGraphTrainer, attach_mtp_heads, topk_teacher_columns

    torch.set_num_threads(1)
    graph = lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")
    input_ids = torch.randint(0, VOCAB, (16, LENGTH), generator=torch.Generator().manual_seed(0))
    columns = topk_teacher_columns(tiny_llama(7), {"input_ids": input_ids}, graph, "cached")
    rows = []
    for i in range(16):
        labels = input_ids[i].clone()
        labels[: i % 5] = -100  # ranks and micro-batches hold different numbers of targets
        rows.append(
            {
                "input_ids": input_ids[i],
                "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": labels,
                "cached_indices": columns["cached_indices"][i],
                "cached_logprobs": columns["cached_logprobs"][i],
            }
        )
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **({"use_cpu": True, "ddp_backend": "gloo"} if ddp else {}),
    )
    student = attach_mtp_heads(tiny_llama(0), graph, style="medusa")
    trainer = LossGraphTrainer(
        model=student,
        args=args,
        train_dataset=rows,
        eval_dataset=rows[:8],
        loss_graph=graph,
        teachers={"teacher": tiny_llama(5, hidden=48)},
    )
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.args.process_index != 0:
        return None
    return {
        "world": trainer.args.world_size,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "eval": {key: value for key, value in metrics.items() if "lossgraph" in key or key == "eval_loss"},
        "heads": {key: value.tolist() for key, value in student.lossgraph_heads.state_dict().items()},
    }


@pytest.mark.slow
def test_two_ranks_with_accumulation_equal_one_big_batch(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests=str(TESTS)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker), str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    ddp = json.loads(line[len("RESULT ") :])
    threads = torch.get_num_threads()
    try:
        single = run(str(tmp_path / "single"), batch_size=8, accumulation=1, ddp=False)
    finally:
        torch.set_num_threads(threads)
    assert ddp["world"] == 2 and single["world"] == 1
    assert len(ddp["logs"]) == len(single["logs"]) == 2
    for a, b in zip(ddp["logs"], single["logs"]):
        terms = [key for key in a if key.startswith("lossgraph/")]
        assert len(terms) == 4
        assert sum(a[key] for key in terms) == pytest.approx(a["loss"], rel=1e-5)
        for key in ["loss", *terms]:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert ddp["eval"].keys() == single["eval"].keys()
    for key, value in ddp["eval"].items():
        assert value == pytest.approx(single["eval"][key], rel=1e-4), key
    for key, value in ddp["heads"].items():
        torch.testing.assert_close(torch.tensor(value), torch.tensor(single["heads"][key]), rtol=1e-4, atol=1e-6)
