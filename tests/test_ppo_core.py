"""PPO arithmetic against values worked out by hand (the working is in each comment)."""

from __future__ import annotations

import math

import pytest
import torch

from kubetune.methods.rl.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=tol, rtol=0)


# --- GAE ----------------------------------------------------------------------------------


def test_gae_full_mask_by_hand():
    # γ=1, λ=0.5, r=[0,0,1], V=[.5,.4,.3], V after the end = 0
    # t=2: δ=1+0-.3=.7             A=.7
    # t=1: δ=0+.3-.4=-.1           A=-.1+.5·.7=.25
    # t=0: δ=0+.4-.5=-.1           A=-.1+.5·.25=.025
    adv, ret = compute_gae(t([[0, 0, 1]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    close(adv, [[0.025, 0.25, 0.7]])
    close(ret, [[0.525, 0.65, 1.0]])  # A + V


def test_gae_ignores_padding_and_bootstraps_zero_at_eos():
    # mask [1,1,0]: the padded reward 5 and value 9 must not leak in.
    # t=1 is the last real token: δ=1+0-.4=.6, A=.6; t=0: δ=0+.4-.5=-.1, A=-.1+.5·.6=.2
    adv, ret = compute_gae(t([[0, 1, 5]]), t([[0.5, 0.4, 9]]), t([[1, 1, 0]]), gamma=1.0, lam=0.5)
    close(adv, [[0.2, 0.6, 0.0]])
    close(ret, [[0.7, 1.0, 0.0]])


def test_gae_discount():
    # γ=.9, λ=1, V=0: A1=2, A0=1+.9·2=2.8 (Monte-Carlo discounted return)
    adv, _ = compute_gae(t([[1, 2]]), t([[0, 0]]), t([[1, 1]]), gamma=0.9, lam=1.0)
    close(adv, [[2.8, 2.0]])


# --- whitening ----------------------------------------------------------------------------


def test_whiten_by_hand():
    # x=[1,2,3,4]: μ=2.5, unbiased σ²=(2.25+.25+.25+2.25)/3=5/3, σ=1.290994
    out = masked_whiten(t([[1, 2, 3, 4]]), t([[1, 1, 1, 1]]))
    s = math.sqrt(5 / 3)
    close(out, [[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]], tol=1e-6)


def test_whiten_masked_and_keep_mean():
    # masked x=[1,2,3]: μ=2, unbiased σ²=(1+0+1)/2=1 -> [-1,0,1]; the 100 is ignored
    x, m = t([[1, 2, 3, 100]]), t([[1, 1, 1, 0]])
    close(masked_whiten(x, m)[:, :3], [[-1, 0, 1]], tol=1e-6)
    close(masked_whiten(x, m, shift_mean=False)[:, :3], [[1, 2, 3]], tol=1e-6)
    close(masked_mean(x, m), 2.0)
    close(masked_var(x, m), 1.0)
    close(masked_var(x, m, unbiased=False), 2 / 3)


# --- losses -------------------------------------------------------------------------------


def test_clipped_policy_loss_by_hand_with_gradients():
    # ε=.2, ρ=[1.5, .5, 1.1, 1.5], A=[1, 1, -1, -1]
    # tok0: max(-1.5, -1.2)=-1.2 (clipped wins, no gradient)
    # tok1: max(-.5, -.8)=-.5      tok2: max(1.1, 1.1)=1.1      tok3: max(1.5, 1.2)=1.5
    # loss=(-1.2-.5+1.1+1.5)/4=.225, clipfrac=1/4
    ratio = t([[1.5, 0.5, 1.1, 1.5]])
    logprobs = ratio.log().clone().requires_grad_(True)
    loss, clipfrac = clipped_policy_loss(logprobs, torch.zeros_like(ratio), t([[1, 1, -1, -1]]), t([[1, 1, 1, 1]]), 0.2)
    close(loss, 0.225)
    close(clipfrac, 0.25)
    loss.backward()
    # d/dlogπ of -A·ρ/4 is -A·ρ/4: [0 (clipped), -.5/4, 1.1/4, 1.5/4]
    close(logprobs.grad, [[0.0, -0.125, 0.275, 0.375]])


def test_clipped_policy_loss_ignores_masked_tokens():
    ratio = t([[1.0, 50.0]])
    loss, clipfrac = clipped_policy_loss(ratio.log(), torch.zeros_like(ratio), t([[2.0, 1.0]]), t([[1, 0]]), 0.2)
    close(loss, -2.0)  # only token 0: -A·ρ = -2
    close(clipfrac, 0.0)


def test_clipped_value_loss_by_hand():
    # ε_v=.2; tok0: V=1, V_old=.5 -> V_clip=.7, R=1: max(0, .09)=.09 (clipped)
    #          tok1: V=0, V_old=0, R=1: max(1, 1)=1
    # loss=½·(.09+1)/2=.2725, clipfrac=.5
    loss, clipfrac = clipped_value_loss(t([[1.0, 0.0]]), t([[0.5, 0.0]]), t([[1.0, 1.0]]), t([[1, 1]]), 0.2)
    close(loss, 0.2725)
    close(clipfrac, 0.5)


# --- KL -----------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # π=.5, π_ref=.25: log r = log(.25/.5) = -ln 2;  k1 = ln 2 = .693147;  k3 = (.5-1)+ln 2 = .193147
    # π=.25, π_ref=.5: log r = ln 2;                 k1 = -ln 2;          k3 = (2-1)-ln 2 = .306853
    lp, ref = t([[math.log(0.5), math.log(0.25)]]), t([[math.log(0.25), math.log(0.5)]])
    close(kl_penalty(lp, ref, "k1"), [[math.log(2), -math.log(2)]])
    close(kl_penalty(lp, ref, "k3"), [[-0.5 + math.log(2), 1 - math.log(2)]])
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    close(kl_penalty(lp, lp, "k3"), [[0.0, 0.0]])
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k2")


def test_per_token_rewards_put_score_on_last_response_token():
    # β=.5: non-score = -.5·KL on unmasked tokens; the score lands on the last unmasked token
    rewards, non_score = per_token_rewards(
        t([2.0, -1.0]), t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]), t([[1, 1, 1], [1, 1, 0]]), kl_coef=0.5
    )
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]])
    close(rewards, [[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0]])


def test_adaptive_kl_controller_by_hand():
    # β=.1, target 6, horizon 10000, 1000 samples per update: n/H = .1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 1000)  # e = clip(9/6-1=.5) = .2 -> β = .1·(1+.02) = .102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, 1000)  # e = clip(-.5) = -.2 -> β = .102·.98 = .09996
    assert ctl.value == pytest.approx(0.09996)
    ctl.update(6.6, 1000)  # e = .1 (inside the clip) -> β·1.01
    assert ctl.value == pytest.approx(0.09996 * 1.01)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


# --- logits -------------------------------------------------------------------------------


def test_entropy_and_logprobs_by_hand():
    # uniform over 4 -> ln 4; p=[.25,.75] -> -(.25 ln .25 + .75 ln .75) = .562335
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf]]])
    close(entropy_from_logits(logits), [[math.log(4), 0.5623351446]], tol=1e-6)
    close(logprobs_from_logits(logits, torch.tensor([[2, 1]])), [[math.log(0.25), math.log(0.75)]])
