"""Concurrent pipelines on the same registered model name: no lost versions, one champion.

Three `register` stages in three processes, released at the same instant against a real MLflow
server, each with an evaluation that says it beats the (absent) champion.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from _rel import HERE, child_env

N = 3


def test_parallel_registers_keep_every_version_and_one_champion(mlflow_server_env, tmp_path):
    from mlflow.tracking import MlflowClient

    name = f"concurrent-{time.time_ns()}"
    procs = []
    for i in range(N):
        model = tmp_path / f"model{i}"
        model.mkdir()
        (model / "kubetune_method.json").write_text(json.dumps({"method": "lora", "base_model": "tiny"}))
        (model / "adapter_model.safetensors").write_bytes(bytes([i]) * 1000)
        report = tmp_path / f"eval{i}.json"
        report.write_text(json.dumps({"evaluated": True, "primary_metric": "val_loss", "higher_is_better": False,
                                      "min_improvement": 0.0, "candidate": {"val_loss": 1.0 + i},
                                      "base": {"val_loss": 9.0}, "champion": None, "champion_version": None,
                                      "forgetting": None, "beats_base": True, "beats_champion": True,
                                      "data_fingerprint": "fp"}))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "_register_job.py"), str(model), str(report), name,
                                       str(tmp_path / "go")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=child_env(MLFLOW_TRACKING_URI=mlflow_server_env)))
    time.sleep(8)  # let all three import mlflow and reach the barrier
    (tmp_path / "go").touch()
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))

    client = MlflowClient(mlflow_server_env)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    assert versions == list(range(1, N + 1))  # none lost, none doubled
    assert sorted(int(s["version"]) for s in summaries) == versions
    champion = client.get_model_version_by_alias(name, "champion")
    claims = [s for s in summaries if "champion" in s["aliases"]]
    # Exactly one run believes it holds `champion`, and it is the version the alias points at.
    assert [s["version"] for s in claims] == [str(champion.version)], summaries
    for s in summaries:
        tag = client.get_model_version(name, s["version"]).tags["kubetune.decision"]
        assert tag == ("promoted" if s["version"] == str(champion.version) else "challenger"), (s, tag)
