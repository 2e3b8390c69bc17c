"""Methods beyond the training core: feature extraction, Mixture of Agents, RL (reward model, PPO, DPO, GRPO)."""
