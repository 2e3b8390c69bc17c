"""The arithmetic of PPO for language models, as pure functions over tensors.

Nothing here knows about models or tokenizers, so every piece is unit-tested against values
worked out by hand (tests/test_ppo_core.py). The recipe is the one of Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences", openai/lm-human-preferences) and
Stiennon et al. 2020, as TRL implemented it before removing its PPO trainer in 1.13:
``trl/trainer/ppo_trainer.py`` and ``trl/core.py`` (TRL 0.x, ``loss``/``compute_rewards``/
``masked_whiten``/``AdaptiveKLController``) and the PPOv2 rewrite (TRL 0.11-1.12,
``trl/trainer/ppo_trainer.py``, k1/k3 estimators and end-of-response reward placement).

Conventions: tensors are ``(batch, response_length)``; ``mask`` is 1.0 on response tokens
(up to and including the EOS token) and 0.0 on padding after them. A masked position never
contributes to a mean, a variance, a loss or a bootstrapped value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rollout_tokenizer(policy_path):
    """The policy's tokenizer set up for sampling: padding and truncation on the left, since
    generation continues from the right edge; EOS pads when the model has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.truncation_side = "left"
    return tok


# ---------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1: ``Σ m·x / Σ m``.

    Args:
        values: Any shape.
        mask: Same shape as ``values``, 0/1 (bool or float).
        dim: Reduce only this dimension; ``None`` reduces everything.

    Returns:
        The masked mean (a scalar if ``dim`` is None).
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions, with Bessel's correction ``n / (n - 1)`` by default.

    TRL's ``masked_var`` applies the same correction; with whitening over a few hundred
    tokens the difference is small, but the unit tests pin it down.

    Args:
        values: Any shape.
        mask: Same shape, 0/1.
        unbiased: Multiply by ``n / (n - 1)`` where ``n = Σ m``.

    Returns:
        A scalar tensor.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked values for the unbiased estimate, got {int(n)}")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whitening: ``(x - μ) / sqrt(σ² + 1e-8)`` with μ, σ² the masked mean and unbiased variance.

    With ``shift_mean=False`` the mean is added back, ``(x - μ)/σ + μ``: only the scale is
    normalised. TRL uses that for rewards (``whiten_rewards``), since shifting a reward's mean
    changes the optimum when episodes have different lengths.

    Args:
        values: ``(batch, T)``.
        mask: ``(batch, T)``, 0/1.
        shift_mean: Leave the result with mean 0 (True) or with the input's mean (False).

    Returns:
        Whitened values; masked positions hold meaningless numbers, callers mask them again.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ---------------------------------------------------------------------------------------
