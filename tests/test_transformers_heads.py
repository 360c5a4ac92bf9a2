"""MTP heads on transformers models: the three styles, the model's logit post-processing, packed batches,
saving and loading, drafting. Tiny models built from configs (no downloads)."""

from __future__ import annotations

import logging

import pytest
import torch

import lossgraph

transformers = pytest.importorskip("transformers")
from tiny_models import VOCAB, one_thread, tiny_gpt2, tiny_llama  # noqa: E402, F401 (one_thread: an autouse fixture)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from lossgraph.integrations.transformers import (  # noqa: E402
    DeepSeekMTPModule,
    IntegrationError,
    MedusaHead,
    attach_mtp_heads,
    compute_loss,
    draft_tokens,
    from_pretrained,
    head_logits,
    load_mtp_heads,
    logit_processing,
    tokens_per_head,
)


def graph_text(offsets=(2,), extra_heads: str = "") -> str:
    heads = ", ".join(f"mtp{d}: {{offset: {d}}}" for d in offsets)
    names = ", ".join(["next", *(f"mtp{d}" for d in offsets)])
    return f"""
version: 1
vocab_size: {VOCAB}
heads: {{next: {{offset: 1{extra_heads}}}{", " if heads else ""}{heads}}}
sources: {{labels: {{type: labels}}}}
losses:
  lm: {{type: cross_entropy, heads: [{names}], target: labels}}
"""


def compiled(text: str):
    return lossgraph.compile(lossgraph.loads(text), backend="torch")


