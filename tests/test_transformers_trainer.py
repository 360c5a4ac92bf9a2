"""LossGraphTrainer with default TrainingArguments: the columns it keeps, gradient accumulation, the logs,
evaluation metrics, and the mistakes it refuses at construction. Tiny Llama models from a config."""

from __future__ import annotations

import pytest
import torch

import lossgraph

transformers = pytest.importorskip("transformers")
import tiny_models  # noqa: E402
from tiny_models import VOCAB, one_thread  # noqa: E402, F401 (one_thread: an autouse fixture)
from transformers import TrainingArguments  # noqa: E402

from lossgraph.integrations.transformers import (  # noqa: E402
    IntegrationError,
    LossGraphTrainer,
    attach_mtp_heads,
    compute_loss,
    graph_columns,
    tokens_per_head,
    topk_teacher_columns,
)

LENGTH = 12


def tiny_llama(seed: int, hidden: int = 32):
    """One layer: the trainer tests train for several steps."""
    return tiny_models.tiny_llama(seed, hidden, layers=1)


GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}}}
sources:
  labels: {{type: labels}}
  teacher: {{type: teacher}}
  cached: {{type: topk_teacher, k: 4}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], target: labels}}
  online: {{type: forward_kl, heads: [next], target: teacher, weight: 0.5}}
  offline: {{type: forward_kl, heads: [next], target: cached, weight: 0.5}}
"""


@pytest.fixture(scope="module")
def graph():
    return lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")


@pytest.fixture(scope="module")
def data(graph):
    """16 examples with ragged labels (so that micro-batches hold different token counts) and top-k columns."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (16, LENGTH), generator=generator)
    columns = topk_teacher_columns(tiny_llama(seed=7), {"input_ids": input_ids}, graph, "cached")
    rows = []
    for i in range(16):
        labels = input_ids[i].clone()
        labels[: i % 5] = -100  # a prompt of 0 to 4 tokens takes no loss
        rows.append(
            {
                "input_ids": input_ids[i],
                "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": labels,
                "cached_indices": columns["cached_indices"][i],
                "cached_logprobs": columns["cached_logprobs"][i],
            }
        )
    return rows


def arguments(tmp_path, **changes) -> TrainingArguments:
    """Default TrainingArguments apart from the sizes of a tiny run (remove_unused_columns stays True)."""
    options = {
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(changes)
    return TrainingArguments(**options)


def trainer_for(graph, data, tmp_path, seed: int = 0, **changes) -> LossGraphTrainer:
    student = attach_mtp_heads(tiny_llama(seed), graph)
    return LossGraphTrainer(
        model=student,
        args=arguments(tmp_path, **changes),
        train_dataset=data,
        eval_dataset=data[:8],
        loss_graph=graph,
        teachers={"teacher": tiny_llama(seed=5, hidden=48)},
    )


def term_keys(entry: dict, prefix: str) -> list[str]:
    return [key for key in entry if key.startswith(prefix)]


def test_the_trainer_keeps_the_columns_the_graph_reads(graph, data, tmp_path):
    trainer = trainer_for(graph, data, tmp_path)
    assert trainer.args.remove_unused_columns
    trainer._set_signature_columns_if_needed()
    assert {"cached_indices", "cached_logprobs", "labels", "loss_mask", "position_ids"} <= set(
        trainer._signature_columns
    )
    assert set(graph_columns(graph)) <= set(trainer._signature_columns)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["cached_indices"].shape == (4, LENGTH, 4)  # what the default collator hands over
    trainer.train()  # a top-k teacher with default TrainingArguments
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["lossgraph/offline/next"] > 0 for entry in logged)


