"""Float64 reference of TRL's ``GRPOTrainer`` loss (and Fast-LLM's policy-gradient convention).

Written from TRL 1.16.0 (PyPI wheel, released 2026-10; ``trl/trainer/grpo_trainer.py``
``GRPOTrainer._compute_loss`` and ``get_high_entropy_mask``, ``trl/trainer/grpo_config.py``), cross-checked
against huggingface/trl commit d2b69d769dab6f77acbfd33252bcd7d22765571b (an older ``_compute_loss``
without dapo/cispo, same token/sequence/delta/k3 code). GSPO-token (``importance_sampling_level=
"sequence_token"``) is from TRL's ``trl.experimental.gspo_token`` trainer (absent from the 1.16.0 wheel).
Fast-LLM: ServiceNow/Fast-LLM ``fast_llm/layers/language_model/loss/policy_gradient.py`` at commit
15421c1c537cc4bc854c417e81e495c0998dfd91.
``grpo_loss`` was checked against the real ``GRPOTrainer._compute_loss`` of the 1.16.0 wheel (called on a
stub trainer with these tensors, one process) over every loss type x level x on/off-policy x beta x bias
correction x delta x entropy quantile: loss and gradient agree to 1e-16.

Shapes are TRL's: ``per_token_logps``, ``old_per_token_logps``, ``ref_per_token_logps``, ``entropies`` and
``completion_mask`` are ``[B, T]``; ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``.
Everything is plain autograd, so tests take gradients through ``per_token_logps``.

What TRL computes, in order (``r`` is the importance ratio ``coef_1``, ``A`` the advantage):

1. ``old = per_token_logps.detach()`` when old log-probs are absent (on-policy: ratio exactly 1, gradient
   of ``r`` w.r.t. ``logp`` equal to 1).
2. ``log_w``: token ``logp - old``; sequence (GSPO) the masked mean of ``logp - old`` over the sequence,
   ``sum(log_ratio * mask) / clamp(sum(mask), min=1)``, shape ``[B, 1]``; ``r = exp(log_w)``.
3. ``per_token_kl`` (only when ``beta != 0``) = k3, times ``r`` when ``use_bias_correction_kl`` (TRL's
   default True since the DeepSeek-V3.2 change; ``r`` is taken before the ``delta`` cap).
4. Per-token policy loss: clip objective ``-min(min(r, delta) * A, clamp(r, 1 - eps_low, 1 + eps_high) * A)``
   or CISPO ``-sg(min(r, epsilon_high)) * A * logp``.
5. Times the entropy mask (policy term only), then ``+ beta * per_token_kl`` (KL is not entropy-masked).
6. Aggregation by ``loss_type`` over ``completion_mask`` (see ``aggregate``).

Subgradient convention (it is PyTorch's, and TRL inherits it): ``torch.clamp(x, lo, hi)`` passes the
gradient where ``lo <= x <= hi`` (inclusive: a ratio exactly on a clip bound or exactly at ``delta`` keeps
its gradient) and zero outside; binary ``torch.min(a, b)`` gives each side half the gradient when
``a == b``. So at ``r == 1 + eps_high`` (or ``1 - eps_low``) both surrogates are equal, both carry the
gradient ``A * r``, and the split halves sum to the full unclipped gradient ``-A * r`` per unit ``dlogp``.
Fast-LLM hand-codes the same thing (``r <= 1 + eps_high`` for ``A >= 0``, ``r >= 1 - eps_low`` for
``A <= 0``), so the two agree on the boundaries too.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token (Schulman, "Approximating KL").

    With ``d = ref_logp - logp`` (the log of ``pi_ref / pi_theta`` at a token sampled from pi_theta):
    - k1 = ``-d`` = ``logp - ref_logp`` (unbiased, high variance, can be negative); d/dlogp = 1;
    - k2 = ``d**2 / 2`` (biased, low variance, >= 0); d/dlogp = ``-d``;
    - k3 = ``exp(d) - d - 1`` (unbiased, >= 0); d/dlogp = ``1 - exp(d)``. TRL's ``GRPOTrainer`` uses k3 only.
    """
    log_ratio = ref_per_token_logps - per_token_logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def log_importance_weights(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    completion_mask: torch.Tensor,
    importance_sampling_level: str = "token",
) -> torch.Tensor:
    """Log of TRL's ``coef_1``: ``[B, T]`` for "token", ``[B, 1]`` for "sequence", ``[B, T]`` for "sequence_token".

    - old log-probs absent: ``old = per_token_logps.detach()`` (ratio 1, gradient kept);
    - token: ``logp_t - old_t``;
    - sequence (GSPO): ``s_i = sum_t(mask * (logp - old)) / max(sum_t mask, 1)``, the log of the
      length-normalized geometric-mean ratio; an all-masked sequence gets ``s_i = 0`` (ratio 1, no gradient);
      every active token of sequence i receives ``d s_i / d logp_t = 1 / n_i``;
    - sequence_token (GSPO-token): ``logp_t - sg(logp_t) + sg(s_i)``: value ``s_i`` on every token, gradient
      1 w.r.t. its own token only.
    """
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        return log_ratio
    mask = completion_mask.to(log_ratio.dtype)
    sequence_log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if importance_sampling_level == "sequence":
        return sequence_log_weight
    if importance_sampling_level == "sequence_token":
        return per_token_logps - per_token_logps.detach() + sequence_log_weight.detach()
    raise ValueError(
        f"unknown importance_sampling_level {importance_sampling_level!r}; expected one of {IMPORTANCE_SAMPLING_LEVELS}"
    )


