"""Stage `ppo`: reinforcement learning from the reward model (the RL half of RLHF).

The policy starts from the instruction-tuned (SFT) model; it is a LoRA adapter on it, and the
reference is the same model with the adapter disabled (no second copy). Each update samples
responses to a batch of rollout prompts, scores them with the reward model, subtracts a KL
penalty to the reference (fixed or adaptive β), computes GAE advantages (whitened) from a value
head and takes clipped policy and value steps (``kubetune.methods.rl.ppo``, our compact PPO: TRL removed
its PPO trainer in 1.13). Logged per update: mean reward, KL, entropy, clip fraction, value
loss, response length; sample generations as an MLflow table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.core.config import setting
from kubetune.errors import ConfigError
from kubetune.methods.rl.settings import PPOConfig as TrainerSettings
from kubetune.tracking import RunContext, log_metrics, maybe_stage

_TRAINER = TrainerSettings()  # the defaults below are the trainer's, stated once in kubetune.methods.rl.settings


@dataclass
class PPOConfig:
    prompts_uri: str = setting("bundled://rollout_prompts", "JSONL of {\"prompt\": ...} rows to roll out on.")
    steps: int = setting(_TRAINER.steps, "PPO updates (each: one rollout batch, then ppo_epochs passes over it).")
    batch_size: int = setting(_TRAINER.batch_size, "Prompts (responses) per rollout.")
    mini_batch_size: int = setting(_TRAINER.mini_batch_size, "Responses per optimizer step inside an update; divides batch_size.")
    ppo_epochs: int = setting(_TRAINER.ppo_epochs, "Passes over each rollout batch (TRL's default is 4; 2 halves CPU time).")
    learning_rate: float = setting(_TRAINER.learning_rate, "AdamW learning rate of the LoRA adapter and the value head.")
    max_new_tokens: int = setting(_TRAINER.max_new_tokens, "Response length cap in tokens (3 short bullets fit in ~30).")
    temperature: float = setting(
        _TRAINER.temperature, "Sampling temperature of rollouts (log-probs use the same). TRL's default 0.7: at 1.0 a "
                              "~100M model's samples are often incoherent, and the reward model then scores noise.")
    kl_coef: float = setting(_TRAINER.kl_coef, "β of the per-token KL penalty to the reference (initial value if adaptive).")
    adaptive_kl: bool = setting(_TRAINER.adaptive_kl, "Adapt β toward target_kl (Ziegler et al. 2019) instead of keeping it fixed.")
    target_kl: float = setting(_TRAINER.target_kl, "Target KL per response (nats) of the adaptive controller (TRL: 6).")
    whiten_rewards: bool = setting(_TRAINER.whiten_rewards, "Scale-normalise per-token rewards of each batch before GAE.")
    cliprange: float = setting(_TRAINER.cliprange, "ε of the clipped policy loss.")
    vf_coef: float = setting(_TRAINER.vf_coef, "Weight of the value loss (TRL: 0.1).")
    lora_rank: int = setting(_TRAINER.lora_r, "LoRA rank of the policy adapter.")
    target_modules: str = setting(_TRAINER.lora_target_modules, "Layers that get LoRA: 'all-linear' or 'q_proj,v_proj,lm_head'.")
    seed: int = setting(_TRAINER.seed, "Seed of prompt order, sampling and the value head.")

    def __post_init__(self):
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"'batch_size' ({self.batch_size}) must be a multiple of 'mini_batch_size' "
                              f"({self.mini_batch_size})")
        if not 0 < self.learning_rate <= 1:
            raise ConfigError(f"'learning_rate' must be in (0, 1], got {self.learning_rate}")
        for name in ("temperature", "target_kl", "cliprange"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"'{name}' must be > 0, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ConfigError("'kl_coef' and 'vf_coef' must be >= 0")

    def trainer_settings(self) -> TrainerSettings:
        """The trainer's settings: these fields, the rest at the trainer's defaults."""
        modules = self.target_modules if self.target_modules == "all-linear" else \
            [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return TrainerSettings(steps=self.steps, batch_size=self.batch_size, mini_batch_size=self.mini_batch_size,
                        ppo_epochs=self.ppo_epochs, learning_rate=self.learning_rate,
                        max_new_tokens=self.max_new_tokens, temperature=self.temperature, kl_coef=self.kl_coef,
                        adaptive_kl=self.adaptive_kl, target_kl=self.target_kl, whiten_rewards=self.whiten_rewards,
                        cliprange=self.cliprange, vf_coef=self.vf_coef, lora_r=self.lora_rank,
                        lora_alpha=2 * self.lora_rank, lora_target_modules=modules, seed=self.seed)


@dataclass
class PPOStageResult:
    metrics: dict
    history: list[dict]
    output_dir: str


def ppo(cfg: PPOConfig, policy: str | Path, reward_model_dir: str | Path, output_dir: str | Path,
        ctx: RunContext | None = None, preferences_dir: str | Path | None = None) -> PPOStageResult:
    """Tune the SFT policy with PPO against the reward model.

    Args:
        cfg: Stage settings.
        policy: The SFT policy: a training stage's output folder (its ``merged/`` model is used),
            a model folder, or a model reference.
        reward_model_dir: Output of ``reward_model``.
        output_dir: Where the policy (LoRA merged: a plain causal LM), tokenizer, value head,
            ``ppo_history.json`` and ``kubetune_method.json`` are written.
        ctx: When given, logs to an MLflow child run named ``ppo``.
        preferences_dir: The ingested preference data the policy will be judged on: rollout
            prompts that repeat its held-out prompts or topics are left out.

    Returns:
        Summary metrics (reward first/last update, KL, seconds), per-update history, the folder.
    """
    from kubetune.methods.rl.data import load_pairs, load_prompts, policy_folder
    from kubetune.methods.rl.ppo import train_ppo

    output_dir = Path(output_dir)
    held_out = load_pairs(preferences_dir)[2] if preferences_dir else []
    prompts = load_prompts(cfg.prompts_uri, output_dir.parent / ".prompts-cache", held_out)
    policy_path = policy_folder(policy)
    sft_manifest = _manifest(Path(str(policy)))
    base_model = sft_manifest.get("base_model") or str(policy)
    tags = {"kubetune.method": "ppo", "kubetune.base_model": base_model}
    with maybe_stage(ctx, "ppo", params={**asdict(cfg), "policy": str(policy)}, tags=tags) as run:
        if run is not None:
            log_metrics({"rollout_prompts": len(prompts)})
        log = (lambda stats, update: log_metrics(stats, step=update)) if run is not None else None
        result = train_ppo(policy_path, prompts, reward_model_dir, cfg.trainer_settings(), output_dir, log_fn=log)
        manifest = {"method": "ppo", "settings": asdict(cfg), "base_model": base_model,
                    # No data_fingerprint: the SFT view's is not the preference data's; register takes
                    # the one evaluate_policy reports (the preference data the policy is judged on).
                    "sft_policy": str(policy),
                    "metrics": result.metrics}
        (output_dir / "kubetune_method.json").write_text(json.dumps(manifest, indent=2))
        if run is not None:
            import mlflow

            log_metrics({f"summary_{k}": v for k, v in result.metrics.items()})
            if result.samples:
                mlflow.log_table({k: [s[k] for s in result.samples] for k in result.samples[0]},
                                 "ppo_samples.json")
    return PPOStageResult(metrics=result.metrics, history=result.history, output_dir=str(output_dir))


def _manifest(folder: Path) -> dict:
    path = folder / "kubetune_method.json"
    return json.loads(path.read_text()) if path.exists() else {}
