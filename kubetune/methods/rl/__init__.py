"""RL for LLMs: a pairwise reward model, a compact PPO on transformers/PEFT, DPO and GRPO.

Modules: ``reward`` (TRL RewardTrainer), ``ppo_core`` (PPO arithmetic, pure torch),
``ppo`` (rollouts and updates), ``dpo`` (TRL DPOTrainer), ``grpo`` (group-relative policy
optimization), ``rewards`` (GRPO's rewards: verifiable checks, the reward model, user
functions), ``compare`` (policy vs reference: reward, win rate, KL). Import the module you need; nothing heavy is imported here.
"""
