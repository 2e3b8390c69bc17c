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


def test_a_components_named_parameter_and_a_different_settings_copy_are_refused():
    """The named value used to win silently: grpo's SFT trained at 2e-4 while its settings said 1e-3."""
    from kubetune.core.config import with_named
    from kubetune.errors import ConfigError

    named = {"learning_rate": 0.0, "max_steps": 40}
    assert with_named({"batch_size": 2, "max_steps": 40}, named, "s") == {"batch_size": 2, **named}
    with pytest.raises(ConfigError, match=r"^train_peft settings: \['learning_rate'\] are this step's own "
                                          r"parameters \(learning_rate=0\.0\)"):
        with_named({"learning_rate": 1e-3, "max_steps": 40}, named, "train_peft settings")