# Log-probabilities and entropy


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position.

    Args:
        logits: ``(batch, T, vocab)``, already divided by the sampling temperature.
        tokens: ``(batch, T)`` token ids whose log-probability is wanted.

    Returns:
        ``(batch, T)``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position.

    ``H = -Σ p log p = logsumexp(z) - Σ softmax(z)·z`` (the second form avoids ``log 0``;
    TRL's ``entropy_from_logits`` uses it too). Tokens with ``z = -inf`` (masked out of the
    vocabulary) have ``p = 0`` and contribute 0, not ``0·-inf = nan``.

    Args:
        logits: ``(..., vocab)``.

    Returns:
        ``(...)`` entropies in nats.
    """
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    p_times_z = torch.where(p > 0, p * logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - p_times_z.sum(-1)


# ---------------------------------------------------------------------------------------
# KL penalty and the per-token reward


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from log-probabilities of tokens sampled from π.

    With ``log r = log π_ref(a) - log π(a)`` (http://joschu.net/blog/kl-approx.html):

    - ``k1 = -log r``: unbiased, can be negative on a single token, high variance.
    - ``k3 = (r - 1) - log r``: unbiased and never negative, lower variance.

    Args:
        logprobs: ``(batch, T)`` log π of the sampled tokens.
        ref_logprobs: ``(batch, T)`` log π_ref of the same tokens.
        estimator: ``"k1"`` or ``"k3"``.

    Returns:
        ``(batch, T)`` per-token KL estimates (unmasked).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RLHF reward: ``r_t = -β·KL_t`` on every response token, plus the score on the last.

    The reward model judges the whole response, so its score is paid once, on the final
    unmasked token (TRL 0.x ``compute_rewards``: ``reward[last_non_masked_index] += score``).

    Args:
        scores: ``(batch,)`` sequence-level scores.
        kl: ``(batch, T)`` per-token KL estimates.
        mask: ``(batch, T)`` response mask; every row needs at least one unmasked token.
        kl_coef: β.

    Returns:
        ``(rewards, non_score_rewards)``, both ``(batch, T)`` and zero on masked positions.
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    lengths = mask.sum(1).long()
    if (lengths == 0).any():
        raise ValueError("every response needs at least one unmasked token to receive its score")
    rewards[torch.arange(len(scores)), lengths - 1] += scores.to(rewards.dtype)
    return rewards, non_score


# ---------------------------------------------------------------------------------------
# Advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the response.

    ``δ_t = r_t + γ·V_{t+1} - V_t`` and ``A_t = δ_t + γλ·A_{t+1}``, with ``V`` and ``r`` zeroed
    on masked positions so the value after the last response token is 0 (the episode ends at
    EOS), exactly TRL 0.x's ``loss``. Returns are ``A_t + V_t``, the value target.

    Args:
        rewards: ``(batch, T)`` per-token rewards.
        values: ``(batch, T)`` value estimates from the rollout (detached).
        mask: ``(batch, T)`` response mask, 1s then 0s in each row.
        gamma: Discount γ; 1.0 as in TRL (responses are short, no need to discount).
        lam: GAE λ; 0.95 as in TRL.

    Returns:
        ``(advantages, returns)``, both ``(batch, T)``, not yet whitened.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------
# Losses


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), to be minimised.

    ``ρ = exp(log π - log π_old)``;
    ``L = mean_masked( max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) )``.
    The clip fraction is the share of tokens where the clipped term won (the gradient there
    is zero), the usual health signal: near 0 means updates are tiny, above ~0.3 too large.

    Args:
        logprobs: ``(batch, T)`` log π under the parameters being optimised (with grad).
        old_logprobs: ``(batch, T)`` log π at rollout time (no grad).
        advantages: ``(batch, T)`` (whitened, no grad).
        mask: ``(batch, T)``.
        cliprange: ε.

    Returns:
        ``(loss, clipfrac)`` scalars.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: the new value may move at most ε_v from the rollout value.

    ``V_clip = clip(V, V_old - ε_v, V_old + ε_v)``;
    ``L = ½·mean_masked( max((V - R)², (V_clip - R)²) )`` (TRL 0.x and PPOv2 alike).

    Args:
        values: ``(batch, T)`` current value predictions (with grad).
        old_values: ``(batch, T)`` rollout values.
        returns: ``(batch, T)`` targets from :func:`compute_gae`.
        mask: ``(batch, T)``.
        cliprange_value: ε_v.

    Returns:
        ``(loss, clipfrac)`` scalars.
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clipfrac


# ---------------------------------------------------------------------------------------
# KL coefficient controllers


@dataclass
class FixedKLController:
    """β stays where it was set."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op, kept so both controllers share one call site."""


@dataclass
class AdaptiveKLController:
    """Proportional controller on β (Ziegler et al. 2019, section 2.2).

    ``e = clip(KL / KL_target - 1, -0.2, 0.2)``; ``β ← β·(1 + e·n_steps / horizon)``.
    β grows while the measured KL is above target and shrinks while below; the clip keeps
    one noisy batch from moving β by more than 20% of ``n_steps / horizon``.

    Attributes:
        value: Current β.
        target: Target KL per response (nats, summed over tokens).
        horizon: Number of samples over which β may change by a factor of about e^0.2.
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after a batch of ``n_steps`` samples whose mean KL was ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
