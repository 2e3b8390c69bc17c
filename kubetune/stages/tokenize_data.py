"""Stage `tokenize_data`: records -> token ids with labels on responses only, packed.

The pipeline step of ``kubetune.core.tokenization`` (chat templates, response-only labels,
packing without cross-attention), which the stages that tokenize and train inside one task
share.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.core.tokenization import TokenizeConfig, TokenizeResult, tokenize_dataset


def tokenize_data(cfg: TokenizeConfig, dataset_dir: str | Path, output_dir: str | Path) -> TokenizeResult:
    """The step between ``ingest`` and the trainers.

    Args:
        cfg: The step's settings: tokenizer (with its chat template), max_length, packing.
        dataset_dir: The ingested dataset.
        output_dir: The tokenized dataset: a ``datasets`` folder with ``meta.json`` and ``tokenizer/``.

    Returns:
        Token counts per split and the output folder.
    """
    return tokenize_dataset(cfg, dataset_dir, output_dir)
