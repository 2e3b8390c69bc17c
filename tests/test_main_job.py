"""The main job, as the README's first command runs it: `kubetune run peft` with no arguments,
on the packaged SmolLM2, through kfp.local. The base model fails the ticket task, the short
LoRA run measurably improves it, a version is registered and becomes champion.

Minutes on 2 CPU cores: CI runs it once (it is the product's promise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_main_job_registers_an_improved_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(KUBETUNE_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "peft"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / ".kubetune" / "last_run.json").read_text())
    print(json.dumps(summary, indent=2))  # the numbers the closing note quotes
    assert summary["primary_metric"] == "exact_match"
    assert summary["base"] < 0.5, "the base model should fail the strict JSON task"
    assert summary["candidate"] >= summary["base"] + 0.2, summary
    assert summary["version"] == "1" and "champion" in summary["aliases"]
    assert summary["wall_s"] < 1200
    assert f"version {summary['version']}" in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert (tmp_path / "mlflow.db").exists()
