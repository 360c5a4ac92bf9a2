"""lossgraph.integrations.transformers on tiny Llama models built from a config (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import lossgraph

transformers = pytest.importorskip("transformers")
from tiny_models import VOCAB, one_thread, tiny_llama  # noqa: E402, F401 (one_thread: an autouse fixture)
from transformers import TrainingArguments  # noqa: E402

from lossgraph.integrations.transformers import (  # noqa: E402
    LossGraphTrainer,
    attach_mtp_heads,
    compute_loss,
    head_logits,
    tokens_per_head,
)

GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}, mtp2: {{offset: 2}}}}
sources: {{labels: {{type: labels}}, teacher: {{type: teacher}}}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], target: labels}}
  kd: {{type: forward_kl, heads: [next], target: teacher, weight: 0.5, temperature: 2.0}}
"""


@pytest.fixture
def graph():
    return lossgraph.compile(lossgraph.loads(GRAPH), backend="torch")


def batch_of(size: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (size, length), generator=generator)
    labels = input_ids.clone()
    labels[0, -3:] = -100  # padding at the end of the first sequence
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_attach_mtp_heads_copies_lm_head_once(graph):
    model = tiny_llama(0)
    attach_mtp_heads(model, graph)
    heads = model.lossgraph_heads
    assert list(heads) == ["mtp2"]
    assert torch.equal(heads["mtp2"].weight, model.get_output_embeddings().weight)
    assert heads["mtp2"].weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    attach_mtp_heads(model, graph)  # idempotent: the trained head is kept
    assert model.lossgraph_heads["mtp2"] is heads["mtp2"]
    assert any(name.startswith("lossgraph_heads.mtp2") for name, _ in model.named_parameters())


def test_attach_mtp_heads_checks_vocab_and_unknown_logit_post_processing(graph):
    other = lossgraph.compile(lossgraph.loads(GRAPH.replace(f"vocab_size: {VOCAB}", "vocab_size: 65")))
    with pytest.raises(lossgraph.LossGraphError, match="vocab_size: 64"):
        attach_mtp_heads(tiny_llama(0), other)
    # a config that claims a scaling its model does not apply: the MTP heads' logits would not match lm_head's
    scaled = tiny_llama(0)
    scaled.config.logits_scaling = 4.0  # Granite's; Llama ignores it
    attach_mtp_heads(scaled, graph)
    with pytest.raises(lossgraph.LossGraphError, match="post-processes its logits in a way lossgraph does not know"):
        head_logits(scaled, graph, batch_of()["input_ids"])


def test_head_logits_needs_attached_heads(graph):
    with pytest.raises(lossgraph.LossGraphError, match="attach_mtp_heads"):
        head_logits(tiny_llama(0), graph, batch_of()["input_ids"])


def test_compute_loss_equals_the_reference_on_the_same_logits(graph):
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48)
    attach_mtp_heads(student, graph)
    with torch.no_grad():  # make the MTP head differ from lm_head
        student.lossgraph_heads["mtp2"].weight.mul_(0.5)
    batch = batch_of()
    out = compute_loss(student, batch, graph, teachers={"teacher": teacher}, step=3)

    logits = student(input_ids=batch["input_ids"]).logits.double()
    mtp2 = student.lossgraph_heads["mtp2"](student.base_model(input_ids=batch["input_ids"]).last_hidden_state)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits.double()
    labels = batch["labels"]
    next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    mtp2_labels = torch.cat([labels[:, 2:], torch.full_like(labels[:, :2], -100)], 1)
    ce_next = F.cross_entropy(logits.reshape(-1, VOCAB), next_labels.reshape(-1))
    ce_mtp2 = F.cross_entropy(mtp2.double().reshape(-1, VOCAB), mtp2_labels.reshape(-1))
    mask = next_labels.reshape(-1) != -100
    kl = F.kl_div(
        torch.log_softmax(logits.reshape(-1, VOCAB) / 2, -1),
        torch.log_softmax(teacher_logits.reshape(-1, VOCAB) / 2, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    kd = (kl * mask).sum() / mask.sum()
    assert_close(out.values["lm/next"], ce_next, dtype=torch.float32, what="lm/next")
    assert_close(out.values["lm/mtp2"], ce_mtp2, dtype=torch.float32, what="lm/mtp2")
    assert_close(out.values["kd/next"], kd, dtype=torch.float32, what="kd/next")
    assert_close(out.loss, ce_next + ce_mtp2 + 0.5 * kd, dtype=torch.float32, what="loss")


def test_already_shifted_labels_in_a_batch_are_refused(graph):
    """The integration passes input_ids along, so the core's value checks see labels that were shifted
    by the data pipeline already (transformers' labels are not), before the teacher runs."""
    student = attach_mtp_heads(tiny_llama(0), graph)
    batch = batch_of()
    shifted = torch.cat([batch["input_ids"][:, 1:], torch.full_like(batch["input_ids"][:, :1], -100)], 1)
    wrong = {**batch, "labels": shifted}

    def teacher(batch):
        raise AssertionError("the teacher ran before the labels were checked")

    with pytest.raises(lossgraph.InputError, match="labels look already shifted"):
        compute_loss(student, wrong, graph, teachers={"teacher": teacher})
    with pytest.raises(lossgraph.InputError, match="labels look already shifted"):
        tokens_per_head(graph, wrong)


def test_topk_teacher_comes_from_the_batch():
    spec = lossgraph.loads(
        GRAPH.replace("teacher: {type: teacher}", "cached: {type: topk_teacher, k: 4}").replace(
            "target: teacher", "target: cached"
        )
    )
    graph = lossgraph.compile(spec, backend="torch")
    student = attach_mtp_heads(tiny_llama(0), graph)
    batch = batch_of()
    with pytest.raises(lossgraph.InputError, match="cached_indices"):
        compute_loss(student, batch, graph)
    scores = torch.rand(*batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(3))
    top = torch.log_softmax(scores * 4, -1).topk(4, dim=-1)
    batch.update(cached_indices=top.indices, cached_logprobs=top.values)
    out = compute_loss(student, batch, graph)
    assert torch.isfinite(out.values["kd/next"]) and out.values["kd/next"] > 0


def test_trainer_trains_and_logs_every_term(graph, tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48)
    attach_mtp_heads(student, graph)
    rows = [(torch.arange(16) * (i % 5 + 1)) % VOCAB for i in range(48)]
    data = [{"input_ids": row, "labels": row} for row in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=24,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=4,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = LossGraphTrainer(
        model=student, args=args, train_dataset=data, loss_graph=graph, teachers={"teacher": teacher}
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) >= 3
    assert logged[-1]["loss"] < 0.9 * logged[0]["loss"], [entry["loss"] for entry in logged]
    assert {"lossgraph/lm/next", "lossgraph/lm/mtp2", "lossgraph/kd/next"} <= set(logged[-1])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_trainer_evaluate_reports_the_graph_loss(graph, tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48)
    attach_mtp_heads(student, graph)
    batch = batch_of(8, 12)
    data = [{key: value[i] for key, value in batch.items()} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to=[], disable_tqdm=True
    )
    trainer = LossGraphTrainer(
        model=student, args=args, eval_dataset=data, loss_graph=graph, teachers={"teacher": teacher}
    )
    metrics = trainer.evaluate()
    with torch.no_grad():
        expected = [compute_loss(student, batch_of(8, 12), graph, {"teacher": teacher}).loss]
    assert metrics["eval_loss"] == pytest.approx(float(expected[0]), rel=0.05)  # mean of per-batch losses
