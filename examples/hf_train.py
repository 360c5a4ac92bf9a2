"""Train a student with a loss graph and the transformers Trainer, as a transformers user writes it.

The student (a small Llama) learns from the labels on its next-token head and on one MTP head, from
an online teacher (a GPT-2 run in every step) and from an offline top-k teacher (top-8 log-probs
stored with the data), with gradient accumulation and evaluation, on default TrainingArguments.
Then it saves the student, loads it back with its MTP heads, drafts tokens with them and trains on.

    python examples/hf_train.py --output-dir /tmp/hf_train

The models are built from configs (no download) and tiny, so this runs in seconds on a CPU. Swap in
`AutoModelForCausalLM.from_pretrained(...)` and your tokenized data for a real run. It prints what it
checks and writes everything to OUTPUT_DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments

import lossgraph
from lossgraph.integrations.transformers import (
    LossGraphTrainer,
    attach_mtp_heads,
    draft_tokens,
    from_pretrained,
    topk_teacher_columns,
)

VOCAB, LENGTH = 96, 32

GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads:
  next: {{offset: 1}}
  mtp2: {{offset: 2}}
sources:
  labels: {{type: labels}}
  teacher: {{type: teacher}}                # online: a model run in every step
  cached: {{type: topk_teacher, k: 8}}      # offline: top-8 log-probs stored with each example
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], head_weights: [1.0, 0.5], target: labels}}
  online: {{type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}}
  offline: {{type: forward_kl, heads: [next], target: cached, weight: 0.5}}
"""


def student_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def online_teacher(seed: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # GPT-2's default bos and eos ids (50256) lie outside this vocab, and the config checks them as it is
    # built (a warning each): give ids inside it here, not after
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=LENGTH, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def texts(count: int, seed: int) -> list[list[int]]:
    """Token ids of a toy language: counting with a stride, so that every token predicts the next ones."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        start, stride = torch.randint(0, VOCAB, (2,), generator=generator).tolist()
        rows.append([(start + (stride % 7 + 1) * i) % VOCAB for i in range(LENGTH)])
    return rows


def dataset(rows: list[list[int]], graph, cached_teacher) -> list[dict[str, torch.Tensor]]:
    """Examples the way a tokenizer and `group_texts` leave them, plus the offline teacher's columns."""
    input_ids = torch.tensor(rows)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    columns = topk_teacher_columns(cached_teacher, batch, graph, "cached")  # as in datasets.map(batched=True)
    return [
        {
            "input_ids": input_ids[i],
            "attention_mask": batch["attention_mask"][i],
            "labels": input_ids[i].clone(),
            "cached_indices": columns["cached_indices"][i],
            "cached_logprobs": columns["cached_logprobs"][i],
        }
        for i in range(len(rows))
    ]


def training_logs(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "loss" in entry]


def terms_sum(entry: dict, prefix: str = "lossgraph/") -> float:
    return sum(value for key, value in entry.items() if key.startswith(prefix))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    options = parser.parse_args()
    out = Path(options.output_dir)

    graph = lossgraph.compile(lossgraph.loads(GRAPH))
    student = attach_mtp_heads(student_model(), graph, style="medusa")
    teacher = online_teacher()
    cached_teacher = student_model(seed=2)  # stands for a large model run once, offline
    train_data = dataset(texts(64, seed=0), graph, cached_teacher)
    eval_data = dataset(texts(16, seed=1), graph, cached_teacher)

    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=options.max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=options.max_steps // 2,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = LossGraphTrainer(
        model=student,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        loss_graph=graph,
        teachers={"teacher": teacher},
    )
    trainer.train()
    evaluation = trainer.evaluate()
    logs = training_logs(trainer.state.log_history)
    for entry in logs:
        print(f"step {entry['step']}: loss {entry['loss']:.4f} = sum of terms {terms_sum(entry):.4f}")
    print(
        f"eval: loss {evaluation['eval_loss']:.4f} = sum of terms {terms_sum(evaluation, 'eval_lossgraph/'):.4f}; "
        f"next-token accuracy {evaluation['eval_lossgraph_metrics/next/accuracy']:.3f}"
    )

    # Save, load back with the MTP heads, and go on training.
    saved = out / "student"
    trainer.save_model(str(saved))
    reloaded = from_pretrained(saved)
    trained = dict(student.lossgraph_heads.state_dict())
    heads_equal = all(torch.equal(value, trained[key]) for key, value in reloaded.lossgraph_heads.state_dict().items())
    same_eval = LossGraphTrainer(
        model=reloaded, args=args, eval_dataset=eval_data, loss_graph=graph, teachers={"teacher": teacher}
    ).evaluate()["eval_loss"]
    prompt = torch.tensor(texts(2, seed=3))[:, :12]
    draft = draft_tokens(reloaded, prompt)
    print(f"reloaded: heads equal {heads_equal}, eval loss {same_eval:.4f}; draft after the prompt {draft.tolist()}")

    more = TrainingArguments(
        output_dir=str(out / "continued"),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        seed=1,
    )
    continued = LossGraphTrainer(
        model=reloaded, args=more, train_dataset=train_data, loss_graph=graph, teachers={"teacher": teacher}
    )
    continued.train()
    after = reloaded.lossgraph_heads.state_dict()
    heads_moved = any(not torch.equal(value, trained[key]) for key, value in after.items())
    continued_logs = training_logs(continued.state.log_history)
    print(f"continued: loss {continued_logs[-1]['loss']:.4f}, MTP heads trained on: {heads_moved}")

    summary = {
        "train_logs": logs,
        "eval": evaluation,
        "reload": {
            "heads_equal": heads_equal,
            "head_keys": sorted(after),
            "eval_loss_before": evaluation["eval_loss"],
            "eval_loss_after": same_eval,
            "draft": draft.tolist(),
        },
        "continued_logs": continued_logs,
        "continued_heads_moved": heads_moved,
    }
    if not all(math.isfinite(entry["loss"]) for entry in logs):
        raise SystemExit(f"a logged loss is not finite: {[entry['loss'] for entry in logs]}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
