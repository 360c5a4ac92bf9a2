"""Multi-token-prediction heads for any Hugging Face `*ForCausalLM`, and the hooks that read them.

A graph head with offset 1 is the model's own output head (`lm_head`). Every other head of the graph
gets a module in `model.lossgraph_heads` (an `MTPHeads`), in one of three shapes (`style`):

- `linear`: a `torch.nn.Linear` on the trunk's last hidden state, initialized as a copy of `lm_head`.
  The simplest head, and a weak one: every head sees the same hidden state and differs only by its
  output matrix.
- `medusa`: Medusa's head (Cai et al., 2024): `medusa_layers` residual blocks `h + SiLU(W h + b)`
  (W and b start at zero), then its own copy of `lm_head`.
- `deepseek`: DeepSeek-V3's sequential MTP modules: depth k (the head of offset k + 1) combines the
  previous depth's hidden state with the embedding of token t + k (`proj([norm(emb); norm(h)])`),
  runs one causal transformer block (rotary attention and a SwiGLU MLP, sized from the model's
  config), and predicts through `lm_head` itself (shared, as in DeepSeek-V3, like the embedding):
  the depth calls the `lm_head` module, so a wrapper that gathers its weight around its forward (an
  FSDP2 unit of its own, DeepSpeed ZeRO-3) gathers it for each depth, in the forward and the backward.
  The projection starts as the identity on the hidden state and the block's output projections at
  zero, so each depth starts close to the next-token head. Offsets must be 2, 3, ..., D + 1.

The heads run inside the model's own forward (hooks on the model and on `lm_head`), so DDP, FSDP and
DeepSpeed see their parameters used in the wrapped forward. They run only when lossgraph asks for them
(`compute_loss`, `head_logits`, `draft_tokens`); `model.generate` and a plain `model(...)` call are
unchanged. Every head's logits go through the model's own post-processing of its logits (Granite's
`logits_scaling`, Cohere's `logit_scale`, Falcon-H1's `lm_head_multiplier`, Gemma's
`final_logit_softcapping`), checked once against the model's logits.

The layout (style, heads, offsets) is recorded in `model.config.lossgraph_heads`, so it is saved in
`config.json`; the weights are saved in the model's own checkpoint (`lossgraph_heads.*`).
`from_pretrained` rebuilds the heads from the config and loads their weights.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..errors import LossGraphError
from ..runtime.compiled import CompiledGraph

HEADS_ATTRIBUTE = "lossgraph_heads"  # model.lossgraph_heads (the modules) and model.config.lossgraph_heads (layout)
STYLES = ("linear", "medusa", "deepseek")
_TAP = "_lossgraph_tap"


class IntegrationError(LossGraphError):
    """A model, its heads or the Trainer's arguments do not fit the loss graph; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------
# The model's own post-processing of its logits.
# --------------------------------------------------------------------------------------------------

# (config attribute, how the model applies it, its neutral value)
_SCALES = (
    ("logits_scaling", "divide", 1.0),  # Granite: logits / logits_scaling
    ("logit_scale", "multiply", 1.0),  # Cohere: logits * logit_scale
    ("lm_head_multiplier", "multiply", 1.0),  # Falcon-H1: logits * lm_head_multiplier
)


@dataclass(frozen=True)
class LogitProcessing:
    """What a model does to `lm_head(hidden)` before its loss: `softcap * tanh(scale * z / softcap)`."""

    scale: float = 1.0
    softcap: float | None = None
    described: str = "none"

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.scale == 1.0 else logits * self.scale

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = self.scaled(logits)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


def logit_processing(config: Any) -> LogitProcessing:
    """The post-processing a transformers model applies to its logits, read from its config."""
    config = getattr(config, "get_text_config", lambda: config)()
    scale, described = 1.0, []
    for name, how, neutral in _SCALES:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != neutral:
            if value == 0 or not math.isfinite(value):
                raise IntegrationError(f"{type(config).__name__}.{name} is {value}; expected a finite nonzero number")
            scale = scale / value if how == "divide" else scale * value
            described.append(f"{name}={value}")
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        described.append(f"final_logit_softcapping={softcap}")
    return LogitProcessing(float(scale), None if softcap is None else float(softcap), ", ".join(described) or "none")


# --------------------------------------------------------------------------------------------------
# Head modules.
# --------------------------------------------------------------------------------------------------