def clipped_surrogate_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> torch.Tensor:
    """TRL's per-token clip loss ``-min(min(r, delta) * A, clamp(r, 1 - eps_low, 1 + eps_high) * A)``.

    ``advantages`` broadcasts against ``ratio`` (``[B, 1]`` or ``[B, T]``). The ``delta`` cap (INTELLECT-2's
    two-sided clip) applies to the unclipped branch only, after the clipped branch was taken from the
    uncapped ratio. Gradient w.r.t. ``r`` (before the tie rules of the module docstring):
    ``A > 0``: ``-A`` if ``r < 1 + eps_high`` (and ``r < delta``), else 0;
    ``A < 0``: ``-A`` if ``1 - eps_low < r`` (and ``r < delta``), else 0; ``A == 0``: 0.
    """
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped_ratio * advantages)


def cispo_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, per_token_logps: torch.Tensor, epsilon_high: float
) -> torch.Tensor:
    """TRL's CISPO (MiniMax-M1) per-token loss ``-sg(min(r, epsilon_high)) * A * logp``.

    Note the bound: TRL caps the ratio at ``epsilon_high`` itself (ScaleRL's epsilon_max, recommended 5.0),
    not at ``1 + epsilon_high``; there is no lower bound and ``delta`` is ignored. The weight is detached,
    so d/dlogp_t = ``-min(r_t, epsilon_high) * A`` (a REINFORCE gradient with a truncated IS weight) and the
    loss value depends on ``logp`` itself, not only on the ratio.
    """
    return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * per_token_logps


