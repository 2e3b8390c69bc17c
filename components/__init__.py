"""KFP components: thin lightweight-Python wrappers over the stage functions in kubetune.stages.

Each body only moves KFP inputs/outputs into one stage call (heavy imports inside the body, as
KFP requires). The same function runs under ``kfp.local`` (in this Python environment) and on
a cluster (in the image named by ``kubetune.ops.image``).
"""

from kubetune.components.compare_report import compare_report
from kubetune.components.embed import embed
from kubetune.components.deploy import deploy
from kubetune.components.dpo import dpo
from kubetune.components.aggregate_moa import aggregate_moa
from kubetune.components.evaluate import evaluate
from kubetune.components.evaluate_moa import evaluate_moa
from kubetune.components.evaluate_policy import evaluate_policy
from kubetune.components.evaluate_head import evaluate_head
from kubetune.components.finalize import finalize
from kubetune.components.grpo import grpo
from kubetune.components.ingest import ingest
from kubetune.components.ppo import ppo
from kubetune.components.preference_sft_data import preference_sft_data
from kubetune.components.propose import propose
from kubetune.components.register import register, register_skipped
from kubetune.components.reward_model import reward_model
from kubetune.components.tokenize_data import tokenize_data
from kubetune.components.train_head import train_head
from kubetune.components.train_full import train_full
from kubetune.components.train_moe import train_moe
from kubetune.components.train_peft import train_peft

__all__ = ["aggregate_moa", "compare_report", "evaluate_moa", "propose",
           "deploy", "dpo", "evaluate_policy", "ppo", "preference_sft_data", "reward_model",
           "embed", "evaluate", "evaluate_head", "finalize", "grpo", "ingest", "register", "register_skipped",
           "tokenize_data",
           "train_full", "train_head", "train_moe", "train_peft"]