def _copy_linear(output: torch.nn.Module) -> torch.nn.Linear:
    vocab, hidden = output.weight.shape
    bias = getattr(output, "bias", None)
    layer = torch.nn.Linear(
        hidden, vocab, bias=bias is not None, device=output.weight.device, dtype=output.weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(output.weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class MedusaResBlock(torch.nn.Module):
    """`h + SiLU(W h + b)`, W and b zero at the start (the block starts as the identity)."""

    def __init__(self, hidden: int, *, device=None, dtype=None):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden, device=device, dtype=dtype)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + F.silu(self.linear(hidden))


class MedusaHead(torch.nn.Module):
    """Medusa's head: residual blocks on the last hidden state, then a copy of `lm_head`."""

    def __init__(self, output: torch.nn.Module, layers: int):
        super().__init__()
        hidden = output.weight.shape[1]
        options = {"device": output.weight.device, "dtype": output.weight.dtype}
        self.blocks = torch.nn.Sequential(*(MedusaResBlock(hidden, **options) for _ in range(layers)))
        self.out = _copy_linear(output)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(hidden))


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of x [B, heads, S, d] at positions [B, S] (the rotate-half form)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class MTPBlock(torch.nn.Module):
    """One pre-norm causal transformer block: rotary self-attention, then a SwiGLU MLP.

    The output projections (`o`, `down`) start at zero, so the block starts as the identity.
    """

    def __init__(
        self, hidden: int, heads: int, intermediate: int, eps: float, theta: float, *, device=None, dtype=None
    ):
        super().__init__()
        if hidden % heads or (hidden // heads) % 2:
            raise IntegrationError(
                f"an MTP block needs hidden_size divisible by num_attention_heads into an even head size; "
                f"got hidden_size {hidden} and {heads} heads"
            )
        options = {"device": device, "dtype": dtype}
        self.heads, self.theta = heads, theta
        self.attention_norm = torch.nn.RMSNorm(hidden, eps=eps, **options)
        self.q = torch.nn.Linear(hidden, hidden, bias=False, **options)
        self.k = torch.nn.Linear(hidden, hidden, bias=False, **options)
        self.v = torch.nn.Linear(hidden, hidden, bias=False, **options)
        self.o = torch.nn.Linear(hidden, hidden, bias=False, **options)
        self.mlp_norm = torch.nn.RMSNorm(hidden, eps=eps, **options)
        self.gate = torch.nn.Linear(hidden, intermediate, bias=False, **options)
        self.up = torch.nn.Linear(hidden, intermediate, bias=False, **options)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False, **options)
        torch.nn.init.zeros_(self.o.weight)
        torch.nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = x.shape
        h = self.attention_norm(x)
        q, k, v = (proj(h).view(batch, length, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = _rotate(q, positions, self.theta), _rotate(k, positions, self.theta)
        if mask is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(attended.transpose(1, 2).reshape(batch, length, hidden))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class DeepSeekMTPModule(torch.nn.Module):
    """One DeepSeek-V3 MTP depth: h_k = block(proj([norm(emb(t_{i+k})); norm(h_{k-1})])).

    Its logits are `lm_head(out_norm(h_k))`, a call of the model's shared output head.
    """

    def __init__(self, config: Any, output: torch.nn.Module):
        super().__init__()
        text = getattr(config, "get_text_config", lambda: config)()
        hidden = output.weight.shape[1]
        heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
        if not heads:
            raise IntegrationError(f"{type(config).__name__} names no num_attention_heads to size the MTP block with")
        intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
        eps = getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_epsilon", None) or 1e-6
        theta = getattr(text, "rope_theta", None) or (getattr(text, "rope_parameters", None) or {}).get("rope_theta")
        options = {"device": output.weight.device, "dtype": output.weight.dtype}
        self.embed_norm = torch.nn.RMSNorm(hidden, eps=eps, **options)
        self.hidden_norm = torch.nn.RMSNorm(hidden, eps=eps, **options)
        self.proj = torch.nn.Linear(2 * hidden, hidden, bias=False, **options)
        with torch.no_grad():  # [0 | I]: the depth starts from the previous hidden state alone
            self.proj.weight.zero_()
            self.proj.weight[:, hidden:].copy_(torch.eye(hidden, **options))
        self.block = MTPBlock(hidden, int(heads), int(intermediate), float(eps), float(theta or 10000.0), **options)
        self.out_norm = torch.nn.RMSNorm(hidden, eps=eps, **options)

    def forward(
        self, previous: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        joined = torch.cat([self.embed_norm(embeds), self.hidden_norm(previous.to(embeds.dtype))], -1)
        return self.block(self.proj(joined), positions, mask)


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed sequences: a new document starts wherever position_ids do not count up by one. [B, S] -> [B, S]."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(1)


def _attention_mask(
    attention_mask: torch.Tensor | None, documents: torch.Tensor | None, length: int, device: torch.device
) -> torch.Tensor | None:
    """[B, 1, S, S] boolean mask: causal, within a document, valid keys; None when plain causal suffices."""
    if documents is None and (attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all())):
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal[None]
    if documents is not None:
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)  # never an empty row
    return allowed[:, None]


class MTPHeads(torch.nn.Module):
    """`model.lossgraph_heads`: one module per MTP head of the graph, by head name, all of one style.

    Called with the trunk's last hidden state (what `lm_head` reads), it returns each head's logits
    before the model's post-processing. `offsets` maps each head to the token it predicts. It reads
    like a dict of modules (`heads["mtp2"]`, `list(heads)`), and is a plain Module so that PEFT's
    `modules_to_save=["lossgraph_heads"]` can train it.
    """

    def __getitem__(self, name: str) -> torch.nn.Module:
        return self._modules[name]

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __init__(self, style: str, medusa_layers: int = 1):
        super().__init__()
        if style not in STYLES:
            raise IntegrationError(f"unknown MTP head style {style!r}; choose one of {', '.join(STYLES)}")
        if medusa_layers < 1:
            raise IntegrationError(f"medusa_layers must be at least 1, got {medusa_layers}")
        self.style = style
        self.medusa_layers = medusa_layers
        self.offsets: dict[str, int] = {}

    def layout(self) -> dict[str, Any]:
        """What `model.config.lossgraph_heads` records, enough to rebuild the heads."""
        return {"style": self.style, "heads": dict(self.offsets), "medusa_layers": self.medusa_layers}

    def add(self, name: str, offset: int, model: PreTrainedModel) -> None:
        output = model.get_output_embeddings()
        if self.style == "linear":
            module: torch.nn.Module = _copy_linear(output)
        elif self.style == "medusa":
            module = MedusaHead(output, self.medusa_layers)
        else:
            module = DeepSeekMTPModule(model.config, output)
        self.add_module(name, module)
        self.offsets[name] = offset

    def by_offset(self) -> list[str]:
        return sorted(self.offsets, key=self.offsets.__getitem__)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        embed: torch.nn.Module | None = None,
        output: torch.nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.style != "deepseek":
            return {name: self[name](hidden) for name in self.by_offset()}
        if input_ids is None or embed is None or output is None:
            raise IntegrationError("deepseek-style MTP heads read the input_ids: call the model with input_ids")
        length = hidden.shape[1]
        positions, documents = _positions(position_ids, hidden)
        mask = _attention_mask(attention_mask, documents, length, hidden.device)
        logits, previous = {}, hidden
        for depth, name in enumerate(self.by_offset(), start=1):
            # token t + depth at position t; past the end there is nothing to predict, any id will do
            ahead = F.pad(input_ids[:, depth:], (0, min(depth, length)), value=0)[:, :length]
            previous = self[name](previous, embed(ahead), positions, mask)
            # a call of the module, not F.linear on output.weight: a wrapper that gathers the weight for
            # the module's forward (FSDP2, ZeRO-3) then gathers it for this use too, and again for its
            # backward; reading the weight outside the call finds it resharded there (FSDP2 frees it)
            logits[name] = output(self[name].out_norm(previous))
        return logits


def _positions(position_ids: torch.Tensor | None, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, length = hidden.shape[:2]
    if position_ids is None or position_ids.dim() not in (1, 2):
        return torch.arange(length, device=hidden.device).expand(batch, length), None
    positions = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    positions = positions.expand(batch, length)
    documents = document_ids_from_positions(positions)
    return positions, documents if bool((documents[:, -1] > 1).any()) else None


def _active(heads: torch.nn.Module) -> MTPHeads:
    """The MTPHeads behind `model.lossgraph_heads` (PEFT's modules_to_save wraps it)."""
    if isinstance(heads, MTPHeads):
        return heads
    copies = getattr(heads, "modules_to_save", None)
    active = getattr(heads, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    if isinstance(copies, torch.nn.ModuleDict) and active in copies and isinstance(copies[active], MTPHeads):
        return copies[active]
    original = getattr(heads, "original_module", None)
    if isinstance(original, MTPHeads):
        return original
    raise IntegrationError(
        f"model.{HEADS_ATTRIBUTE} is a {type(heads).__name__}, not lossgraph's MTPHeads: "
        "attach the heads with attach_mtp_heads (an older checkpoint? load it with from_pretrained)"
    )


def mtp_heads(model: torch.nn.Module) -> MTPHeads | None:
    """The model's MTP heads (after unwrapping DDP, FSDP, DeepSpeed, PEFT), or None when it has none."""
    inner = unwrap_model(model)
    heads = getattr(inner, HEADS_ATTRIBUTE, None)
    return None if heads is None else _active(heads)


# --------------------------------------------------------------------------------------------------
# Attaching heads.
# --------------------------------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside DDP, FSDP, DeepSpeed, torch.compile and PEFT wrappers."""
    current = model
    for _ in range(16):
        if isinstance(current, PreTrainedModel):
            return current
        inner = None
        for attribute in ("module", "_orig_mod", "_fsdp_wrapped_module"):
            candidate = getattr(current, attribute, None)
            if isinstance(candidate, torch.nn.Module):
                inner = candidate
                break
        if inner is None and callable(getattr(current, "get_base_model", None)):  # PEFT
            inner = current.get_base_model()
        if inner is None:
            break
        current = inner
    raise IntegrationError(
        f"expected a transformers PreTrainedModel (a *ForCausalLM), got {type(model).__name__}; "
        "for another model, call the compiled graph directly with its logits"
    )


def attach_mtp_heads(
    model: PreTrainedModel, graph: CompiledGraph, style: str = "linear", *, medusa_layers: int = 1
) -> PreTrainedModel:
    """Give the model one MTP module per graph head with offset > 1; returns the model.

    style: `linear` (a copy of lm_head on the last hidden state), `medusa` (residual blocks, then a
    copy of lm_head) or `deepseek` (a transformer block per depth fed with the next token's embedding,
    predicting through lm_head). Heads the model already has are kept (a reloaded or trained head is not
    reset); new heads of the graph are added in the same style. The layout goes to
    `model.config.lossgraph_heads`, the weights to the model's state dict.
    """
    if not isinstance(model, PreTrainedModel):
        raise IntegrationError(
            f"attach_mtp_heads takes the transformers model itself, got {type(model).__name__}: "
            "attach the heads before wrapping the model (PEFT, DDP, FSDP, DeepSpeed)"
        )
    output = model.get_output_embeddings()
    if output is None or getattr(output, "weight", None) is None:
        raise IntegrationError(f"{type(model).__name__} has no output embedding (lm_head) to predict with")
    vocab = output.weight.shape[0]
    for head in graph.plan.heads:
        if head.vocab_size != vocab:
            raise IntegrationError(
                f"head {head.name!r} declares vocab_size {head.vocab_size}, but the model's vocab is {vocab}; "
                f"set vocab_size: {vocab} in the graph"
            )
    existing = getattr(model, HEADS_ATTRIBUTE, None)
    if existing is None:
        heads = MTPHeads(style, medusa_layers)
    else:
        heads = _active(existing)
        if heads.style != style:
            raise IntegrationError(
                f"the model already has {heads.style}-style MTP heads ({', '.join(heads.offsets)}); "
                f"call attach_mtp_heads(..., style={heads.style!r}) or start from a model without heads"
            )
    wanted = {head.name: head.offset for head in graph.plan.heads if head.offset > 1}
    for name, offset in wanted.items():
        if name in heads.offsets and heads.offsets[name] != offset:
            raise IntegrationError(
                f"the model's MTP head {name!r} predicts offset {heads.offsets[name]}, the graph's offset {offset}; "
                "rename the head in the graph or start from a model without it"
            )
    if style == "deepseek":
        offsets = sorted({*heads.offsets.values(), *wanted.values()})
        if offsets != list(range(2, len(offsets) + 2)):
            raise IntegrationError(
                f"deepseek-style MTP heads are a chain of depths: their offsets must be 2, 3, ..., "
                f"{len(offsets) + 1}, got {offsets}; add the missing heads to the graph or use style='medusa'"
            )
    new = {name: offset for name, offset in wanted.items() if name not in heads.offsets}
    if new and existing is not None and not isinstance(existing, MTPHeads):
        raise IntegrationError(
            f"the model's heads are wrapped by {type(existing).__name__} (PEFT?); "
            f"attach every head ({', '.join(new)}) before wrapping the model"
        )
    for name, offset in sorted(new.items(), key=lambda item: item[1]):
        heads.add(name, offset, model)
    if existing is None:
        model.add_module(HEADS_ATTRIBUTE, heads)
    setattr(model.config, HEADS_ATTRIBUTE, heads.layout())
    install_tap(model)
    return model


# --------------------------------------------------------------------------------------------------
# The tap: hooks that compute the heads inside the model's forward when lossgraph asks.
# --------------------------------------------------------------------------------------------------


class _Tap:
    """Per-model state of the hooks. Armed only inside `tapped(...)`; holds the last forward's tensors."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.armed = False
        self.inputs: dict[str, Any] = {}
        self.hidden: torch.Tensor | None = None
        self.raw: torch.Tensor | None = None
        self.mtp: dict[str, torch.Tensor] | None = None
        self.processing = logit_processing(model.config)
        self.checked = False
        self.running = False  # inside the heads' forward: their own calls of lm_head are not the model's

    def clear(self) -> None:
        self.inputs, self.hidden, self.raw, self.mtp = {}, None, None, None


def _before_model(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    tap = getattr(module, _TAP, None)
    if tap is None or not tap.armed:
        return
    inputs = dict(kwargs)
    if args:
        inputs.setdefault("input_ids", args[0])
    tap.inputs = {key: inputs.get(key) for key in ("input_ids", "attention_mask", "position_ids")}


def _after_output_head(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
    tap = getattr(module, _TAP, None)
    if tap is None or not tap.armed or tap.running or not args or module is not tap.model.get_output_embeddings():
        return  # an lm_head since replaced or wrapped (PEFT's LoRA on lm_head): its new one is hooked too
    tap.hidden, tap.raw = args[0], output
    heads = getattr(tap.model, HEADS_ATTRIBUTE, None)
    if heads is not None and len(_active(heads)):
        tap.running = True  # the deepseek depths call lm_head: those calls do not run the heads again
        try:
            tap.mtp = heads(
                args[0],
                tap.inputs.get("input_ids"),
                tap.inputs.get("attention_mask"),
                tap.inputs.get("position_ids"),
                embed=tap.model.get_input_embeddings(),
                output=module,
            )
        finally:
            tap.running = False


class _Tie(torch.autograd.Function):
    """The logits, unchanged, with the MTP logits as extra inputs that get no gradient here.

    DDP with find_unused_parameters (transformers' default) walks the autograd graph back from the
    forward's output to find the parameters in use; the MTP heads' logits are not part of that output,
    so this ties them to it. Nothing is computed or copied: the result is `logits.detach()`, the same
    storage (and version counter) under a new autograd node. Not a view (`view_as` was): FSDP2 warns
    about a module returning a view, since an in-place op on one would drop its pre-backward hook.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.others = len(others)
        return logits.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad, *([None] * ctx.others))


def _after_model(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    tap = getattr(module, _TAP, None)
    if tap is None or not tap.armed or not tap.mtp or not isinstance(output, Mapping):
        return output
    logits = output.get("logits")
    if isinstance(logits, torch.Tensor) and torch.is_grad_enabled():
        output["logits"] = _Tie.apply(logits, *tap.mtp.values())
    return output


def install_tap(model: PreTrainedModel) -> _Tap:
    """Register lossgraph's hooks on the model and its lm_head, once; returns the model's tap."""
    output = model.get_output_embeddings()
    if output is None:
        raise IntegrationError(f"{type(model).__name__} has no output embedding (lm_head) to predict with")
    tap = getattr(model, _TAP, None)
    if tap is None:
        tap = _Tap(model)
        model.__dict__[_TAP] = tap
        model.register_forward_pre_hook(_before_model, with_kwargs=True)
        model.register_forward_hook(_after_model, with_kwargs=True)
    if getattr(output, _TAP, None) is not tap:  # a new lm_head (resize_token_embeddings replaces it)
        output.__dict__[_TAP] = tap
        output.register_forward_hook(_after_output_head)
    return tap


@contextlib.contextmanager
def tapped(model: torch.nn.Module) -> Iterator[_Tap]:
    """Arm the hooks of `model` (wrapped or not) for one forward; yields its tap, cleared on exit."""
    tap = install_tap(unwrap_model(model))
    tap.clear()
    tap.armed = True
    try:
        yield tap
    finally:
        tap.armed = False


def check_processing(tap: _Tap, logits: torch.Tensor) -> None:
    """Once per model: the known post-processing of lm_head's output gives the model's own logits."""
    if tap.checked or tap.raw is None or logits is None or tap.raw.shape != logits.shape:
        return
    with torch.no_grad():
        mine = tap.processing(tap.raw[:1]).float()
        theirs = logits[:1].float()
        error = float((mine - theirs).abs().max())
        bound = 1e-3 * (1.0 + float(theirs.abs().max()))
    if not math.isfinite(error) or error > bound:
        raise IntegrationError(
            f"{type(tap.model).__name__} post-processes its logits in a way lossgraph does not know (known: "
            f"{', '.join(name for name, _, _ in _SCALES)}, final_logit_softcapping; this config: "
            f"{tap.processing.described}): its MTP heads' logits would not match lm_head's "
            f"(max difference {error:.3g}). Use a graph with offset-1 heads only, or report the model"
        )
    tap.checked = True


# --------------------------------------------------------------------------------------------------
# Saving and loading.
# --------------------------------------------------------------------------------------------------


def _head_tensors(path: str | os.PathLike, **hub: Any) -> dict[str, torch.Tensor]:
    """The `lossgraph_heads.*` tensors of a checkpoint (safetensors or torch, single or sharded)."""
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
        cached_file,
    )

    prefix = HEADS_ATTRIBUTE + "."

    def find(name: str) -> str | None:
        return cached_file(
            path,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub,
        )

    def read(file: str) -> dict[str, torch.Tensor]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as opened:
                return {key: opened.get_tensor(key) for key in opened.keys() if key.startswith(prefix)}
        state = torch.load(file, map_location="cpu", weights_only=True)
        return {key: value for key, value in state.items() if key.startswith(prefix)}

    for index_name, single_name in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME)):
        single = find(single_name)
        if single is not None:
            return read(single)
        index = find(index_name)
        if index is not None:
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            found: dict[str, torch.Tensor] = {}
            for shard in sorted({file for key, file in weight_map.items() if key.startswith(prefix)}):
                shard_path = find(shard)
                if shard_path is None:
                    raise IntegrationError(f"{path}: the index names {shard}, which is missing")
                found.update(read(shard_path))
            return found
    raise IntegrationError(f"{path}: no model weights found (model.safetensors, pytorch_model.bin or their index)")


def load_mtp_heads(model: PreTrainedModel, path: str | os.PathLike, **hub: Any) -> PreTrainedModel:
    """Rebuild the heads recorded in `model.config.lossgraph_heads` and load their weights from `path`.

    For a model loaded by other means (`AutoModelForCausalLM.from_pretrained` drops the heads' weights);
    `from_pretrained` does both steps. `hub`: `revision`, `token`, ... as for `from_pretrained`.
    """
    layout = getattr(model.config, HEADS_ATTRIBUTE, None)
    if not layout:
        raise IntegrationError(
            f"{path}: its config.json records no lossgraph heads (config.{HEADS_ATTRIBUTE}); "
            "it was saved without attach_mtp_heads, so there is nothing to load"
        )
    if getattr(model, HEADS_ATTRIBUTE, None) is not None:
        raise IntegrationError("the model already has lossgraph heads; load the checkpoint into a fresh model")
    heads = MTPHeads(layout["style"], int(layout.get("medusa_layers", 1)))
    for name, offset in sorted(layout["heads"].items(), key=lambda item: item[1]):
        heads.add(name, int(offset), model)
    state = {key[len(HEADS_ATTRIBUTE) + 1 :]: value for key, value in _head_tensors(path, **hub).items()}
    expected = set(heads.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise IntegrationError(
            f"{path}: the checkpoint's lossgraph heads do not match config.{HEADS_ATTRIBUTE} ({layout}): "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    heads.load_state_dict(state)
    model.add_module(HEADS_ATTRIBUTE, heads)
    install_tap(model)
    return model


@contextlib.contextmanager
def _quiet_head_keys(model_class: type, config: Any) -> Iterator[None]:
    """Tell transformers that the checkpoint's lossgraph_heads.* keys are expected (no UNEXPECTED report)."""
    concrete = model_class
    mapping = getattr(model_class, "_model_mapping", None)  # the Auto* classes
    if mapping is not None:
        try:
            concrete = mapping[type(config)]
        except (KeyError, ValueError):
            yield
            return
    own = concrete.__dict__.get("_keys_to_ignore_on_load_unexpected", _MISSING)
    patterns = list(getattr(concrete, "_keys_to_ignore_on_load_unexpected", None) or [])
    concrete._keys_to_ignore_on_load_unexpected = [*patterns, rf"^{HEADS_ATTRIBUTE}\."]
    try:
        yield
    finally:
        if own is _MISSING:
            del concrete._keys_to_ignore_on_load_unexpected
        else:
            concrete._keys_to_ignore_on_load_unexpected = own


_MISSING = object()


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, **kwargs: Any) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` that also restores the lossgraph heads.

    The heads recorded in the checkpoint's config are rebuilt and their trained weights loaded (on
    lm_head's device and dtype). A checkpoint without heads loads as a plain model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    hub = {
        key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only", "subfolder") if key in kwargs
    }
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        path, trust_remote_code=kwargs.get("trust_remote_code", False), **hub
    )
    if not getattr(config, HEADS_ATTRIBUTE, None):
        return model_class.from_pretrained(path, config=config, **kwargs)
    with _quiet_head_keys(model_class, config):
        model = model_class.from_pretrained(path, config=config, **kwargs)
    load_mtp_heads(model, path, **hub)
    output = model.get_output_embeddings()
    getattr(model, HEADS_ATTRIBUTE).to(device=output.weight.device, dtype=output.weight.dtype)
    return model


# --------------------------------------------------------------------------------------------------
# Inference: the heads as a draft model.
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def forward_parameters(forward_type: type, name: str = "forward") -> tuple[frozenset[str], bool]:
    """Named parameters of a model class's forward, and whether it takes **kwargs."""
    parameters = inspect.signature(getattr(forward_type, name)).parameters.values()
    named = frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return named, any(p.kind is p.VAR_KEYWORD for p in parameters)


@torch.no_grad()
def draft_tokens(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy draft of the tokens after `input_ids`: [B, 1 + number of MTP heads].

    Column 0 is lm_head's next token; column j is the head of offset j + 1 (deepseek-style heads
    are run depth by depth, each fed with the token drafted before it). Use them as the candidates of
    speculative decoding: one forward of the model over `input_ids + draft` checks them all.
    """
    heads = mtp_heads(model)
    if heads is None or not len(heads):
        raise IntegrationError("the model has no MTP heads: attach_mtp_heads (and train them) or from_pretrained")
    offsets = [heads.offsets[name] for name in heads.by_offset()]
    if offsets != list(range(2, len(offsets) + 2)):
        raise IntegrationError(f"drafting needs heads for offsets 2, 3, ..., got {offsets}")
    inner = unwrap_model(model)
    named, _ = forward_parameters(type(inner))
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if "use_cache" in named:
        inputs["use_cache"] = False
    with tapped(model) as tap:
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        drafted = [logits[:, -1].argmax(-1)]
        if heads.style != "deepseek":
            check_processing(tap, logits)
            for name in heads.by_offset():
                drafted.append(tap.processing(tap.mtp[name][:, -1]).argmax(-1))
            return torch.stack(drafted, 1)
        hidden, output = tap.hidden, inner.get_output_embeddings()
    check_processing(tap, logits)
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device).expand(input_ids.shape[0], length)
    mask = _attention_mask(attention_mask, None, length, input_ids.device)
    tokens, previous = torch.cat([input_ids, drafted[0][:, None]], 1), hidden
    embed = inner.get_input_embeddings()
    for depth, name in enumerate(heads.by_offset(), start=1):
        module = heads[name]
        previous = module(previous, embed(tokens[:, depth : depth + length]), positions, mask)
        last = output(module.out_norm(previous[:, -1]))  # the tap is disarmed: the call runs no heads
        drafted.append(tap.processing(last).argmax(-1))
        tokens = torch.cat([tokens, drafted[-1][:, None]], 1)
    return torch.stack(drafted, 1)
