"""Stage `train_full`: train every weight of the model.

A configuration of the one training core (``kubetune.core.train``); see ``train_peft`` for its twin.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kubetune.core.train import TrainConfig, TrainResult, run_training
from kubetune.tracking import RunContext


def train_full(cfg: TrainConfig, tokenized_dir: str | Path, output_dir: str | Path, workspace: str | Path,
               ctx: RunContext | None = None) -> TrainResult:
    """Full fine-tuning: ``cfg.method`` is forced to ``full``; everything else as in ``train_peft``.

    Args:
        cfg: Training settings (learning rate defaults to the full-tuning one when 0).
        tokenized_dir: Output of ``tokenize_data``.
        output_dir: Where the whole model (safetensors), tokenizer and manifest are written.
        workspace: Folder for checkpoints; reruns resume there.
        ctx: When given, logs to an MLflow child run named ``train-full``.

    Returns:
        Training metrics and the output folder.
    """
    return run_training("train-full", replace(cfg, method="full"), tokenized_dir, output_dir, workspace, ctx)
