"""The RL trainers' settings, and so their defaults, in one place that imports without torch.

The stages (``kubetune.stages.reward_model``, ``dpo``, ``ppo``) take their field defaults from
these records and build them for the trainers, so a default is stated once. The values are
sized for a ~100M model on a few CPU cores, the pipelines' default runs; where a field follows
TRL's trainer, its note says so. ``PolicySampling`` holds what PPO and GRPO share: how the
policy samples its rollouts and how its LoRA adapter is shaped.
"""

from __future__ import annotations

from dataclasses import dataclass

# Learning rates of a ~100M model: the LoRA adapter takes a larger step than the whole model.
LORA_LEARNING_RATE = 1e-4
DPO_FULL_LEARNING_RATE = 5e-6
REWARD_FULL_LEARNING_RATE = 5e-5


@dataclass
class PolicySampling:
    """Rollout sampling and the policy's LoRA adapter, shared by PPO and GRPO."""

    max_new_tokens: int = 48
    """Response length cap in tokens (three short bullets or a ticket's JSON fit in ~30)."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed at the same temperature. TRL's PPO default
    0.7: at 1.0 a ~100M model's samples are often incoherent, and the reward model then scores
    noise (a policy trained so lost reward on held-out prompts, its entropy rising from 3.3 to
    4.1 nats per token)."""
    max_prompt_length: int = 256
    """Prompts are left-truncated to this many tokens."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (update scaled by alpha / r)."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters; add "lm_head" to also adapt the output layer."""
    num_samples_to_log: int = 4
    """Generations kept per logged update for the MLflow table."""
    seed: int = 0
    """Seed of prompt order, sampling and the adapter init."""

    def _check_sampling(self, name: str) -> None:
        for field_name in ("max_new_tokens", "lora_r"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{name}.{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.temperature <= 0:
            raise ValueError(f"{name}.temperature must be > 0, got {self.temperature}")


@dataclass
class PPOConfig(PolicySampling):
    """Settings of the PPO trainer (``kubetune.methods.rl.ppo``). Defaults follow TRL's PPO where
    one existed, sized down for CPU where noted."""

    steps: int = 12
    """PPO updates; each is one rollout batch followed by ``ppo_epochs`` passes over it."""
    batch_size: int = 8
    """Prompts (and so responses) per rollout."""
    mini_batch_size: int = 4
    """Responses per optimizer step inside an update."""
    ppo_epochs: int = 2
    """Passes over each rollout batch (TRL: 4; 2 halves the CPU time)."""
    learning_rate: float = LORA_LEARNING_RATE
    """AdamW learning rate of the adapter and value head."""
    kl_coef: float = 0.05
    """β, the weight of the per-token KL penalty (its initial value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt β toward ``target_kl`` (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """Target KL per response (nats) of the adaptive controller (TRL: 6)."""
    kl_horizon: int = 10000
    """Horizon (samples) of the adaptive controller (TRL: 10000)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: "k1" (log-ratio) or "k3" (never negative)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    cliprange: float = 0.2
    """ε of the clipped policy loss."""
    cliprange_value: float = 0.2
    """ε of the clipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (TRL: 0.1)."""
    whiten_rewards: bool = False
    """Scale-normalise the per-token rewards of each batch before GAE."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that hit ``max_new_tokens`` without EOS."""
    use_peft: bool = True
    """LoRA policy with the adapter-disabled base as reference (False: full + deep copy)."""

    def __post_init__(self):
        self._check_sampling("PPOConfig")
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"PPOConfig.batch_size ({self.batch_size}) must be a multiple of "
                f"mini_batch_size ({self.mini_batch_size})"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"PPOConfig.kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")


@dataclass
class DPOConfig:
    """Settings of the DPO trainer (``kubetune.methods.rl.dpo``)."""

    use_peft: bool = True
    """Train LoRA adapters (reference = adapter disabled) instead of the full model."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters."""
    beta: float = 0.1
    """β of the DPO loss: larger keeps the policy closer to the reference (TRL: 0.1)."""
    learning_rate: float = 0.0
    """AdamW learning rate; 0 = ``lr()``: 1e-4 for LoRA, 5e-6 for the full model (a ~100M model)."""
    epochs: float = 1.0
    """Passes over the training pairs when ``max_steps`` is -1."""
    max_steps: int = 30
    """Stop after this many optimizer steps (-1: run the epochs)."""
    batch_size: int = 4
    """Pairs per optimizer step."""
    sft_weight: float = 1.0
    """Weight of a negative log-likelihood term on the chosen response added to the DPO loss
    (RPO, Pang et al. 2024; TRL's ``loss_type=["sigmoid", "sft"]``); 0 = plain DPO. The dpo
    pipeline has no SFT step before DPO, and without this term DPO mostly lowers the rejected
    answers' likelihood while sampled answers barely change."""
    max_length: int = 512
    """Sequences are truncated to this many tokens."""
    seed: int = 0
    """Seed of data order (and adapter init)."""

    def __post_init__(self):
        for name in ("beta", "epochs", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.learning_rate < 0 or self.sft_weight < 0:
            raise ValueError(f"DPOConfig.learning_rate and sft_weight must be >= 0, got {self.learning_rate}, "
                             f"{self.sft_weight}")

    def lr(self) -> float:
        """The learning rate to train at (``learning_rate``, or the default of LoRA or full tuning)."""
        return self.learning_rate or (LORA_LEARNING_RATE if self.use_peft else DPO_FULL_LEARNING_RATE)


@dataclass
class RewardModelConfig:
    """Settings of the reward-model trainer (``kubetune.methods.rl.reward``)."""

    use_peft: bool = False
    """Train LoRA adapters (+ the new score head) instead of the full backbone."""
    lora_r: int = 16
    """LoRA rank, when ``use_peft``."""
    lora_alpha: int = 32
    """LoRA scaling numerator (update scaled by alpha / r), when ``use_peft``."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters, when ``use_peft``."""
    learning_rate: float = 0.0
    """AdamW learning rate; 0 = ``lr()``: 5e-5 for the full backbone, 1e-4 for LoRA (a ~100M model)."""
    epochs: float = 1.0
    """Passes over the training pairs when ``max_steps`` is -1."""
    max_steps: int = 24
    """Stop after this many optimizer steps (-1: run the epochs)."""
    batch_size: int = 4
    """Pairs per optimizer step (each pair is two sequences)."""
    max_length: int = 512
    """Pairs whose chosen or rejected sequence is longer than this (tokens) are dropped."""
    seed: int = 0
    """Seed for the head initialisation and data order."""

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RewardModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.learning_rate < 0:
            raise ValueError(f"RewardModelConfig.learning_rate must be >= 0, got {self.learning_rate}")

    def lr(self) -> float:
        """The learning rate to train at (``learning_rate``, or the default of LoRA or full tuning)."""
        return self.learning_rate or (LORA_LEARNING_RATE if self.use_peft else REWARD_FULL_LEARNING_RATE)


__all__ = ["DPOConfig", "PPOConfig", "PolicySampling", "RewardModelConfig"]
