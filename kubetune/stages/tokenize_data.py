"""Stage `tokenize_data`: records -> token ids with labels on responses only, packed.

The pipeline step of ``kubetune.core.tokenization`` (chat templates, response-only labels,
packing without cross-attention), which the stages that tokenize and train inside one task
share.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.core.tokenization import TokenizeConfig, TokenizeResult, tokenize_dataset


def tokenize_data(cfg: TokenizeConfig, dataset_dir: str | Path, output_dir: str | Path) -> TokenizeResult:
    """Tokenize an ingested dataset folder into a ``datasets`` folder the trainers read.

    Args:
        cfg: Tokenizer and packing settings.
        dataset_dir: Output folder of ``ingest``.
        output_dir: Where to save the ``DatasetDict`` (train/validation) and ``meta.json``.

    Returns:
        Counts per split (examples, dropped, truncated, rows, tokens, label tokens).
    """
    return tokenize_dataset(cfg, dataset_dir, output_dir)
