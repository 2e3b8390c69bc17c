"""Fixtures of the reliability tests: a small tokenized dataset on the tiny model."""

from __future__ import annotations

import pytest
from _rel import rows, write_jsonl


@pytest.fixture(scope="session")
def tokenized(tiny_llama, tmp_path_factory):
    """(dataset_dir, tokenized_dir): 48 instruction rows ingested and tokenized for the tiny model."""
    from kubetune.stages.ingest import IngestConfig, ingest
    from kubetune.stages.tokenize_data import TokenizeConfig, tokenize_data

    root = tmp_path_factory.mktemp("rel-data")
    src = write_jsonl(root / "d.jsonl", rows())
    ingest(IngestConfig(data_uri=str(src), validation_fraction=0.2), root / "ds")
    tokenize_data(TokenizeConfig(base_model=str(tiny_llama), max_length=64, packing=True), root / "ds", root / "tok")
    return root / "ds", root / "tok"
