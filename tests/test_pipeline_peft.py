"""The peft pipeline end to end through kfp.local, the registry decisions, and compilation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from kubetune.errors import KubetuneError
from kubetune.ops.runner import compile_all, run_local

EVAL = {"primary_metric": "val_loss", "max_examples": 4, "max_new_tokens": 8}


def _tickets(tmp_path, n=60):
    from kubetune.lib.storage import bundled

    lines = bundled("bundled://tickets").read_text().splitlines()[:n]
    path = tmp_path / "tickets.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _versions(name):
    from mlflow.tracking import MlflowClient

    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'"))


def test_peft_pipeline_registers_then_keeps_champion_against_worse_run(tiny_llama, tmp_path, mlflow_uri):
    from kubetune import tracking

    data = _tickets(tmp_path)
    common = dict(base_model=str(tiny_llama), data_uri=str(data), model_name="tiny-peft", max_length=512,
                  eval_settings=EVAL)
    first = run_local("peft", {**common, "max_steps": 10, "learning_rate": 3e-3,
                               "train_settings": {"batch_size": 2}}, workdir=tmp_path)
    assert str(first["version"]) == "1" and first["promoted"] is True
    assert set(first["aliases"]) == {"champion", "challenger"}
    assert first["candidate"] < first["base"]  # val_loss fell below the base model's

    # same data as the champion's: forced, or the run would be skipped as unchanged
    worse = run_local("peft", {**common, "max_steps": 1, "learning_rate": 1e-6, "force": True}, workdir=tmp_path)
    assert str(worse["version"]) == "2" and worse["promoted"] is False and worse["aliases"] == ["challenger"]
    assert "does not beat champion v1" in worse["reason"]
    assert str(tracking.get_alias("tiny-peft", "champion").version) == "1"
    assert str(tracking.get_alias("tiny-peft", "challenger").version) == "2"
    v2 = tracking.get_alias("tiny-peft", "challenger")
    assert v2.tags["kubetune.decision"] == "challenger" and v2.tags["kubetune.data_fingerprint"]
    assert v2.tags["kubetune.pipeline_run_id"] != tracking.get_alias("tiny-peft", "champion").tags[
        "kubetune.pipeline_run_id"]

    # the registered champion loads back from the registry and generates
    from kubetune.core.scoring import load_model_artifact

    path = tracking.download_version("tiny-peft", "1", tmp_path / "dl")
    model = load_model_artifact(path)
    import torch

    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape[1] == 6


def test_bad_data_fails_the_pipeline_and_registers_nothing(tiny_llama, tmp_path, mlflow_uri):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 7}\n')
    with pytest.raises(KubetuneError, match="failed"):
        run_local("peft", {"base_model": str(tiny_llama), "data_uri": str(bad), "model_name": "tiny-bad"},
                  workdir=tmp_path)
    assert _versions("tiny-bad") == []


def test_cli_run_names_bad_parameters(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "peft", "--set", "max_step=3"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "unknown parameter(s) ['max_step']" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "peft", "--set", "max_steps=many"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "'max_steps' must be an integer" in proc.stderr


def test_every_pipeline_compiles(tmp_path):
    from kubetune.pipelines import PIPELINES

    paths = compile_all(tmp_path)
    assert {p.stem for p in paths} == set(PIPELINES)
    for p in paths:
        spec = yaml.safe_load(p.read_text())
        assert spec["pipelineInfo"]["name"] == p.stem
        assert spec["root"]["dag"]["tasks"], p


def test_compiled_yaml_uses_the_image_constant(tmp_path):
    from kubetune.ops.image import CPU_IMAGE, TRAIN_IMAGE

    (path,) = compile_all(tmp_path, names=["peft"])
    text = path.read_text()
    assert TRAIN_IMAGE in text and CPU_IMAGE in text
    executors = yaml.safe_load(text)["deploymentSpec"]["executors"]
    assert json.dumps(executors).count("packages_to_install") == 0