def ids(size: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def batch_of(size: int = 2, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    input_ids = ids(size, length, seed)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


# --------------------------------------------------------------------------------------------------
# Styles.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["linear", "medusa", "deepseek"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_every_style_starts_from_lm_head_and_trains(style, make):
    graph = compiled(graph_text((2, 3)))
    model = attach_mtp_heads(make(), graph, style=style)
    assert list(model.lossgraph_heads) == ["mtp2", "mtp3"]
    assert model.config.lossgraph_heads == {"style": style, "heads": {"mtp2": 2, "mtp3": 3}, "medusa_layers": 1}
    batch = batch_of()
    logits = head_logits(model, graph, batch["input_ids"])
    reference = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(logits["next"], reference)
    if style != "deepseek":  # a copy of lm_head (medusa: behind residual blocks that start as the identity)
        torch.testing.assert_close(logits["mtp2"], reference)
    out = compute_loss(model, batch, graph)
    out.loss.backward()
    for name, parameter in model.lossgraph_heads.named_parameters():
        assert parameter.grad is not None, name
    trained = [p for p in model.lossgraph_heads.parameters() if p.grad.abs().sum() > 0]
    assert trained, "no head parameter gets a gradient"


def test_medusa_and_deepseek_modules_have_their_shapes():
    graph = compiled(graph_text((2, 3)))
    medusa = attach_mtp_heads(tiny_llama(), graph, style="medusa", medusa_layers=2).lossgraph_heads
    assert isinstance(medusa["mtp2"], MedusaHead) and len(medusa["mtp2"].blocks) == 2
    deepseek = attach_mtp_heads(tiny_llama(hidden=48), graph, style="deepseek")
    module = deepseek.lossgraph_heads["mtp3"]
    assert isinstance(module, DeepSeekMTPModule)
    assert module.proj.weight.shape == (48, 96) and module.block.gate.weight.shape == (96, 48)
    # deepseek heads predict through lm_head itself: no vocab-sized matrix of their own
    assert all(VOCAB not in p.shape for p in deepseek.lossgraph_heads.parameters())


def test_deepseek_depth_reads_the_next_token():
    """Depth 1 at position s sees token s + 1: changing it changes mtp2 at s and at no earlier position."""
    graph = compiled(graph_text((2,)))
    model = attach_mtp_heads(tiny_llama(), graph, style="deepseek")
    with torch.no_grad():  # leave the identity start, so that the block and the embedding matter
        for parameter in model.lossgraph_heads.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    base = ids(1, 10)
    changed = base.clone()
    changed[0, 6] = (changed[0, 6] + 1) % VOCAB
    a = head_logits(model, graph, base)["mtp2"]
    b = head_logits(model, graph, changed)["mtp2"]
    differs = (a - b).abs().amax(-1)[0] > 1e-6
    assert differs.tolist() == [False] * 5 + [True] * 5  # position 5 reads token 6 through the embedding


def test_styles_and_offsets_are_checked():
    graph = compiled(graph_text((2, 4)))
    with pytest.raises(IntegrationError, match="offsets must be 2, 3, ..., 3, got \\[2, 4\\]"):
        attach_mtp_heads(tiny_llama(), graph, style="deepseek")
    with pytest.raises(IntegrationError, match="unknown MTP head style 'eagle'"):
        attach_mtp_heads(tiny_llama(), graph, style="eagle")
    model = attach_mtp_heads(tiny_llama(), compiled(graph_text((2,))), style="medusa")
    with pytest.raises(IntegrationError, match="style='medusa'"):
        attach_mtp_heads(model, graph, style="linear")
    head = model.lossgraph_heads["mtp2"]
    attach_mtp_heads(model, graph, style="medusa")  # adds mtp4, keeps the trained mtp2
    assert model.lossgraph_heads["mtp2"] is head and model.config.lossgraph_heads["heads"] == {"mtp2": 2, "mtp4": 4}
    shifted = compiled(graph_text((3,)).replace("mtp3", "mtp2"))
    with pytest.raises(IntegrationError, match="predicts offset 2, the graph's offset 3"):
        attach_mtp_heads(model, shifted, style="medusa")
    with pytest.raises(IntegrationError, match="before wrapping"):
        attach_mtp_heads(torch.nn.Linear(2, 2), graph)


def test_a_forward_outside_lossgraph_is_unchanged():
    graph = compiled(graph_text((2,)))
    model = attach_mtp_heads(tiny_llama(), graph, style="medusa")
    calls = []
    model.lossgraph_heads.register_forward_hook(lambda *_: calls.append(1))
    model(input_ids=ids())
    generated = model.generate(ids(1, 4), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    assert not calls  # the heads only run when lossgraph asks
    head_logits(model, graph, ids())
    assert calls == [1]


# --------------------------------------------------------------------------------------------------
# The model's logit post-processing.
# --------------------------------------------------------------------------------------------------


def tiny_gemma2(softcap: float | None) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=softcap,
        tie_word_embeddings=False,
    )
    return Gemma2ForCausalLM(config)


def tiny_granite(scaling: float) -> GraniteForCausalLM:
    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        logits_scaling=scaling,
        tie_word_embeddings=False,
    )
    return GraniteForCausalLM(config)


@pytest.mark.parametrize(
    ("make", "expected"),
    [(lambda: tiny_gemma2(0.5), (1.0, 0.5)), (lambda: tiny_granite(4.0), (0.25, None))],
    ids=["gemma2-softcap", "granite-scaling"],
)
def test_mtp_heads_see_the_logits_the_models_loss_sees(make, expected):
    model = make()
    processing = logit_processing(model.config)
    assert (processing.scale, processing.softcap) == expected
    graph = compiled(graph_text((2,)))
    attach_mtp_heads(model, graph)
    input_ids = ids()
    logits = head_logits(model, graph, input_ids)
    reference = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits["next"], reference)
    # the MTP head is a copy of lm_head: after the model's post-processing it predicts what the model does
    torch.testing.assert_close(logits["mtp2"], reference)
    hidden = model.model(input_ids=input_ids).last_hidden_state
    assert not torch.allclose(model.lossgraph_heads["mtp2"](hidden), reference, atol=1e-4)


