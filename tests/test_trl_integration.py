"""lossgraph.integrations.trl: TRL's GRPOTrainer with a lossgraph loss, against TRL's own loss.

Tiny Llama models built from a config and saved to a temporary folder (TRL loads its reference model
from the policy's path), a word-level tokenizer built in memory: nothing is downloaded. Skipped without
`trl` (`pip install lossgraph[rl]`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from tiny_models import VOCAB, one_thread, tiny_llama, word_tokenizer  # noqa: E402, F401
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import lossgraph  # noqa: E402
from lossgraph.integrations.transformers import IntegrationError  # noqa: E402
from lossgraph.integrations.trl import LossGraphGRPOTrainer, grpo_document  # noqa: E402

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
TARGET = "t7"  # the toy reward: how often the completion says it


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    model = tiny_llama()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"t{3 + i} t{10 + i}" for i in range(8)]})


def says_the_target(completions, **_):
    return [float(completion.split().count(TARGET)) for completion in completions]


def config(tmp_path, loss_type: str, beta: float, **extra) -> GRPOConfig:
    return GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # float32: the two losses agree to rounding (bf16 autocast rounds their different graphs apart)
        loss_type=loss_type,
        beta=beta,
        use_bias_correction_kl=False,
        epsilon_high=0.28 if loss_type == "dapo" else None,
        **extra,
    )


def trainer(policy_path, args, cls=LossGraphGRPOTrainer, **kwargs) -> GRPOTrainer:
    return cls(
        model=policy_path,
        reward_funcs=says_the_target,
        args=args,
        train_dataset=prompts(),
        processing_class=word_tokenizer(),
        **kwargs,
    )


def prepared_batch(old: bool, beta: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """What TRL's _generate_and_score_completions hands _compute_loss: left-padded prompts, ragged
    completions (one fully masked), advantages per sequence, and the log-probs it computed."""
    generator = torch.Generator().manual_seed(seed)
    rows, prompt_length, completion_length = 4, 3, 6
    prompt_mask = torch.ones(rows, prompt_length, dtype=torch.long)
    prompt_mask[1, 0] = 0
    completion_mask = (torch.arange(completion_length) < torch.tensor([6, 4, 0, 2])[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(3, VOCAB, (rows, prompt_length), generator=generator) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, VOCAB, (rows, completion_length), generator=generator) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.3, -0.8]),
        "num_items_in_batch": completion_mask.sum().float(),
    }
    if old:  # off-policy: some ratios leave the clip range
        batch["old_per_token_logps"] = -4.5 + 0.8 * torch.randn(rows, completion_length, generator=generator)
    if beta:
        batch["ref_per_token_logps"] = -4.2 + 0.5 * torch.randn(rows, completion_length, generator=generator)
    return batch


DEMONSTRATION = {  # two written-out answers, prompts and padding without loss
    "input_ids": torch.tensor([[5, 9, 7, 7, 1], [6, 9, 7, 1, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    "labels": torch.tensor([[-100, -100, 7, 7, 1], [-100, -100, 7, 1, -100]]),
}


def lm_graph():
    """Cross-entropy of weight 0.1 on the demonstrations."""
    return lossgraph.compile(
        lossgraph.loads(
            f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}}}
sources: {{labels: {{type: labels}}}}
losses: {{lm: {{type: cross_entropy, heads: [next], target: labels, weight: 0.1}}}}
"""
        )
    )


def loss_and_gradient(model, compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), [parameter.grad.clone() for parameter in model.parameters()]


def assert_agrees_with_trl(policy_path, tmp_path, loss_type, beta, old, **settings):
    """lossgraph's loss, gradient and kl metric against TRL's _compute_loss on one prepared batch, with
    gradient accumulation 2 over a generation batch of 4 micro-batches."""
    args = config(tmp_path, loss_type, beta, steps_per_generation=4, gradient_accumulation_steps=2, **settings)
    if loss_type == "cispo":
        args.epsilon_high = 5.0  # cispo's bound on the ratio itself
    ours = trainer(policy_path, args)
    ours.current_gradient_accumulation_steps = 2  # the train loop sets it: the loss divides by it
    model, inputs = ours.model, prepared_batch(old, beta)
    model.train()
    loss, gradient = loss_and_gradient(model, lambda: ours._compute_loss(model, inputs))
    expected_loss, expected_gradient = loss_and_gradient(model, lambda: GRPOTrainer._compute_loss(ours, model, inputs))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
    for got, expected in zip(gradient, expected_gradient):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    logged = ours._metrics["train"]
    if beta:  # the KL metric: lossgraph's kl_estimate node, then TRL's own
        ours_kl, trls_kl = logged["kl"]
        assert ours_kl == pytest.approx(trls_kl, rel=1e-5, abs=1e-7)
    names = ["entropy"]
    if settings.get("importance_sampling_level", "token") == "token":
        names += ["cispo_clip_ratio"] if loss_type == "cispo" else ["clip_ratio/low_mean", "clip_ratio/high_mean"]
        names += [] if loss_type == "cispo" else ["clip_ratio/region_mean"]
    for name in names:  # the policy node's metrics, then TRL's own
        ours_value, trls_value = logged[name]
        assert ours_value == pytest.approx(trls_value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("loss_type", LOSS_TYPES + ("cispo",))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("old", [False, True], ids=["on_policy", "off_policy"])
def test_loss_gradient_and_kl_equal_trls_on_a_prepared_batch(policy_path, tmp_path, loss_type, beta, old):
    assert_agrees_with_trl(policy_path, tmp_path, loss_type, beta, old)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    "settings",
    [{"importance_sampling_level": "sequence"}, {"top_entropy_quantile": 0.5}],
    ids=["gspo", "entropy_quantile"],
)
def test_sequence_ratio_and_entropy_quantile_equal_trls(policy_path, tmp_path, loss_type, settings):
    assert_agrees_with_trl(policy_path, tmp_path, loss_type, 0.04, old=True, **settings)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_sided_clipping_and_a_temperature_equal_trls(policy_path, tmp_path, loss_type):
    assert_agrees_with_trl(policy_path, tmp_path, loss_type, 0.04, old=True, delta=1.5, temperature=0.7)


