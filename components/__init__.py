"""KFP components: thin lightweight-Python wrappers over the stage functions in kubetune.stages.

Each body only moves KFP inputs/outputs into one stage call (heavy imports inside the body, as
KFP requires). The same function runs under ``kfp.local`` (in this Python environment) and on
a cluster (in the image named by ``kubetune.image``).
"""

from kubetune.components.evaluate import evaluate
from kubetune.components.ingest import ingest
from kubetune.components.register import register, register_skipped
from kubetune.components.tokenize_data import tokenize_data
from kubetune.components.train_full import train_full
from kubetune.components.train_peft import train_peft

__all__ = ["evaluate", "ingest", "register", "register_skipped", "tokenize_data", "train_full", "train_peft"]