@pytest.mark.skipif(
    "softcap" not in lossgraph.spec.nodes.Head.model_fields, reason="the heads have no softcap option yet"
)
def test_a_head_softcap_must_match_the_models():
    model = tiny_gemma2(0.5)
    batch = batch_of()
    plain = compiled(graph_text((2,)))
    attach_mtp_heads(model, plain)
    expected = compute_loss(model, batch, plain)
    capped = compiled(
        graph_text((2,), extra_heads=", softcap: 0.5").replace("mtp2: {offset: 2}", "mtp2: {offset: 2, softcap: 0.5}")
    )
    logits = head_logits(model, capped, batch["input_ids"])  # uncapped: lossgraph caps them itself
    reference = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(logits["next"], reference, atol=1e-4)
    torch.testing.assert_close(0.5 * torch.tanh(logits["next"] / 0.5), reference)
    got = compute_loss(model, batch, capped)
    for key, value in expected.values.items():
        torch.testing.assert_close(got.values[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(IntegrationError, match="set softcap: 0.5"):
        compute_loss(model, batch, compiled(graph_text((2,), extra_heads=", softcap: 30.0")))
    with pytest.raises(IntegrationError, match="applies no final_logit_softcapping"):
        compute_loss(attach_mtp_heads(tiny_llama(), plain), batch, capped)


# --------------------------------------------------------------------------------------------------
# Packed batches, loss_mask, padding.
# --------------------------------------------------------------------------------------------------


def test_packed_batches_mask_document_boundaries():
    graph = compiled(graph_text((2,)))
    model = attach_mtp_heads(tiny_llama(), graph)
    input_ids = ids(1, 12)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])  # two documents: 5 and 7 tokens
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": positions}
    # next: 11 positions with a label, one of them predicts across the boundary; mtp2: 10, two cross it
    assert {k: int(v) for k, v in tokens_per_head(graph, batch).items()} == {"next": 10, "mtp2": 8}
    out = compute_loss(model, batch, graph)
    assert {head: int(m["tokens"]) for head, m in out.metrics.items()} == {"next": 10, "mtp2": 8}
    explicit = {**batch, "document_ids": torch.tensor([[0] * 5 + [1] * 7])}
    del explicit["position_ids"]
    assert {k: int(v) for k, v in tokens_per_head(graph, explicit).items()} == {"next": 10, "mtp2": 8}


def test_loss_mask_and_padding_are_aligned_with_input_ids():
    graph = compiled(graph_text((2,)))
    model = attach_mtp_heads(tiny_llama(), graph)
    batch = batch_of(2, 8)
    batch["loss_mask"] = torch.ones(2, 8, dtype=torch.bool)
    batch["loss_mask"][:, :3] = False  # a prompt of 3 tokens: they are not targets
    batch["attention_mask"][1, 6:] = 0  # right padding of the second row
    counts = tokens_per_head(graph, batch)
    # targets are tokens 3..7 (row 0) and 3..5 (row 1); next predicts them from s - 1, mtp2 from s - 2
    assert {k: int(v) for k, v in counts.items()} == {"next": 5 + 3, "mtp2": 5 + 3}
    out = compute_loss(model, batch, graph)
    assert int(out.metrics["next"]["tokens"]) == 8
    weighted = {**batch, "loss_mask": batch["loss_mask"].float() * 0.5}
    assert float(tokens_per_head(graph, weighted)["next"]) == 4.0


# --------------------------------------------------------------------------------------------------
# Saving, loading, drafting.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["linear", "medusa", "deepseek"])
def test_save_and_from_pretrained_keep_the_trained_heads(style, tmp_path, caplog):
    graph = compiled(graph_text((2, 3)))
    model = attach_mtp_heads(tiny_llama(), graph, style=style)
    with torch.no_grad():  # "trained": away from the initialization
        for parameter in model.lossgraph_heads.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    batch = batch_of()
    before = {key: value.detach() for key, value in head_logits(model, graph, batch["input_ids"]).items()}
    model.save_pretrained(tmp_path)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # what transformers alone does
    assert not hasattr(plain, "lossgraph_heads")
    load_mtp_heads(plain, tmp_path)
    torch.testing.assert_close(head_logits(plain, graph, batch["input_ids"])["mtp3"], before["mtp3"])

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = from_pretrained(tmp_path)
    assert "UNEXPECTED" not in caplog.text and "lossgraph_heads" not in caplog.text, caplog.text
    after = head_logits(loaded, graph, batch["input_ids"])
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, msg=name)
    out = compute_loss(loaded, batch, graph)  # and it trains on
    out.loss.backward()
    assert all(p.grad is not None for p in loaded.lossgraph_heads.parameters())