class RecordsTRLsLoss(LossGraphGRPOTrainer):
    """Also computes TRL's loss on every batch the lossgraph loss trains on."""

    def _compute_loss(self, model, inputs):
        with torch.no_grad():
            self.trl_losses.append(GRPOTrainer._compute_loss(self, model, inputs).item())
        loss = super()._compute_loss(model, inputs)
        self.lossgraph_losses.append(loss.item())
        return loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_training_logs_trls_loss(policy_path, tmp_path, loss_type):
    recording = trainer(policy_path, config(tmp_path, loss_type, beta=0.04), cls=RecordsTRLsLoss)
    recording.trl_losses, recording.lossgraph_losses = [], []
    recording.train()
    logged = [entry["loss"] for entry in recording.state.log_history if "loss" in entry]
    assert len(logged) == 3 and len(recording.lossgraph_losses) == 3
    assert recording.lossgraph_losses == pytest.approx(recording.trl_losses, rel=1e-5, abs=1e-7)
    assert logged == pytest.approx(recording.lossgraph_losses, rel=1e-4, abs=1e-6)
    assert all("lossgraph/pg/next" in entry for entry in recording.state.log_history if "loss" in entry)


def test_policy_gradient_exact_kl_and_demonstrations_train(policy_path, tmp_path):
    """The recipe of docs/rl.md: the policy gradient with the exact reverse KL to the reference model's
    logits instead of TRL's k3 estimate, in one graph, and an LM loss on a demonstration batch."""
    graph = lossgraph.compile(
        lossgraph.loads(
            f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1}}}}
sources:
  labels: {{type: labels}}
  rollouts: {{type: rollout, old_logprobs: true}}
  reference: {{type: teacher}}
losses:
  pg: {{type: policy_gradient, heads: [next], target: rollouts, aggregation: sequence_mean}}
  kl: {{type: reverse_kl, heads: [next], target: reference, weight: 0.04}}
"""
        )
    )
    reference = tiny_llama(seed=1).eval()
    args = config(tmp_path, "grpo", beta=0.0)
    exact = trainer(
        policy_path,
        args,
        loss_graph=graph,
        teachers={"reference": reference},
        demonstrations=[DEMONSTRATION],
        demonstration_graph=lm_graph(),
    )
    exact.train()
    logged = [entry for entry in exact.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all(entry["kl"] > 0 for entry in logged)  # two different models: a positive exact KL
    lm = [entry["lossgraph/demonstrations/lm/next"] for entry in logged]
    assert lm[-1] < lm[0]  # the demonstrations are learned


def test_settings_it_does_not_reproduce_are_refused(tmp_path):
    args = config(tmp_path, "sapo", beta=0.04)
    args.use_bias_correction_kl = True
    with pytest.raises(IntegrationError, match="loss_type='sapo'.*use_bias_correction_kl"):
        grpo_document(args, VOCAB)


def test_a_demonstration_batch_adds_its_cross_entropy(policy_path, tmp_path):
    """Policy gradient on the rollouts plus an LM loss on demonstrations, a batch of their own."""
    demonstration, lm = DEMONSTRATION, lm_graph()
    args = config(tmp_path, "grpo", 0.04, gradient_accumulation_steps=2)
    ours = trainer(policy_path, args, demonstrations=[demonstration], demonstration_graph=lm)
    ours.current_gradient_accumulation_steps = 2
    model, inputs = ours.model, prepared_batch(True, 0.04)
    model.train()

    def expected():
        logits = model(input_ids=demonstration["input_ids"], attention_mask=demonstration["attention_mask"]).logits
        lm_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), demonstration["labels"][:, 1:].flatten()
        )
        return GRPOTrainer._compute_loss(ours, model, inputs) + 0.1 * lm_loss / 2

    loss, gradient = loss_and_gradient(model, lambda: ours._compute_loss(model, inputs))
    expected_loss, expected_gradient = loss_and_gradient(model, expected)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
    for got, want in zip(gradient, expected_gradient):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert "lossgraph/demonstrations/lm/next" in ours._metrics["train"]
    with pytest.raises(IntegrationError, match="go together"):
        trainer(policy_path, args, demonstration_graph=lm)
