"""Stage `dpo`: Direct Preference Optimization on preference pairs (TRL's ``DPOTrainer``).

The reward-model-free alternative to reward model + PPO (Rafailov et al. 2023), on the same
prompt/chosen/rejected data. Full or LoRA (reference = the adapter-disabled model); the LoRA
is merged before saving, so the output is a plain causal LM like the PPO policy's. Logs the
implicit reward margin β·(log π/π_ref(chosen) - log π/π_ref(rejected)) on the held-out pairs
before training (0: π = π_ref) and after.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError
from kubetune.core.models import DEFAULT_BASE_MODEL
from kubetune.methods.rl import settings as rl
from kubetune.methods.rl.settings import DPOConfig as TrainerSettings
from kubetune.tracking import RunContext, log_metrics, maybe_stage

_TRAINER = TrainerSettings()  # the defaults below are the trainer's, stated once in kubetune.methods.rl.settings


@dataclass
class DPOConfig:
    base_model: str = setting(DEFAULT_BASE_MODEL, "Starting policy (an instruction-tuned model); also the reference.")
    method: Literal["full", "lora"] = setting("lora" if _TRAINER.use_peft else "full", "Train LoRA adapters (reference = adapter off) or all weights.")
    beta: float = setting(_TRAINER.beta, "β of the DPO loss: larger keeps the policy closer to the reference (TRL: 0.1).")
    max_steps: int = setting(_TRAINER.max_steps, "Optimizer steps (-1 = run 'epochs' over the training pairs).")
    epochs: float = setting(_TRAINER.epochs, "Passes over the training pairs when max_steps is -1.")
    learning_rate: float = setting(_TRAINER.learning_rate, f"AdamW learning rate; 0 = {rl.LORA_LEARNING_RATE:g} for LoRA, "
                                                           f"{rl.DPO_FULL_LEARNING_RATE:g} for full (a ~100M model).")
    batch_size: int = setting(_TRAINER.batch_size, "Pairs per optimizer step.")
    sft_weight: float = setting(
        _TRAINER.sft_weight, "Weight of an NLL term on the chosen answer added to the DPO loss (RPO; TRL loss_type "
             "['sigmoid', 'sft']): the pipeline has no SFT step before DPO, and without it DPO mostly lowers the "
             "rejected answers' likelihood while sampled answers barely change. 0 = plain DPO.")
    max_eval_pairs: int = setting(48, "Held-out pairs scored before and after (evenly spread; 0 = all).")
    max_length: int = setting(_TRAINER.max_length, "Sequences are truncated to this many tokens.")
    lora_rank: int = setting(_TRAINER.lora_r, "LoRA rank when method is lora.")
    seed: int = setting(_TRAINER.seed, "Seed of the data order and adapter initialisation.")

    def __post_init__(self):
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"'max_steps' must be >= 1 or -1, got {self.max_steps}")
        for name in ("batch_size", "max_length", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.sft_weight < 0 or self.max_eval_pairs < 0:
            raise ConfigError("'sft_weight' and 'max_eval_pairs' must be >= 0")
        if self.beta <= 0 or self.epochs <= 0:
            raise ConfigError("'beta' and 'epochs' must be > 0")
        if not 0 <= self.learning_rate <= 1:
            raise ConfigError(f"'learning_rate' must be in [0, 1], got {self.learning_rate}")


@dataclass
class DPOResult:
    metrics: dict
    output_dir: str


def dpo(cfg: DPOConfig, dataset_dir: str | Path, output_dir: str | Path, ctx: RunContext | None = None) -> DPOResult:
    """Train a policy with DPO on an ingested preference dataset.

    Args:
        cfg: Stage settings.
        dataset_dir: Output of ``ingest`` on preference data; pairs of one prompt stay on one side.
        output_dir: Where the policy (plain causal LM, LoRA merged), tokenizer and
            ``kubetune_method.json`` are written.
        ctx: When given, logs to an MLflow child run named ``dpo``.

    Returns:
        Implicit-reward margin and accuracy on held-out pairs before and after, training loss.
    """
    from kubetune.core import models
    from kubetune.methods.rl.data import load_pairs, spread
    from kubetune.methods.rl.dpo import train_dpo

    meta, train, val = load_pairs(dataset_dir)
    val = spread(val, cfg.max_eval_pairs)
    settings = TrainerSettings(use_peft=cfg.method == "lora", lora_r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                               beta=cfg.beta, learning_rate=cfg.learning_rate, epochs=cfg.epochs,
                               max_steps=cfg.max_steps, batch_size=cfg.batch_size, sft_weight=cfg.sft_weight,
                               max_length=cfg.max_length, seed=cfg.seed)
    tags = {"kubetune.method": "dpo", "kubetune.base_model": cfg.base_model,
            "kubetune.data_fingerprint": meta["fingerprint"]}
    output_dir = Path(output_dir)
    # Prefixed: the Trainer logs its own arguments (learning_rate, ...) to the same run, and
    # MLflow refuses a parameter logged twice with different values.
    params = {f"kubetune.{k}": v for k, v in asdict(cfg).items()}
    with maybe_stage(ctx, "dpo", params=params, tags=tags) as run:
        metrics = train_dpo(models.resolve(cfg.base_model), train, val, settings, output_dir,
                            report_to="mlflow" if run is not None else "none")
        metrics.update(n_train=len(train), n_val=len(val))
        manifest = {"method": "dpo", "settings": asdict(cfg), "base_model": cfg.base_model,
                    "data_fingerprint": meta["fingerprint"], "shape": "preference", "metrics": metrics}
        (output_dir / "kubetune_method.json").write_text(json.dumps(manifest, indent=2))
        if run is not None:
            log_metrics({f"summary_{k}": v for k, v in metrics.items()})
    return DPOResult(metrics=metrics, output_dir=str(output_dir))
