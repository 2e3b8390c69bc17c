"""Stage `grpo`: reinforcement learning with verifiable rewards and/or a reward model (GRPO).

The policy starts from the SFT model (or the base model) as a LoRA adapter; the reference is
the same model with the adapter disabled. Each step samples ``num_generations`` completions
for each of ``prompts_per_step`` training prompts, scores them with the weighted rewards
(``kubetune.methods.rl.rewards``: exact match or JSON fields against the dataset's reference answer, a
regex format, a length penalty, a reward model, user functions by import path), turns the
rewards into group-relative advantages and takes a clipped policy step with a k3 KL penalty
to the reference (``kubetune.methods.rl.grpo``). Logged per step: reward (total and per reward), KL,
clip fraction, completion length, the share of groups without signal, and the time split
generate / log-probs / train; sample completions as an MLflow table.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError, DataError
from kubetune.tracking import RunContext, log_metrics, maybe_stage

PROMPT_SHAPES = ("instruction", "chat", "completion", "text")


@dataclass
class GRPOConfig:
    rewards: str = setting(
        "json_fields:1.0,format:0.2",
        "Weighted rewards 'name:weight,...': exact_match, json_fields (against the reference answer), format "
        "(regex), length (penalty), reward_model, or a user function 'package.module.function'.")
    format_pattern: str = setting(r"\{.*\}", "Regular expression the 'format' reward matches (whole completion).")
    max_chars: int = setting(200, "Completion length in characters beyond which the 'length' reward penalises.")
    reward_model: str = setting("", "Reward model for the 'reward_model' reward: a folder written by the "
                                    "reward_model stage or a registered one, 'models:/rlhf-reward@champion'.")
    allow_custom_rewards: bool = setting(False, "Run user reward functions named by import path (user code).")
    steps: int = setting(20, "GRPO steps (each: one rollout, then num_iterations optimizer updates).")
    prompts_per_step: int = setting(4, "Distinct training prompts per step.")
    num_generations: int = setting(8, "Completions sampled per prompt (the group; TRL: 8).")
    mini_batch_size: int = setting(16, "Completions per forward/backward pass (gradients accumulate).")
    num_iterations: int = setting(1, "Optimizer updates per rollout (μ; TRL: 1).")
    learning_rate: float = setting(5e-5, "AdamW learning rate of the LoRA adapter.")
    max_new_tokens: int = setting(48, "Completion length cap in tokens (a ticket's JSON is ~25).")
    temperature: float = setting(1.0, "Sampling temperature of rollouts (log-probs use the same; TRL: 1.0).")
    beta: float = setting(0.04, "Weight of the per-token k3 KL to the reference (DeepSeekMath: 0.04).")
    epsilon: float = setting(0.2, "ε of the clipped objective.")
    advantage: Literal["grpo", "rloo"] = setting(
        "grpo", "Baseline of a completion's reward: its group's mean (grpo) or the others' mean (rloo).")
    scale_rewards: bool = setting(True, "Divide advantages by the group's reward std (False: Dr. GRPO / RLOO).")
    loss_type: Literal["grpo", "dapo"] = setting(
        "grpo", "grpo: each completion weighs the same; dapo: each token does (TRL's default).")
    lora_rank: int = setting(16, "LoRA rank of the policy adapter.")
    target_modules: str = setting("all-linear", "Layers that get LoRA: 'all-linear' or 'q_proj,v_proj'.")
    max_prompts: int = setting(0, "Use at most this many training prompts (0 = all).")
    seed: int = setting(0, "Seed of prompt order, sampling and the adapter init.")
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto", "auto = bf16 weights under autocast on a GPU, fp32 on CPU; fp32 = the CPU's arithmetic on a GPU too.")

    def __post_init__(self):
        from kubetune.methods.rl.rewards import check_spec

        for name in ("steps", "prompts_per_step", "mini_batch_size", "num_iterations", "max_new_tokens",
                     "lora_rank", "max_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ConfigError(f"'num_generations' must be >= 2 (a group of one has no relative advantage), "
                              f"got {self.num_generations}")
        if not 0 < self.learning_rate <= 1:
            raise ConfigError(f"'learning_rate' must be in (0, 1], got {self.learning_rate}")
        for name in ("temperature", "epsilon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"'{name}' must be > 0, got {getattr(self, name)}")
        if self.beta < 0 or self.max_prompts < 0:
            raise ConfigError("'beta' and 'max_prompts' must be >= 0")
        check_spec(self.rewards, self.allow_custom_rewards)
        if "reward_model" in self.rewards and not self.reward_model:
            raise ConfigError("'rewards' uses reward_model but 'reward_model' (a folder or models:/NAME@ALIAS) "
                              "is empty")

    def trainer_settings(self):
        from kubetune.methods.rl.grpo import GRPOConfig as Settings

        targets = self.target_modules if self.target_modules == "all-linear" else \
            [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return Settings(steps=self.steps, prompts_per_step=self.prompts_per_step,
                        num_generations=self.num_generations, mini_batch_size=self.mini_batch_size,
                        num_iterations=self.num_iterations, learning_rate=self.learning_rate,
                        max_new_tokens=self.max_new_tokens, temperature=self.temperature, beta=self.beta,
                        epsilon=self.epsilon, advantage=self.advantage, scale_rewards=self.scale_rewards,
                        loss_type=self.loss_type, lora_r=self.lora_rank, lora_alpha=2 * self.lora_rank,
                        lora_target_modules=targets, seed=self.seed, precision=self.precision)


@dataclass
class GRPOStageResult:
    metrics: dict
    history: list
    output_dir: str


def training_examples(dataset_dir: str | Path, max_prompts: int = 0):
    """The training prompts of an ingested dataset, each with its reference answer (or None).

    Args:
        dataset_dir: Output of ``ingest``: instruction, chat or prompt/completion rows (prompt and
            reference), or text rows (prompts only).
        max_prompts: Keep at most this many, evenly spread (0 = all).
    """
    from kubetune.lib.dataset import load_dataset_dir, prompt_messages, reference_answer
    from kubetune.methods.rl.data import spread
    from kubetune.methods.rl.grpo import Example

    meta, train, _ = load_dataset_dir(dataset_dir)
    shape = meta.get("shape")
    if shape not in PROMPT_SHAPES:
        raise DataError(f"{dataset_dir}: grpo needs prompts (shapes {', '.join(PROMPT_SHAPES)}), got '{shape}'")
    examples = []
    for i, r in enumerate(train):
        where = f"{Path(dataset_dir) / 'train.jsonl'} line {i + 1}"
        if shape in ("instruction", "chat"):
            messages = prompt_messages(r, shape)
        else:
            messages = [{"role": "user", "content": r["prompt"] if shape == "completion" else r["text"]}]
        examples.append(Example(messages, reference_answer(r, shape), where))
    return meta, spread(examples, max_prompts)


def _reward_model_folder(ref: str, scratch: str) -> str:
    """A reward model folder from a path or a registered ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
    if not ref.startswith("models:/"):
        if not (Path(ref) / "config.json").exists():
            raise ConfigError(f"'reward_model': {ref} is not a model folder (no config.json)")
        return ref
    import mlflow

    from kubetune import tracking

    tracking.configure()
    return mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=scratch)


