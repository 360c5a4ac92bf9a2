"""lossgraph.integrations.trl.generalized_jsd_loss (lossgraph's `jsd`) equals TRL's
`GKDTrainer.generalized_jsd_loss`, value and gradient, on TRL's own test grid (trl's
tests/experimental/test_gkd_trainer.py, TestGeneralizedJSDLoss: batch 2 x 3 positions x 5 tokens, beta 0,
0.1, 0.5 and 1, temperatures 1 and 2, the reductions, the two-token edge case, uniform and identical
logits), with and without labels. Skipped without `trl`."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.gkd import GKDTrainer  # noqa: E402

from lossgraph.integrations.mtp_heads import IntegrationError  # noqa: E402
from lossgraph.integrations.trl import GKD_REDUCTIONS, generalized_jsd_loss  # noqa: E402

BATCH, POSITIONS, VOCAB = 2, 3, 5
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (1.0, 2.0)


def logits(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, POSITIONS, VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LABELS = torch.tensor([[4, -100, 1], [-100, 2, 3]])
CASES = {
    "random": (logits(0), logits(1)),
    "swapped": (logits(1), logits(0)),
    "identical": (logits(2), logits(2)),
    "uniform": (torch.ones(1, 1, VOCAB, dtype=torch.float64), torch.ones(1, 1, VOCAB, dtype=torch.float64)),
    "two_tokens": (  # TRL's edge case: [0.1, 0.9] against [0.9, 0.1]
        torch.tensor([[[0.1, 0.9]]], dtype=torch.float64).log(),
        torch.tensor([[[0.9, 0.1]]], dtype=torch.float64).log(),
    ),
}


def value_and_gradient(loss_function, student, teacher, **kwargs):
    student = student.clone().requires_grad_(True)
    loss = loss_function(student, teacher, **kwargs)
    (gradient,) = torch.autograd.grad(loss, student)
    return loss.detach(), gradient


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", GKD_REDUCTIONS)
@pytest.mark.parametrize("labelled", [False, True], ids=["no_labels", "labels"])
def test_generalized_jsd_equals_trls(case, beta, temperature, reduction, labelled):
    student, teacher = CASES[case]
    labels = LABELS if labelled and student.shape[:2] == LABELS.shape else None
    kwargs = {"labels": labels, "beta": beta, "temperature": temperature, "reduction": reduction}
    value, gradient = value_and_gradient(generalized_jsd_loss, student, teacher, **kwargs)
    expected_value, expected_gradient = value_and_gradient(GKDTrainer.generalized_jsd_loss, student, teacher, **kwargs)
    # lossgraph computes in float32 whatever the logits' dtype
    torch.testing.assert_close(value, expected_value, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(gradient, expected_gradient, rtol=2e-5, atol=1e-7)


def test_num_items_in_batch_divides_the_sum():
    student, teacher = CASES["random"]
    kwargs = {"labels": LABELS, "beta": 0.5, "num_items_in_batch": torch.tensor(7.0)}
    value = generalized_jsd_loss(student, teacher, **kwargs)
    torch.testing.assert_close(value, GKDTrainer.generalized_jsd_loss(student, teacher, **kwargs), rtol=2e-6, atol=0)


def test_per_vocab_entry_values_are_refused():
    student, teacher = CASES["random"]
    with pytest.raises(IntegrationError, match="per vocab entry"):
        generalized_jsd_loss(student, teacher, reduction="none")


class RecordsTRLsJSD(GKDTrainer):
    """GKDTrainer with lossgraph's generalized JSD, computing TRL's own on every batch as well."""

    pairs: list[tuple[float, float]] = []

    @staticmethod
    def generalized_jsd_loss(**arguments):
        loss = generalized_jsd_loss(**arguments)
        with torch.no_grad():
            RecordsTRLsJSD.pairs.append((loss.item(), GKDTrainer.generalized_jsd_loss(**arguments).item()))
        return loss


def test_on_policy_distillation_in_gkdtrainer(tmp_path):
    """GKD with lambda = 1 (the student's own samples) and beta = 1 (reverse KL): on-policy distillation,
    with lossgraph's loss in TRL's trainer, on tiny config-built models."""
    from datasets import Dataset
    from tiny_models import one_thread, tiny_llama, word_tokenizer  # noqa: F401
    from trl.experimental.gkd import GKDConfig

    conversations = [
        [{"role": "user", "content": f"t{3 + i} t{4 + i}"}, {"role": "assistant", "content": f"t{7 + i} t{8 + i} t1"}]
        for i in range(8)
    ]
    student, teacher = tiny_llama(0), tiny_llama(1)
    for model in (student, teacher):
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    args = GKDConfig(
        output_dir=str(tmp_path),
        lmbda=1.0,
        beta=1.0,
        max_new_tokens=4,
        max_length=32,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    RecordsTRLsJSD.pairs = []
    trainer = RecordsTRLsJSD(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"messages": conversations}),
        processing_class=word_tokenizer(),
    )
    trainer.train()
    assert len(RecordsTRLsJSD.pairs) == 3
    ours, trls = zip(*RecordsTRLsJSD.pairs)
    assert ours == pytest.approx(trls, rel=1e-5)
    assert all(value > 0 for value in ours)  # two different models
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(ours, rel=1e-4)