def high_entropy_mask(
    entropies: torch.Tensor, completion_mask: torch.Tensor, top_entropy_quantile: float
) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)``: keep the top-rho tokens.

    ``threshold = torch.quantile(entropies[mask], 1 - top_entropy_quantile)`` over the active tokens of the
    whole batch (TRL gathers them across processes), with torch's default linear interpolation between
    order statistics; a token is kept iff it is active and ``entropy >= threshold`` (ties with the threshold
    are kept, so more than the rho fraction can survive). ``top_entropy_quantile = 0`` keeps the maximum
    (and its ties); no active token at all gives an all-False mask. TRL casts the entropies to float32
    before the quantile; this reference keeps the input dtype (identical for float32 inputs).
    """
    active = completion_mask.bool()
    active_entropies = entropies[active]
    if active_entropies.numel() == 0:
        return torch.zeros_like(active)
    threshold = torch.quantile(active_entropies, 1 - top_entropy_quantile)
    return (entropies >= threshold) & active


def aggregate(
    per_token_loss: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
) -> torch.Tensor:
    """TRL's reduction of the ``[B, T]`` (or ``[B, 1]``, broadcast) per-token loss, train mode.

    With ``m`` the completion mask, ``n_i = sum_t m`` and ``G = gradient_accumulation_steps``:
    - grpo: ``mean_i(sum_t(l * m) / max(n_i, 1)) / G`` (an all-masked sequence counts as 0 in the mean);
    - bnpo: ``sum(l * m) / max(sum(m), 1) / G`` (local batch token mean);
    - dr_grpo: ``sum(l * m) / (B * max_completion_length) / G``;
    - dapo and cispo: ``sum(l * m) / (max(N, 1) / num_processes * G / steps_per_generation)``, where ``N`` is
      ``num_items_in_batch``: the active tokens of the whole generation batch, summed over processes
      (default here: ``sum(m)``; ``steps_per_generation`` defaults to ``G`` as in TRL). With one process and
      one batch this equals bnpo;
    - luspo: ``mean_i(sum_t(l * m)) / G`` (sequence sum, then mean over sequences).
    In eval mode TRL divides by neither ``G`` nor ``G / steps_per_generation``: pass 1 for both.
    """
    mask = completion_mask.to(per_token_loss.dtype)
    masked_loss = per_token_loss * mask
    if loss_type == "grpo":
        return (masked_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / gradient_accumulation_steps
    if loss_type == "bnpo":
        return masked_loss.sum() / mask.sum().clamp(min=1.0) / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return masked_loss.sum() / (per_token_loss.size(0) * max_completion_length) / gradient_accumulation_steps
    if loss_type in ("dapo", "cispo"):
        if num_items_in_batch is None:
            num_items_in_batch = mask.sum()
        num_items_in_batch = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype)
        if steps_per_generation is None:
            steps_per_generation = gradient_accumulation_steps
        normalizer = (
            num_items_in_batch.clamp(min=1.0) / num_processes * gradient_accumulation_steps / steps_per_generation
        )
        return masked_loss.sum() / normalizer
    if loss_type == "luspo":
        return masked_loss.sum(-1).mean() / gradient_accumulation_steps
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    loss_type: str,
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    ref_per_token_logps: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    entropies: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    num_items_in_batch: float | torch.Tensor | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
) -> torch.Tensor:
    """The scalar loss TRL's ``GRPOTrainer._compute_loss`` returns, from per-token log-probs.

    ``epsilon_low`` is TRL's ``epsilon``; ``epsilon_high`` must be given explicitly (TRL defaults it to
    ``epsilon``). ``use_bias_correction_kl`` is TRL's config flag (default True): the KL term becomes
    ``beta * k3 * r`` with ``r`` differentiable, so even on-policy its gradient is ``beta * (logp - ref_logp)``
    (the exact reverse-KL gradient), not k3's ``beta * (1 - exp(ref_logp - logp))``; pass False for the
    plain ``beta * k3``. Not modelled: vLLM's ``importance_sampling_ratio`` correction, the off-policy
    sequence mask, the entropy bonus (``entropy_coef``), tool masks, and the sapo/vespo loss types.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_weights = log_importance_weights(
        per_token_logps, old_per_token_logps, completion_mask, importance_sampling_level
    )
    ratio = torch.exp(log_weights)

    if loss_type == "cispo":
        per_token_loss = cispo_loss(ratio, advantages, per_token_logps, epsilon_high)
    elif loss_type in LOSS_TYPES:
        per_token_loss = clipped_surrogate_loss(ratio, advantages, epsilon_low, epsilon_high, delta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")

    if top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs per-token entropies")
        per_token_loss = per_token_loss * high_entropy_mask(entropies, completion_mask, top_entropy_quantile)

    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps")
        per_token_kl = kl_estimate(per_token_logps, ref_per_token_logps, "k3")
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl

    return aggregate(
        per_token_loss,
        completion_mask,
        loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        num_processes=num_processes,
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps_per_generation=steps_per_generation,
    )


def clip_fractions(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's logged ``clip_ratio/{low,high,region}_mean`` for the clip objectives (one process).

    ``low = (r < 1 - eps_low) & (A < 0)``, ``high = (r > 1 + eps_high) & (A > 0)`` (strict: a ratio exactly
    on a bound is not counted), ``region = low | high``; ``r`` is taken after the ``delta`` cap (TRL
    reassigns ``coef_1``). Token level: mean over active tokens; sequence level (``r`` of shape ``[B, 1]``):
    plain mean over the ``B`` sequences, all-masked ones included.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    mask = completion_mask.to(ratio.dtype)

    def masked_mean(flags: torch.Tensor) -> torch.Tensor:
        flags = flags.to(ratio.dtype)
        if flags.shape[1] == 1:
            return flags.mean()
        return (flags * mask).sum() / mask.sum().clamp(min=1.0)

    return {"low": masked_mean(low), "high": masked_mean(high), "region": masked_mean(low | high)}


def fast_llm_policy_gradient_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    divisor: float | None = None,
) -> torch.Tensor:
    """Fast-LLM's ``grpo`` / ``gspo`` losses (``LanguageModelGRPOLoss`` / ``LanguageModelGSPOLoss``).

    Same per-token clip surrogate as TRL, with no ``delta``, no KL term (the KL is its own loss there), no
    entropy mask, and old log-probs always given. Where it differs from TRL:
    - token ("grpo"): ``sum(l * m) / divisor`` with ``divisor`` the labelled-token count of the whole batch
      (default ``sum(m)``): TRL's dapo aggregation, not TRL's per-sequence grpo mean;
    - sequence ("gspo"): ratio ``R_i = exp(mean_t log_ratio)`` over the labelled tokens as in TRL, but the
      advantage is the (detached) mean advantage over those tokens, and the loss is
      ``sum_i n_i * l_i / divisor`` with ``divisor`` the number of documents (default ``B``): each sequence
      weighted by its length, i.e. TRL's luspo aggregation with sequence-level importance sampling, not
      TRL's grpo. Its hand-written gradient per token is ``-A_i * R_i * [inside the clip] / divisor``,
      which is what autograd gives here.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(per_token_logps)
    mask = completion_mask.to(per_token_logps.dtype)
    if importance_sampling_level == "token":
        ratio = torch.exp(per_token_logps - old_per_token_logps)
        per_token_loss = clipped_surrogate_loss(ratio, advantages, epsilon_low, epsilon_high)
        if divisor is None:
            divisor = mask.sum()
        return (per_token_loss * mask).sum() / divisor
    if importance_sampling_level == "sequence":
        counts = mask.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(((per_token_logps - old_per_token_logps) * mask).sum(-1, keepdim=True) / counts)
        sequence_advantage = ((advantages * mask).sum(-1, keepdim=True) / counts).detach()
        per_sequence_loss = clipped_surrogate_loss(ratio, sequence_advantage, epsilon_low, epsilon_high)
        if divisor is None:
            divisor = per_token_logps.size(0)
        return (per_sequence_loss * mask).sum() / divisor
    raise ValueError(f"Fast-LLM has importance_sampling_level 'token' or 'sequence', not {importance_sampling_level!r}")
