"""Every shipped config loads, names an existing pipeline, and passes its parameter checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.core.config import load_file
from kubetune.ops.runner import check_params, get_pipeline

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_says_how_to_run_it(path):
    pipeline = path.stem.split("-")[0].replace("_", "-")
    first_lines = path.read_text().splitlines()[:4]
    assert any(line.startswith("# Run:") and pipeline in line for line in first_lines), first_lines
    module = get_pipeline(pipeline)
    params = check_params(module, load_file(path), str(path))
    assert params  # non-empty, every key a real parameter with the right type
