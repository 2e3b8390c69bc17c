"""MLflow on PostgreSQL, as manifests/base deploys it: a pipeline registers a model through the
tracking server, and the rows are in PostgreSQL.

Needs the servers .ci/run starts on 127.0.0.1: PostgreSQL (``KUBETUNE_TEST_POSTGRES_URI``) and
the ``mlflow server`` whose backend store it is (``KUBETUNE_TEST_MLFLOW_URI``). The peft pipeline
runs on the tiny Llama through kfp.local; the checks read PostgreSQL with psycopg2, not MLflow.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import closing

import pytest

from kubetune.ops.runner import run_local

POSTGRES_URI = os.environ.get("KUBETUNE_TEST_POSTGRES_URI")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (POSTGRES_URI and os.environ.get("KUBETUNE_TEST_MLFLOW_URI")),
                       reason="needs KUBETUNE_TEST_POSTGRES_URI and KUBETUNE_TEST_MLFLOW_URI: PostgreSQL and "
                              "an mlflow server on it, as .ci/run starts them"),
]

# 10 steps at 3e-3 bring the tiny Llama's val_loss below the base model's (as in
# test_pipeline_peft), so the first version earns `champion`; evaluation on 4 examples only.
PARAMS = {"max_steps": 10, "learning_rate": 3e-3, "max_length": 512, "train_settings": {"batch_size": 2},
          "eval_settings": {"primary_metric": "val_loss", "max_examples": 4, "max_new_tokens": 8}}


def _rows(cur, sql: str, *args) -> list[tuple]:
    cur.execute(sql, args)
    return cur.fetchall()


def test_pipeline_registers_through_the_server_into_postgres(tiny_llama, tiny_tickets, mlflow_server_env,
                                                              tmp_path, monkeypatch):
    import psycopg2

    monkeypatch.chdir(tmp_path)
    name = f"pg-{uuid.uuid4().hex[:8]}"  # the database is shared by the whole CI run
    ingested, _ = tiny_tickets
    summary = run_local("peft", {**PARAMS, "base_model": str(tiny_llama), "model_name": name,
                                 "data_uri": str(ingested / "train.jsonl")}, workdir=tmp_path)
    assert summary["tracking_uri"] == mlflow_server_env
    assert summary["version"] == "1" and set(summary["aliases"]) == {"champion", "challenger"}, summary

    with closing(psycopg2.connect(POSTGRES_URI)) as conn, conn.cursor() as cur:
        assert _rows(cur, "SELECT name FROM registered_models WHERE name = %s", name) == [(name,)]
        assert _rows(cur, "SELECT version, run_id, status FROM model_versions WHERE name = %s", name) == [
            (1, summary["run_id"], "READY")]
        assert sorted(_rows(cur, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", name)) == [
            ("challenger", 1), ("champion", 1)]

        # The version's run is register's child run in the model's experiment, in this database.
        assert _rows(cur, "SELECT e.name, t.value FROM runs r JOIN experiments e USING (experiment_id) "
                          "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'kubetune.stage' "
                          "WHERE r.run_uuid = %s", summary["run_id"]) == [(f"kubetune/{name}", "register")]
        metric = f"candidate_{summary['primary_metric']}"
        (value,) = _rows(cur, "SELECT value FROM metrics WHERE run_uuid = %s AND key = %s", summary["run_id"],
                         metric)[0]
        assert value == pytest.approx(summary["candidate"])

        # Every stage's metrics: ingest's counts, the training loss per step, evaluate's numbers.
        per_stage = _rows(cur, "SELECT t.value, m.key, count(*) FROM metrics m "
                               "JOIN runs r ON r.run_uuid = m.run_uuid JOIN experiments e USING (experiment_id) "
                               "JOIN tags t ON t.run_uuid = m.run_uuid AND t.key = 'kubetune.stage' "
                               "WHERE e.name = %s GROUP BY t.value, m.key", f"kubetune/{name}")
    logged = {(stage, key): n for stage, key, n in per_stage}
    assert logged.get(("ingest", "data_train"), 0) == 1, sorted(logged)
    assert logged.get(("train-peft", "loss"), 0) == PARAMS["max_steps"], sorted(logged)  # one per step
    assert logged.get(("evaluate", metric), 0) == 1, sorted(logged)


def test_alias_lock_is_a_postgres_advisory_lock_a_killed_holder_cannot_leave_behind(tmp_path, monkeypatch):
    """With PostgreSQL as the tracking store the lock is PostgreSQL's advisory lock: a holder
    killed inside it frees it with its connection, so three waiters arriving next enter one at a
    time at once (the stale age is far off), and no lock model is ever created."""
    import subprocess
    import sys

    import mlflow
    from mlflow.tracking import MlflowClient
    from test_registry import CRASHER, LOCKER, assert_disjoint, start_together

    from kubetune import tracking

    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the image has psycopg2.
    uri = POSTGRES_URI.replace("postgresql://", "postgresql+psycopg2://", 1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("KUBETUNE_LOCK_STALE_S", "600")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    MlflowClient().search_registered_models(max_results=1)  # the schema exists before processes race to it
    name = f"pglock-{uuid.uuid4().hex[:8]}"
    crashed = subprocess.run([sys.executable, "-c", CRASHER, name], capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    log = tmp_path / "lock.log"
    t0 = time.monotonic()
    procs = start_together([[LOCKER, name, str(log), "3", "0.2"]] * 3)
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "DONE" in out, err[-3000:]
    assert time.monotonic() - t0 < 60
    assert_disjoint(log, 3, 3)
    assert not MlflowClient().search_registered_models(f"name LIKE '{name}{tracking.LOCK_SUFFIX}%'")
    mlflow.set_tracking_uri(None)
