"""Defaults that more than one place reads, each stated once: the main job and the workspace.

The main job is the run a user gets without choosing anything: LoRA on the bundled support
tickets, sized for 2 CPU cores in about ten minutes end to end. The peft and full pipelines'
signatures (and the data and sizes of moe and grpo), ``kubetune compare`` (``CompareConfig``, its
command-line flags and the compare pipeline) read it from here; ``configs/peft-lora.yaml``
restates it for people to copy, and ``tests/test_defaults.py`` fails when that copy drifts.

The arithmetic behind the sizes: rows of 256 tokens hold two tickets; max_steps 0 = from the
data (``TrainConfig.steps_for``: one epoch, 20 to 60 steps): 216 rows / 2 per step = 108 steps
an epoch, capped to 60 = ~240 tickets, about half an epoch. LoRA then trains at 1e-3, five times
the usual 2e-4 (``kubetune.core.peft_methods``), because the budget is tens of steps, not
thousands. docs/compare.md ("Training length") has what 30, 60, 108 and 324 steps reach.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Environment variable naming the workspace folder: checkpoints, training jobs' files, the
#: MLflow spool. On a cluster it is the mounted workspace volume (``kubetune.ops.kube``).
WORKSPACE_ENV = "KUBETUNE_WORKSPACE"
#: The workspace when ``KUBETUNE_WORKSPACE`` is not set (relative to the working directory).
WORKSPACE = ".kubetune/workspace"


def workspace() -> str:
    """The workspace folder: ``$KUBETUNE_WORKSPACE``, else ``WORKSPACE``."""
    return os.environ.get(WORKSPACE_ENV) or WORKSPACE


@dataclass(frozen=True)
class MainJob:
    """The main job's settings (see the module docstring for why these sizes)."""

    data_uri: str = "bundled://tickets"
    method: str = "lora"
    max_steps: int = 0
    learning_rate: float = 1e-3
    lora_rank: int = 16
    max_length: int = 256
    batch_size: int = 2
    eval_max_examples: int = 48
    eval_max_new_tokens: int = 40
    # One generation batch: 40 decode steps per model instead of 120.
    eval_batch_size: int = 48

    def train_settings(self) -> dict:
        """The pipelines' ``train_settings`` default (a fresh dict)."""
        return {"batch_size": self.batch_size}

    def eval_settings(self) -> dict:
        """The pipelines' ``eval_settings`` default (a fresh dict)."""
        return {"max_examples": self.eval_max_examples, "max_new_tokens": self.eval_max_new_tokens,
                "batch_size": self.eval_batch_size}


MAIN_JOB = MainJob()

__all__ = ["MAIN_JOB", "MainJob", "WORKSPACE", "WORKSPACE_ENV", "workspace"]
