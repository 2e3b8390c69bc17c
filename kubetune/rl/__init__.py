"""RLHF: a pairwise reward model, a compact PPO on transformers/PEFT, and DPO.

Modules: ``reward`` (TRL RewardTrainer), ``ppo_core`` (PPO arithmetic, pure torch),
``ppo`` (rollouts and updates), ``dpo`` (TRL DPOTrainer), ``compare`` (policy vs reference:
reward, win rate, KL). Import the module you need; nothing heavy is imported here.
"""