def grpo(cfg: GRPOConfig, policy: str | Path, dataset_dir: str | Path, output_dir: str | Path,
         ctx: RunContext | None = None) -> GRPOStageResult:
    """Tune a policy with GRPO on the dataset's training prompts.

    Args:
        cfg: Stage settings.
        policy: The starting policy: a training stage's output folder (its ``merged/`` model is
            used), a model folder, or a model reference (the base model, when there is no SFT).
        dataset_dir: Output of ``ingest``: training prompts and their reference answers.
        output_dir: Where the policy (LoRA merged: a plain causal LM), tokenizer,
            ``grpo_history.json`` and ``kubetune_method.json`` are written.
        ctx: When given, logs to an MLflow child run named ``grpo``.

    Returns:
        Summary metrics (reward of the first/last steps, KL, time split), per-step history, the folder.

    Raises:
        StageError: A reference reward meets a prompt without a reference, or a reward raises or
            returns a non-finite score (the message names the reward and the dataset row).
    """
    from kubetune.core import models
    from kubetune.methods.rl import rewards as reward_lib
    from kubetune.methods.rl.data import policy_folder
    from kubetune.methods.rl.grpo import train_grpo

    meta, examples = training_examples(dataset_dir, cfg.max_prompts)
    output_dir = Path(output_dir)
    policy_path = policy_folder(policy)
    sft_manifest = _manifest(Path(str(policy)))
    base_model = sft_manifest.get("base_model") or str(policy)
    tags = {"kubetune.method": "grpo", "kubetune.base_model": base_model,
            "kubetune.data_fingerprint": meta["fingerprint"]}
    with tempfile.TemporaryDirectory() as scratch, \
            maybe_stage(ctx, "grpo", params={**asdict(cfg), "policy": str(policy)}, tags=tags) as run:
        rm = _reward_model_folder(cfg.reward_model, scratch) if "reward_model" in cfg.rewards else None
        rewards = reward_lib.build(cfg.rewards, allow_custom=cfg.allow_custom_rewards,
                                   format_pattern=cfg.format_pattern, max_chars=cfg.max_chars, reward_model=rm,
                                   device=models.pick_device())
        log = (lambda stats, step: log_metrics({k.replace("/", "_"): v for k, v in stats.items()}, step=step)) \
            if run is not None else None
        settings = cfg.trainer_settings()
        result = train_grpo(policy_path, examples, rewards, settings, output_dir, log_fn=log)
        (output_dir / "grpo_history.json").write_text(json.dumps({"config": asdict(settings),
                                                                  "history": result.history}))
        manifest = {"method": "grpo", "settings": asdict(cfg), "base_model": base_model,
                    "data_fingerprint": meta["fingerprint"], "shape": meta.get("shape"),
                    "sft_policy": str(policy), "metrics": result.metrics}
        (output_dir / "kubetune_method.json").write_text(json.dumps(manifest, indent=2))
        if run is not None:
            import mlflow

            log_metrics({f"summary_{k}": v for k, v in result.metrics.items()})
            if result.samples:
                mlflow.log_table({k: [s[k] for s in result.samples] for k in result.samples[0]}, "grpo_samples.json")
    return GRPOStageResult(metrics=result.metrics, history=result.history, output_dir=str(output_dir))


def _manifest(folder: Path) -> dict:
    path = folder / "kubetune_method.json"
    return json.loads(path.read_text()) if path.exists() else {}
