"""Stage `train_peft`: train a PEFT method (LoRA, DoRA, QLoRA, adapters, prompt, prefix, IA3).

A configuration of the one training core (``kubetune.core.train``); see ``train_full`` for its twin.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.errors import ConfigError
from kubetune.core.train import TrainConfig, TrainResult, run_training
from kubetune.tracking import RunContext


def train_peft(cfg: TrainConfig, tokenized_dir: str | Path, output_dir: str | Path, workspace: str | Path,
               ctx: RunContext | None = None) -> TrainResult:
    """Train ``cfg.method`` (any PEFT method) on a tokenized dataset.

    Args:
        cfg: Training settings; ``cfg.method`` must not be ``full``.
        tokenized_dir: Output of ``tokenize_data``.
        output_dir: Where the adapter (safetensors), tokenizer and manifest are written.
        workspace: Folder for checkpoints (a shared volume on a cluster); reruns resume there.
        ctx: When given, logs to an MLflow child run named ``train-peft``.

    Returns:
        Training metrics and the output folder.
    """
    if cfg.method == "full":
        raise ConfigError("train_peft: method 'full' trains every weight; use the train_full stage")
    return run_training("train-peft", cfg, tokenized_dir, output_dir, workspace, ctx)
