"""Stage `reward_model`: a pairwise (Bradley-Terry) reward model on preference pairs.

TRL's ``RewardTrainer`` on a one-logit sequence-classification head over a pretrained
backbone, full or LoRA (``kubetune.methods.rl.reward``). Evaluated on the held-out pairs: pairwise
accuracy (share of pairs with r(chosen) > r(rejected); the untrained head is the chance
baseline) and the margin distribution (``reward_margins.png``). Writes the model folder with
its ``kubetune_method.json`` and an ``eval.json`` in the schema ``register`` reads, so the
reward model is registered like any other model.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError, DataError
from kubetune.core.models import DEFAULT_BASE_MODEL
from kubetune.lib.report import EvalReport
from kubetune.methods.rl import settings as rl
from kubetune.methods.rl.settings import RewardModelConfig as TrainerSettings
from kubetune.tracking import RunContext, log_metrics, maybe_stage

_TRAINER = TrainerSettings()  # the defaults below are the trainer's, stated once in kubetune.methods.rl.settings

PRIMARY_METRIC = "accuracy"


@dataclass
class RewardModelConfig:
    base_model: str = setting(DEFAULT_BASE_MODEL, "Backbone: packaged name, local folder or hub id.")
    method: Literal["full", "lora"] = setting("lora" if _TRAINER.use_peft else "full", "Train the whole backbone, or LoRA adapters (+ the head).")
    max_steps: int = setting(_TRAINER.max_steps, "Optimizer steps (-1 = run 'epochs' over the training pairs).")
    epochs: float = setting(_TRAINER.epochs, "Passes over the training pairs when max_steps is -1.")
    learning_rate: float = setting(_TRAINER.learning_rate, f"AdamW learning rate; 0 = {rl.REWARD_FULL_LEARNING_RATE:g} "
                                                           f"for full, {rl.LORA_LEARNING_RATE:g} for LoRA (a ~100M model).")
    batch_size: int = setting(_TRAINER.batch_size, "Pairs per optimizer step (each pair is two sequences).")
    max_eval_pairs: int = setting(48, "Held-out pairs scored (evenly spread over the validation split; 0 = all).")
    max_length: int = setting(_TRAINER.max_length, "Pairs with a sequence longer than this many tokens are dropped.")
    lora_rank: int = setting(_TRAINER.lora_r, "LoRA rank when method is lora.")
    seed: int = setting(_TRAINER.seed, "Seed of the head initialisation and the data order.")
    pairs: Literal["all", "policy", "judge"] = setting(
        "all", "Training pairs used: all, or one of two prompt-disjoint halves ('policy' for the reward "
               "model RL optimises, 'judge' for the independent one that evaluates the result).")
    model_name: str = setting("", "Registered reward model whose 'champion' to compare with ('' = none).")
    min_improvement: float = setting(0.0, "Accuracy margin needed to beat the base (chance) and champion.")

    def __post_init__(self):
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"'max_steps' must be >= 1 or -1, got {self.max_steps}")
        if self.max_eval_pairs < 0:
            raise ConfigError(f"'max_eval_pairs' must be >= 0 (0 = all), got {self.max_eval_pairs}")
        for name in ("batch_size", "max_length", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise ConfigError(f"'epochs' must be > 0, got {self.epochs}")
        if not 0 <= self.learning_rate <= 1:
            raise ConfigError(f"'learning_rate' must be in [0, 1], got {self.learning_rate}")


@dataclass
class RewardModelResult:
    metrics: dict
    report: EvalReport
    output_dir: str


def _accuracy(margins: list[float]) -> float:
    return sum(m > 0 for m in margins) / len(margins)


def _champion_accuracy(model_name: str, val_pairs: list[dict]) -> tuple[dict | None, str | None]:
    """The registered champion's accuracy on these held-out pairs (downloaded and scored)."""
    from kubetune import tracking
    from kubetune.methods.rl.reward import load_reward_model, pairwise_margins

    tracking.configure()
    holder = tracking.get_alias(model_name, tracking.CHAMPION)
    if holder is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_version(model_name, holder.version, tmp)
        model, tok = load_reward_model(path)
        margins = pairwise_margins(model, tok, val_pairs)
    return {PRIMARY_METRIC: _accuracy(margins), "margin_mean": sum(margins) / len(margins)}, str(holder.version)