def test_from_pretrained_of_a_plain_checkpoint_and_load_errors(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    model = from_pretrained(tmp_path / "plain", dtype=torch.float64)
    assert not hasattr(model, "lossgraph_heads") and model.dtype == torch.float64
    with pytest.raises(IntegrationError, match="records no lossgraph heads"):
        load_mtp_heads(model, tmp_path / "plain")
    graph = compiled(graph_text((2,)))
    attach_mtp_heads(tiny_llama(), graph).save_pretrained(tmp_path / "heads")
    loaded = from_pretrained(tmp_path / "heads", dtype=torch.float64)
    assert loaded.lossgraph_heads["mtp2"].weight.dtype == torch.float64
    with pytest.raises(IntegrationError, match="already has lossgraph heads"):
        load_mtp_heads(loaded, tmp_path / "heads")


@pytest.mark.parametrize("style", ["medusa", "deepseek"])
def test_draft_tokens_are_what_the_heads_predict(style):
    graph = compiled(graph_text((2, 3)))
    model = attach_mtp_heads(tiny_llama(), graph, style=style)
    with torch.no_grad():
        for parameter in model.lossgraph_heads.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    prompt = ids(2, 7)
    draft = draft_tokens(model, prompt)
    assert draft.shape == (2, 3)
    with torch.no_grad():
        assert torch.equal(draft[:, 0], model(input_ids=prompt).logits[:, -1].argmax(-1))
        if style == "deepseek":
            # depth k at the last position reads the tokens drafted before it: the training forward over
            # prompt + those tokens gives the same prediction at the prompt's last position
            extended = torch.cat([prompt, draft[:, :2]], 1)
            logits = head_logits(model, graph, extended)
            assert torch.equal(draft[:, 1], logits["mtp2"][:, 6].argmax(-1))
            assert torch.equal(draft[:, 2], logits["mtp3"][:, 6].argmax(-1))
        else:
            logits = head_logits(model, graph, prompt)
            assert torch.equal(draft[:, 1], logits["mtp2"][:, -1].argmax(-1))
            assert torch.equal(draft[:, 2], logits["mtp3"][:, -1].argmax(-1))
    with pytest.raises(IntegrationError, match="no MTP heads"):
        draft_tokens(tiny_llama(), prompt)


def test_peft_lora_trains_and_saves_the_heads(tmp_path):
    peft = pytest.importorskip("peft")
    graph = compiled(graph_text((2,)))
    model = attach_mtp_heads(tiny_llama(), graph, style="medusa")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lossgraph_heads"])
    wrapped = peft.get_peft_model(model, config)
    batch = batch_of()
    out = compute_loss(wrapped, batch, graph)
    out.loss.backward()
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("lora_" in name for name in trainable)
    assert any("lossgraph_heads.modules_to_save" in name for name in trainable)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lossgraph_heads.modules_to_save" in name:
                parameter.add_(0.1)
    expected = head_logits(wrapped, graph, batch["input_ids"])["mtp2"].detach()
    wrapped.save_pretrained(tmp_path)
    base = attach_mtp_heads(tiny_llama(), graph, style="medusa")  # same base weights (seed), fresh heads
    restored = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(head_logits(restored, graph, batch["input_ids"])["mtp2"], expected)


def test_a_replaced_lm_head_is_hooked_again():
    graph = compiled(graph_text((2,)))
    model = attach_mtp_heads(tiny_llama(), graph)
    replacement = torch.nn.Linear(32, VOCAB, bias=False)
    with torch.no_grad():
        replacement.weight.copy_(model.lm_head.weight * 2)
    model.set_output_embeddings(replacement)  # as resize_token_embeddings does
    logits = head_logits(model, graph, ids())
    torch.testing.assert_close(logits["next"], model(input_ids=ids()).logits)


def test_peft_lora_on_lm_head_keeps_the_heads_consistent():
    peft = pytest.importorskip("peft")
    graph = compiled(graph_text((2,)))
    model = attach_mtp_heads(tiny_llama(), graph)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    calls = []
    wrapped.base_model.model.lossgraph_heads.register_forward_hook(lambda *_: calls.append(1))
    logits = head_logits(wrapped, graph, ids())  # the check against the model's logits sees LoRA's delta
    assert calls == [1]  # the heads ran once, from the outer lm_head
    torch.testing.assert_close(logits["next"], wrapped(input_ids=ids()).logits)


def test_hidden_input_heads_are_refused():
    graph = compiled(graph_text((), extra_heads=", input: hidden"))
    with pytest.raises(IntegrationError, match="declare `input: logits`"):
        head_logits(tiny_llama(), graph, ids())