def test_gradient_accumulation_logs_terms_that_sum_to_the_loss_of_one_big_batch(graph, data, tmp_path):
    """Two micro-batches of 4 give the logs (and the update) of one batch of 8: each head is normalized by
    its target count over the whole step, and every term is summed over the micro-batches."""
    accumulated = trainer_for(graph, data, tmp_path / "ga", gradient_accumulation_steps=2)
    accumulated.train()
    big = trainer_for(graph, data, tmp_path / "big", per_device_train_batch_size=8)
    big.train()
    small = [entry for entry in accumulated.state.log_history if "loss" in entry]
    large = [entry for entry in big.state.log_history if "loss" in entry]
    assert len(small) == len(large) == 2
    for a, b in zip(small, large):
        keys = term_keys(a, "lossgraph/")
        assert sorted(keys) == [
            "lossgraph/lm/mtp2",
            "lossgraph/lm/next",
            "lossgraph/offline/next",
            "lossgraph/online/next",
        ]
        assert sum(a[key] for key in keys) == pytest.approx(a["loss"], rel=1e-5)
        for key in ["loss", *keys]:
            assert a[key] == pytest.approx(b[key], rel=2e-4), key
    # the two runs took the same optimizer steps
    for (name, p), (_, q) in zip(accumulated.model.named_parameters(), big.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_logs_average_the_terms_over_the_logging_window(graph, data, tmp_path):
    trainer = trainer_for(graph, data, tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for entry in logged:
        assert sum(entry[key] for key in term_keys(entry, "lossgraph/")) == pytest.approx(entry["loss"], rel=1e-5)


def test_evaluate_reports_every_term_and_head_metric(graph, data, tmp_path):
    trainer = trainer_for(graph, data, tmp_path)
    metrics = trainer.evaluate()
    terms = term_keys(metrics, "eval_lossgraph/")
    assert len(terms) == 4
    assert sum(metrics[key] for key in terms) == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert 0 <= metrics["eval_lossgraph_metrics/next/accuracy"] <= 1
    assert "eval_lossgraph_metrics/next/agreement/cached" in metrics
    assert "eval_lossgraph_metrics/mtp2/accuracy" in metrics
    # eval_loss is the mean of the batches' losses, each normalized by its own token count
    collate = trainer.get_eval_dataloader().collate_fn
    model, teacher = trainer.model, trainer.teachers["teacher"]
    with torch.no_grad():
        losses = [compute_loss(model, collate(data[i : i + 4]), graph, {"teacher": teacher}).loss for i in (0, 4)]
    assert metrics["eval_loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)
    # predict() goes through the same loop
    prediction = trainer.predict(data[:4])
    assert "test_lossgraph/lm/next" in prediction.metrics


def test_tokens_per_head_is_what_the_graph_divides_by(graph, data):
    batch = {key: torch.stack([row[key] for row in data[:4]]) for key in data[0]}
    student = attach_mtp_heads(tiny_llama(0), graph)
    teacher = tiny_llama(5, hidden=48)
    own = compute_loss(student, batch, graph, {"teacher": teacher})
    counts = tokens_per_head(graph, batch)
    assert {head: int(value) for head, value in counts.items()} == {
        head: int(metrics["tokens"]) for head, metrics in own.metrics.items()
    }
    given = compute_loss(student, batch, graph, {"teacher": teacher}, num_items=counts)
    torch.testing.assert_close(given.loss, own.loss)


def test_the_trainer_refuses_what_it_cannot_honour(graph, data, tmp_path):
    teacher = tiny_llama(5, hidden=48)
    with pytest.raises(IntegrationError, match="call attach_mtp_heads\\(model, graph\\) before creating the Trainer"):
        LossGraphTrainer(model=tiny_llama(0), args=arguments(tmp_path), loss_graph=graph, teachers={"teacher": teacher})
    student = attach_mtp_heads(tiny_llama(0), graph)
    with pytest.raises(IntegrationError, match="pass teachers=\\{'teacher': teacher_model\\}"):
        LossGraphTrainer(model=student, args=arguments(tmp_path), loss_graph=graph)
    with pytest.raises(IntegrationError, match="the graph does not read"):
        LossGraphTrainer(
            model=student,
            args=arguments(tmp_path),
            loss_graph=graph,
            teachers={"teacher": teacher, "cached": teacher, "techer": teacher},
        )
    with pytest.raises(IntegrationError, match="label_smoothing source"):
        LossGraphTrainer(
            model=student,
            args=arguments(tmp_path, label_smoothing_factor=0.1),
            loss_graph=graph,
            teachers={"teacher": teacher},
        )
    with pytest.raises(IntegrationError, match="lossgraph.compile"):
        LossGraphTrainer(model=student, args=arguments(tmp_path), loss_graph=lossgraph.loads(GRAPH))


def test_missing_topk_columns_say_how_to_fix_it(graph, data):
    student = attach_mtp_heads(tiny_llama(0), graph)
    batch = {key: torch.stack([row[key] for row in data[:2]]) for key in ("input_ids", "labels")}
    with pytest.raises(lossgraph.InputError, match="cached_indices and cached_logprobs \\(\\[S, 4\\] each"):
        compute_loss(student, batch, graph, {"teacher": tiny_llama(5)})


def test_a_graph_without_labels_trains_and_evaluates(tmp_path):
    """Pure distillation: no labels column, padding kept out of the loss by the attention mask."""
    text = f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}}}
sources: {{teacher: {{type: teacher}}}}
losses: {{kd: {{type: reverse_kl, heads: [next], target: teacher}}}}
"""
    graph = lossgraph.compile(lossgraph.loads(text), backend="torch")
    input_ids = torch.randint(0, VOCAB, (8, LENGTH), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(input_ids)
    attention[::2, -4:] = 0  # padding at the end of every other row
    rows = [{"input_ids": input_ids[i], "attention_mask": attention[i]} for i in range(8)]
    trainer = LossGraphTrainer(
        model=tiny_llama(0),
        args=arguments(tmp_path, gradient_accumulation_steps=2),
        train_dataset=rows,
        eval_dataset=rows,
        loss_graph=graph,
        teachers={"teacher": tiny_llama(5, hidden=48)},
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["lossgraph/kd/next"] == pytest.approx(entry["loss"], rel=1e-5) for entry in logged)
    metrics = trainer.evaluate()
    assert (
        metrics["eval_lossgraph/kd/next"] == pytest.approx(metrics["eval_loss"], rel=1e-5) and metrics["eval_loss"] > 0
    )
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    assert int(tokens_per_head(graph, batch)["next"]) == 8 * (LENGTH - 1) - 4 * 4


@pytest.mark.parametrize("normalization", ["sum", "batch"])
def test_other_normalizations_log_terms_that_sum_to_the_loss(graph, data, tmp_path, normalization):
    other = lossgraph.compile(lossgraph.loads(f"normalization: {normalization}\n" + GRAPH), backend="torch")
    accumulated = trainer_for(other, data, tmp_path / "ga", gradient_accumulation_steps=2)
    accumulated.train()
    big = trainer_for(other, data, tmp_path / "big", per_device_train_batch_size=8)
    big.train()
    for a, b in zip(*([e for e in t.state.log_history if "loss" in e] for t in (accumulated, big))):
        assert sum(a[key] for key in term_keys(a, "lossgraph/")) == pytest.approx(a["loss"], rel=1e-5)
        # sum: the micro-batches' sums add up; batch: their means are averaged (equal micro-batches)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_resume_from_checkpoint_restores_the_heads(graph, data, tmp_path):
    first = trainer_for(graph, data, tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    trained = {key: value.clone() for key, value in first.model.lossgraph_heads.state_dict().items()}
    resumed = trainer_for(graph, data, tmp_path / "run", seed=3, max_steps=2)  # other initial weights
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for key, value in resumed.model.lossgraph_heads.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)
