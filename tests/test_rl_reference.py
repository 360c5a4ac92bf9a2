"""Hand-computed cases that pin every option of the float64 TRL GRPO reference in tests/rl_reference.py."""

import math

import pytest
import torch

from tests.rl_reference import (
    clip_fractions,
    fast_llm_policy_gradient_loss,
    grpo_loss,
    high_entropy_mask,
    kl_estimate,
    log_importance_weights,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F64)


def value_and_grad(logps: torch.Tensor, **kwargs) -> tuple[float, torch.Tensor]:
    """Loss value and its gradient w.r.t. ``logps`` (a fresh leaf each call)."""
    logps = logps.detach().clone().requires_grad_(True)
    old = kwargs.pop("old", None)
    old = None if old is None else old(logps.detach())
    loss = grpo_loss(logps, old, kwargs.pop("advantages"), kwargs.pop("mask"), **kwargs)
    (grad,) = torch.autograd.grad(loss, logps, allow_unused=True)
    return loss.item(), torch.zeros_like(logps) if grad is None else grad


def close(actual, expected) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64))


def old_for_ratios(ratios):
    """Old log-probs chosen so that exp(logp - old) equals ``ratios``."""
    return lambda logps: logps - torch.log(t(ratios))


# The 2x3 batch used throughout: ragged mask, one positive and one negative advantage.
LOGPS = t([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
RATIOS = [[1.5, 0.5, 1.1], [1.5, 0.5, 3.0]]
MASK = t([[1, 1, 1], [1, 1, 0]])
ADVANTAGES = t([1.0, -1.0])
# Per-token clip losses with eps 0.2: row 0 (A=+1) -min(r, clip r) = [-1.2, -0.5, -1.1];
# row 1 (A=-1) max(r, clip r) = [1.5, 0.8, masked].
# d loss / d logp = d loss / d r * r: row 0 [0 (clipped high), -0.5, -1.1]; row 1 [1.5, 0 (clipped low), 0].
TOKEN_GRAD_NUMERATOR = t([[0.0, -0.5, -1.1], [1.5, 0.0, 0.0]])


def batch(**kwargs):
    return value_and_grad(LOGPS, old=old_for_ratios(RATIOS), advantages=ADVANTAGES, mask=MASK, **kwargs)


# ---- loss types -------------------------------------------------------------------------------------


def test_grpo_is_mean_per_sequence_then_over_sequences():
    loss, grad = batch(loss_type="grpo")
    close(loss, ((-1.2 - 0.5 - 1.1) / 3 + (1.5 + 0.8) / 2) / 2)
    close(grad, TOKEN_GRAD_NUMERATOR / t([[6.0], [4.0]]))


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_bnpo_and_dapo_are_the_token_mean_over_the_batch(loss_type):
    loss, grad = batch(loss_type=loss_type)
    close(loss, (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 5)
    close(grad, TOKEN_GRAD_NUMERATOR / 5)


def test_dr_grpo_divides_by_max_completion_length_times_sequences():
    loss, grad = batch(loss_type="dr_grpo", max_completion_length=4)
    close(loss, (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / (2 * 4))
    close(grad, TOKEN_GRAD_NUMERATOR / 8)
    with pytest.raises(ValueError, match="max_completion_length"):
        batch(loss_type="dr_grpo")


def test_luspo_sums_each_sequence_then_averages_sequences():
    loss, grad = batch(loss_type="luspo")
    close(loss, (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 2)
    close(grad, TOKEN_GRAD_NUMERATOR / 2)


def test_grpo_and_dapo_weight_ragged_sequences_differently():
    kwargs = dict(advantages=t([1.0, 1.0]), mask=t([[1, 1, 1], [1, 0, 0]]))
    grpo_value, grpo_grad = value_and_grad(LOGPS, loss_type="grpo", **kwargs)
    dapo_value, dapo_grad = value_and_grad(LOGPS, loss_type="dapo", **kwargs)
    close(grpo_value, -1.0)
    close(dapo_value, -1.0)
    # grpo: each sequence weighs 1/B, spread over its tokens; dapo: every token weighs 1/(active tokens).
    close(grpo_grad, t([[-1 / 6, -1 / 6, -1 / 6], [-1 / 2, 0, 0]]))
    close(dapo_grad, t([[-1 / 4, -1 / 4, -1 / 4], [-1 / 4, 0, 0]]))


def test_dapo_normalizer_follows_num_items_in_batch_processes_and_accumulation():
    # normalizer = num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation
    loss, grad = batch(
        loss_type="dapo", num_items_in_batch=10, num_processes=2, gradient_accumulation_steps=2, steps_per_generation=4
    )
    close(loss, (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 2.5)
    close(grad, TOKEN_GRAD_NUMERATOR / 2.5)
    grpo_accumulated, _ = batch(loss_type="grpo", gradient_accumulation_steps=2)
    close(grpo_accumulated, ((-1.2 - 0.5 - 1.1) / 3 + (1.5 + 0.8) / 2) / 2 / 2)


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        batch(loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        batch(loss_type="grpo", importance_sampling_level="chunk")
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(LOGPS, LOGPS, "k4")


# ---- clipping -------------------------------------------------------------------------------------


def test_epsilon_low_and_high_are_separate_bounds():
    # eps_high 0.6 lets the 1.5 ratio of row 0 through (-1.5, gradient -1.5); eps_low 0.2 still clips 0.5.
    loss, grad = batch(loss_type="bnpo", epsilon_high=0.6)
    close(loss, (-1.5 - 0.5 - 1.1 + 1.5 + 0.8) / 5)
    close(grad, t([[-1.5, -0.5, -1.1], [1.5, 0.0, 0.0]]) / 5)
    # eps_low 0.6 lets the 0.5 ratio of row 1 through (0.5, gradient 0.5).
    loss, grad = batch(loss_type="bnpo", epsilon_low=0.6)
    close(loss, (-1.2 - 0.5 - 1.1 + 1.5 + 0.5) / 5)
    close(grad, t([[0.0, -0.5, -1.1], [1.5, 0.5, 0.0]]) / 5)


def test_ratio_exactly_on_a_clip_bound_keeps_the_full_unclipped_gradient():
    # clamp passes the gradient on its bounds and min splits a tie 1/2-1/2: the halves sum to the full gradient.
    logps = t([[-1.0]])
    high_ratio = math.exp(0.15)
    loss, grad = value_and_grad(
        logps,
        old=lambda lp: lp - 0.15,
        advantages=t([1.0]),
        mask=t([[1]]),
        loss_type="grpo",
        epsilon_high=high_ratio - 1,  # exact: 1 + (r - 1) == r for r in [1, 2]
    )
    close(loss, -high_ratio)
    close(grad, t([[-high_ratio]]))
    low_ratio = math.exp(-0.15)
    loss, grad = value_and_grad(
        logps,
        old=lambda lp: lp + 0.15,
        advantages=t([-1.0]),
        mask=t([[1]]),
        loss_type="grpo",
        epsilon_low=1 - low_ratio,  # exact: 1 - (1 - r) == r for r in [0.5, 1]
    )
    close(loss, low_ratio)
    close(grad, t([[low_ratio]]))
    # Just inside the clip region the gradient is zero, and a ratio on the bound is not counted as clipped.
    _, grad = value_and_grad(
        logps,
        old=lambda lp: lp - 0.15,
        advantages=t([1.0]),
        mask=t([[1]]),
        loss_type="grpo",
        epsilon_high=high_ratio - 1 - 1e-9,
    )
    close(grad, t([[0.0]]))
    fractions = clip_fractions(t([[high_ratio]]), t([1.0]), t([[1]]), 0.2, high_ratio - 1)
    close(fractions["high"], 0.0)


def test_delta_caps_the_unclipped_branch():
    # ratios [3, 1.5, 3], per-token advantages [-1, -1, +1], delta 2:
    # A<0, r=3: -min(2 * -1, 1.2 * -1) = 2, gradient 0 (3 and gradient 3 without delta);
    # A<0, r=1.5 < delta: 1.5, gradient 1.5;  A>0, r=3: -min(2, 1.2) = -1.2, gradient 0 either way.
    kwargs = dict(
        old=old_for_ratios([[3.0, 1.5, 3.0]]), advantages=t([[-1.0, -1.0, 1.0]]), mask=t([[1, 1, 1]]), loss_type="bnpo"
    )
    loss, grad = value_and_grad(t([[-1.0, -2.0, -0.5]]), delta=2.0, **kwargs)
    close(loss, (2.0 + 1.5 - 1.2) / 3)
    close(grad, t([[0.0, 1.5, 0.0]]) / 3)
    loss, grad = value_and_grad(t([[-1.0, -2.0, -0.5]]), **kwargs)
    close(loss, (3.0 + 1.5 - 1.2) / 3)
    close(grad, t([[3.0, 1.5, 0.0]]) / 3)


def test_ratio_exactly_at_delta_keeps_its_gradient():
    ratio = math.exp(0.5)
    loss, grad = value_and_grad(
        t([[-1.0]]), old=lambda lp: lp - 0.5, advantages=t([-1.0]), mask=t([[1]]), loss_type="grpo", delta=ratio
    )
    close(loss, ratio)
    close(grad, t([[ratio]]))


def test_clip_fractions_count_strictly_outside_the_bounds_on_active_tokens():
    ratio = torch.exp(log_importance_weights(LOGPS, old_for_ratios(RATIOS)(LOGPS), MASK))
    fractions = clip_fractions(ratio, ADVANTAGES, MASK, 0.2, 0.2)
    # high: row 0 token 0 (1.5, A>0); low: row 1 token 1 (0.5, A<0); row 1 token 2 (3.0) is masked.
    close(fractions["high"], 1 / 5)
    close(fractions["low"], 1 / 5)
    close(fractions["region"], 2 / 5)


# ---- importance sampling level --------------------------------------------------------------------

GSPO_LOG_RATIOS = t([[0.1, 0.3, 5.0], [-0.4, 0.0, 0.1]])
GSPO_MASK = t([[1, 1, 0], [1, 1, 1]])


def gspo(**kwargs):
    return value_and_grad(LOGPS, old=lambda lp: lp - GSPO_LOG_RATIOS, advantages=ADVANTAGES, mask=GSPO_MASK, **kwargs)


def test_sequence_level_ratio_is_the_geometric_mean_over_active_tokens():
    # Row 0: mean(0.1, 0.3) = 0.2 (the masked 5.0 is ignored), R = e^0.2 = 1.2214 > 1.2, A>0: clipped, -1.2.
    # Row 1: mean(-0.4, 0, 0.1) = -0.1, R = e^-0.1 inside the clip, A<0: loss R, dR/dlogp_t = R / 3.
    weights = log_importance_weights(LOGPS, LOGPS - GSPO_LOG_RATIOS, GSPO_MASK, "sequence")
    close(weights, t([[0.2], [-0.1]]))
    r1 = math.exp(-0.1)
    loss, grad = gspo(loss_type="grpo", importance_sampling_level="sequence")
    close(loss, (-1.2 + r1) / 2)
    close(grad, t([[0, 0, 0], [r1 / 6, r1 / 6, r1 / 6]]))
    # dapo sums the broadcast sequence loss over its tokens: each sequence weighs its length.
    loss, grad = gspo(loss_type="dapo", importance_sampling_level="sequence")
    close(loss, (2 * -1.2 + 3 * r1) / 5)
    close(grad, t([[0, 0, 0], [r1 / 5, r1 / 5, r1 / 5]]))
    # Unclipped row 0 (eps_high 0.3): loss -R0, gradient -R0 / 2 per active token, then / B.
    r0 = math.exp(0.2)
    loss, grad = gspo(loss_type="grpo", importance_sampling_level="sequence", epsilon_high=0.3)
    close(loss, (-r0 + r1) / 2)
    close(grad, t([[-r0 / 4, -r0 / 4, 0], [r1 / 6, r1 / 6, r1 / 6]]))


def test_gspo_token_has_the_sequence_value_and_a_per_token_gradient():
    # On-policy, one sequence, per-token advantages [1, 3]: every ratio is 1, loss = -mean(A) = -2.
    # sequence: dR/dlogp_u = 1/2 for both tokens, so grad_u = -mean(A) / 2 = -1;
    # sequence_token and token: grad_u = -A_u / 2.
    kwargs = dict(advantages=t([[1.0, 3.0]]), mask=t([[1, 1]]), loss_type="grpo")
    logps = t([[-1.0, -2.0]])
    for level, expected in [("sequence", [-1.0, -1.0]), ("sequence_token", [-0.5, -1.5]), ("token", [-0.5, -1.5])]:
        loss, grad = value_and_grad(logps, importance_sampling_level=level, **kwargs)
        close(loss, -2.0)
        close(grad, t([expected]))
    # Off-policy, GSPO-token's ratio value is the sequence ratio on every token.
    weights = log_importance_weights(LOGPS, LOGPS - GSPO_LOG_RATIOS, GSPO_MASK, "sequence_token")
    close(weights, t([[0.2, 0.2, 0.2], [-0.1, -0.1, -0.1]]))


def test_on_policy_ratio_is_one_with_the_gradient_kept():
    loss, grad = value_and_grad(LOGPS, advantages=ADVANTAGES, mask=MASK, loss_type="grpo")
    close(loss, (-1 + 1) / 2)
    close(grad, t([[-1 / 6, -1 / 6, -1 / 6], [1 / 4, 1 / 4, 0]]))
    same_loss, same_grad = value_and_grad(
        LOGPS, old=lambda lp: lp.clone(), advantages=ADVANTAGES, mask=MASK, loss_type="grpo"
    )
    close(same_loss, loss)
    close(same_grad, grad)


def test_zero_advantage_gives_zero_loss_and_gradient():
    for level in ["token", "sequence"]:
        loss, grad = value_and_grad(
            LOGPS,
            old=old_for_ratios(RATIOS),
            advantages=t([0.0, 0.0]),
            mask=MASK,
            loss_type="grpo",
            importance_sampling_level=level,
        )
        close(loss, 0.0)
        close(grad, torch.zeros(2, 3, dtype=F64))


# ---- masking edge cases ----------------------------------------------------------------------------


def test_all_masked_sequence_counts_as_zero_with_clamped_token_count():
    kwargs = dict(advantages=t([1.0, 5.0]), mask=t([[1, 1, 0], [0, 0, 0]]))
    # On-policy per-token losses -1 on row 0, -5 on the masked row 1 (never counted).
    expected = {"grpo": (-2 / 2 + 0 / 1) / 2, "bnpo": -2 / 2, "dapo": -2 / 2, "luspo": -2 / 2}
    for loss_type, value in expected.items():
        loss, grad = value_and_grad(LOGPS, loss_type=loss_type, **kwargs)
        close(loss, value)
        assert torch.all(grad[1] == 0)
    loss, _ = value_and_grad(LOGPS, loss_type="dr_grpo", max_completion_length=3, **kwargs)
    close(loss, -2 / (2 * 3))
    # Sequence level: the all-masked row's log-weight is 0 / clamp(0, min=1) = 0, so its ratio is 1.
    weights = log_importance_weights(LOGPS, LOGPS - 5.0, kwargs["mask"], "sequence")
    close(weights, t([[5.0], [0.0]]))


def test_fully_masked_batch_gives_zero_not_nan():
    mask = torch.zeros(2, 3, dtype=F64)
    for loss_type in ["grpo", "bnpo", "dapo", "cispo", "luspo"]:
        for level in ["token", "sequence"]:
            loss, grad = value_and_grad(
                LOGPS,
                old=old_for_ratios(RATIOS),
                advantages=ADVANTAGES,
                mask=mask,
                loss_type=loss_type,
                importance_sampling_level=level,
            )
            close(loss, 0.0)
            close(grad, torch.zeros(2, 3, dtype=F64))


# ---- CISPO ----------------------------------------------------------------------------------------


def test_cispo_is_a_detached_weight_capped_at_epsilon_high_times_logp():
    # ratios [1.5, 0.5, 6.0], A=2, epsilon_high=5 (the cap is epsilon_high itself, no lower bound):
    # per-token loss -min(r, 5) * A * logp = [3, 2, 5]; dapo-style mean over 3 tokens.
    logps = t([[-1.0, -2.0, -0.5]])
    loss, grad = value_and_grad(
        logps,
        old=old_for_ratios([[1.5, 0.5, 6.0]]),
        advantages=t([2.0]),
        mask=t([[1, 1, 1]]),
        loss_type="cispo",
        epsilon_high=5.0,
    )
    close(loss, (3.0 + 2.0 + 5.0) / 3)
    close(grad, t([[-3.0, -1.0, -10.0]]) / 3)
    # On-policy it is REINFORCE: -A * mean(logp), gradient -A / n.
    loss, grad = value_and_grad(logps, advantages=t([2.0]), mask=t([[1, 1, 0]]), loss_type="cispo", epsilon_high=5.0)
    close(loss, -2.0 * (-1.0 - 2.0) / 2)
    close(grad, t([[-1.0, -1.0, 0.0]]))


# ---- KL -------------------------------------------------------------------------------------------

KL_LOGPS = t([[-1.0, -2.0]])
KL_REF = t([[-1.5, -1.0]])
KL_D = t([[-0.5, 1.0]])  # ref - logp


def test_kl_estimators_match_their_closed_forms_and_gradients():
    close(kl_estimate(KL_LOGPS, KL_REF, "k1"), t([[0.5, -1.0]]))
    close(kl_estimate(KL_LOGPS, KL_REF, "k2"), t([[0.125, 0.5]]))
    close(kl_estimate(KL_LOGPS, KL_REF, "k3"), t([[math.exp(-0.5) - 0.5, math.e - 2.0]]))
    logps = KL_LOGPS.clone().requires_grad_(True)
    for estimator, expected in [("k1", torch.ones(1, 2)), ("k2", -KL_D), ("k3", 1 - torch.exp(KL_D))]:
        (grad,) = torch.autograd.grad(kl_estimate(logps, KL_REF, estimator).sum(), logps)
        close(grad, expected)


def test_beta_adds_k3_per_token_before_aggregation():
    k3 = t([[math.exp(-0.5) - 0.5, math.e - 2.0]])
    kwargs = dict(advantages=t([0.0]), mask=t([[1, 1]]), loss_type="grpo", beta=0.1, ref_per_token_logps=KL_REF)
    # Plain k3: gradient beta * (1 - exp(d)) / n.
    loss, grad = value_and_grad(KL_LOGPS, use_bias_correction_kl=False, **kwargs)
    close(loss, 0.1 * k3.mean())
    close(grad, 0.1 * (1 - torch.exp(KL_D)) / 2)
    # TRL's default bias correction multiplies by the differentiable ratio (1 on-policy): same value, and the
    # gradient becomes beta * (r (1 - exp(d)) + k3 r) = beta * (logp - ref), the exact reverse-KL gradient.
    loss, grad = value_and_grad(KL_LOGPS, **kwargs)
    close(loss, 0.1 * k3.mean())
    close(grad, 0.1 * -KL_D / 2)
    # Off-policy (ratios [3, 0.5]), the ratio scales both, and delta does not cap it.
    ratios = t([[3.0, 0.5]])
    loss, grad = value_and_grad(KL_LOGPS, old=old_for_ratios(ratios), delta=2.0, **kwargs)
    close(loss, 0.1 * (k3 * ratios).mean())
    close(grad, 0.1 * ratios * (1 - torch.exp(KL_D) + k3) / 2)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        value_and_grad(KL_LOGPS, advantages=t([0.0]), mask=t([[1, 1]]), loss_type="grpo", beta=0.1)


# ---- entropy quantile -----------------------------------------------------------------------------

ENTROPIES = t([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])


def test_entropy_threshold_is_the_linear_quantile_of_active_tokens():
    # Active entropies sorted [0.1, 0.3, 0.5, 0.7, 0.9]; quantile 1 - 0.4 = 0.6 sits at 0.6 * 4 = 2.4:
    # 0.5 + 0.4 * (0.7 - 0.5) = 0.58, so 0.7 and 0.9 survive (the masked 5.0 neither counts nor survives).
    close(high_entropy_mask(ENTROPIES, MASK, 0.4).to(F64), t([[0, 0, 1], [0, 1, 0]]))
    close(high_entropy_mask(ENTROPIES, MASK, 0.0).to(F64), t([[0, 0, 1], [0, 0, 0]]))
    close(high_entropy_mask(ENTROPIES, MASK, 1.0).to(F64), MASK)
    # Ties with the threshold are kept; no active token keeps nothing.
    close(high_entropy_mask(t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]]), 0.1).to(F64), t([[1, 1, 1]]))
    assert not high_entropy_mask(ENTROPIES, torch.zeros(2, 3), 0.4).any()


def test_entropy_mask_zeroes_the_policy_term_only_and_keeps_the_normalizer():
    # On-policy per-token losses [[-1]*3, [1]*3]; kept tokens (0, 2) and (1, 1); grpo still divides by 3 and 2.
    kwargs = dict(advantages=ADVANTAGES, mask=MASK, entropies=ENTROPIES, top_entropy_quantile=0.4)
    loss, grad = value_and_grad(LOGPS, loss_type="grpo", **kwargs)
    close(loss, (-1 / 3 + 1 / 2) / 2)
    close(grad, t([[0, 0, -1 / 6], [0, 1 / 4, 0]]))
    # The KL term is added after the entropy mask, on every active token.
    loss, _ = value_and_grad(
        LOGPS, loss_type="bnpo", beta=0.5, ref_per_token_logps=LOGPS - 1.0, use_bias_correction_kl=False, **kwargs
    )
    k3 = math.exp(-1.0) + 1.0 - 1.0
    close(loss, (-1 + 1 + 5 * 0.5 * k3) / 5)
    with pytest.raises(ValueError, match="entropies"):
        value_and_grad(LOGPS, advantages=ADVANTAGES, mask=MASK, loss_type="grpo", top_entropy_quantile=0.4)


# ---- Fast-LLM ---------------------------------------------------------------------------------------


def random_batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(3, 5, generator=generator, dtype=F64) * 3
    old = logps - (torch.rand(3, 5, generator=generator, dtype=F64) - 0.5)
    advantages = torch.randn(3, generator=generator, dtype=F64)
    mask = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    return logps, old, advantages, mask


def both_grads(trl_kwargs, fast_llm_kwargs, seed=0):
    logps, old, advantages, mask = random_batch(seed)
    results = []
    for compute in (
        lambda lp: grpo_loss(lp, old, advantages, mask, **trl_kwargs),
        lambda lp: fast_llm_policy_gradient_loss(lp, old, advantages, mask, **fast_llm_kwargs),
    ):
        leaf_logps = logps.clone().requires_grad_(True)
        loss = compute(leaf_logps)
        results.append((loss.detach(), torch.autograd.grad(loss, leaf_logps)[0]))
    return results


def test_fast_llm_grpo_is_trl_dapo_at_token_level():
    (trl_loss, trl_grad), (fast_loss, fast_grad) = both_grads(dict(loss_type="dapo"), {})
    close(fast_loss, trl_loss)
    close(fast_grad, trl_grad)


def test_fast_llm_gspo_is_trl_luspo_at_sequence_level_not_trl_grpo():
    (trl_loss, trl_grad), (fast_loss, fast_grad) = both_grads(
        dict(loss_type="luspo", importance_sampling_level="sequence"), dict(importance_sampling_level="sequence")
    )
    close(fast_loss, trl_loss)
    close(fast_grad, trl_grad)
    (grpo_loss_value, _), _ = both_grads(
        dict(loss_type="grpo", importance_sampling_level="sequence"), dict(importance_sampling_level="sequence")
    )
    assert not torch.isclose(grpo_loss_value, fast_loss)
