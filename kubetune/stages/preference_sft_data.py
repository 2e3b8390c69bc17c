"""Stage `preference_sft_data`: the SFT view of ingested preference data (prompt -> chosen).

Supervised fine-tuning on the preferred answers before reward modelling and RL is the
InstructGPT recipe (Ouyang et al. 2022, step 1). The view is an ingested instruction dataset
folder (``train.jsonl``, ``validation.jsonl``, ``meta.json``) that ``tokenize_data`` and the
training core take as they are; the reshaping itself lives with the other preference-pair
readers in ``kubetune.methods.rl.data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class PreferenceSFTResult:
    shape: str
    fingerprint: str
    counts: dict[str, int]
    output_dir: str


def preference_sft_data(preferences_dir: str | Path, output_dir: str | Path) -> PreferenceSFTResult:
    """Write the ``prompt -> chosen`` instruction records of an ingested preference dataset.

    Args:
        preferences_dir: Output folder of ``ingest`` on preference data (prompt/chosen/rejected).
        output_dir: Where to write the instruction dataset folder (replaced whole).

    Returns:
        Its shape (``instruction``), content fingerprint and row counts per split.
    """
    from kubetune.methods.rl.data import chosen_as_instruction

    meta = chosen_as_instruction(preferences_dir, output_dir)
    return PreferenceSFTResult(shape=meta["shape"], fingerprint=meta["fingerprint"], counts=meta["counts"],
                               output_dir=str(output_dir))