def reward_model(cfg: RewardModelConfig, dataset_dir: str | Path, output_dir: str | Path,
                 report_path: str | Path | None = None, ctx: RunContext | None = None) -> RewardModelResult:
    """Train and evaluate a pairwise reward model.

    Args:
        cfg: Stage settings.
        dataset_dir: Output of ``ingest`` on preference data (prompt/chosen/rejected); pairs of
            one prompt are kept on one side of the split.
        output_dir: Where the reward model (safetensors, LoRA merged), tokenizer and
            ``kubetune_method.json`` are written.
        report_path: Where ``eval.json`` (accuracy vs chance vs champion) is written; None = beside
            the model folder as ``<output_dir>.eval.json``.
        ctx: When given, logs to an MLflow child run named ``reward-model``.

    Returns:
        Metrics (accuracy, accuracy_before, margins, loss), the evaluation report, the folder.
    """
    from kubetune import tracking
    from kubetune.core import models
    from kubetune.methods.rl.data import load_pairs, prompt_half, spread
    from kubetune.methods.rl.reward import train_reward_model

    meta, train, val = load_pairs(dataset_dir)
    train = prompt_half(train, cfg.pairs)
    if not train:
        raise DataError(f"'pairs': the '{cfg.pairs}' half of {dataset_dir}'s training pairs is empty")
    val = spread(val, cfg.max_eval_pairs)
    output_dir = Path(output_dir)
    report_path = Path(report_path) if report_path else output_dir.with_name(output_dir.name + ".eval.json")
    settings = TrainerSettings(use_peft=cfg.method == "lora", lora_r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                               learning_rate=cfg.learning_rate, epochs=cfg.epochs, max_steps=cfg.max_steps,
                               batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed)
    tags = {"kubetune.method": "reward_model", "kubetune.base_model": cfg.base_model,
            "kubetune.data_fingerprint": meta["fingerprint"]}
    # Prefixed: the Trainer logs its own arguments (learning_rate, ...) to the same run, and
    # MLflow refuses a parameter logged twice with different values.
    params = {f"kubetune.{k}": v for k, v in asdict(cfg).items()}
    with maybe_stage(ctx, "reward-model", params=params, tags=tags) as run:
        result = train_reward_model(models.resolve(cfg.base_model), train, val, settings, output_dir,
                                    report_to="mlflow" if run is not None else "none")
        manifest = {"method": "reward_model", "settings": asdict(cfg), "base_model": cfg.base_model,
                    "data_fingerprint": meta["fingerprint"], "shape": "preference",
                    "metrics": result.metrics}
        (output_dir / "kubetune_method.json").write_text(json.dumps(manifest, indent=2))
        champion, champion_version = (_champion_accuracy(cfg.model_name, val) if cfg.model_name else (None, None))
        candidate = {PRIMARY_METRIC: result.metrics["accuracy"], "margin_mean": result.metrics["margin_mean"],
                     "margin_median": result.metrics["margin_median"]}
        base = {PRIMARY_METRIC: result.metrics["accuracy_before"]}
        report = EvalReport(
            primary_metric=PRIMARY_METRIC, candidate=candidate, base=base, champion=champion,
            champion_version=champion_version, min_improvement=cfg.min_improvement, forgetting=None,
            data_fingerprint=meta["fingerprint"], validation_examples=len(val))
        if run is not None:
            # "val_": TRL's own logs use "accuracy" and "margin" for the training batches.
            log_metrics({f"val_{k}": v for k, v in result.metrics.items()})
            report.log(tracking)
            tracking.log_figure(result.figure, "reward_margins.png")
        else:
            import matplotlib.pyplot as plt

            plt.close(result.figure)
    report.save(report_path)
    return RewardModelResult(metrics=result.metrics, report=report, output_dir=str(output_dir))
