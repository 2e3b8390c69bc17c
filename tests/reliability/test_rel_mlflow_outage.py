"""MLflow unreachable: the tracking server is stopped in the middle of a training stage.

Training finishes; what was logged while the server was down is spooled to local disk, the
user is told, and it is all sent when the server answers again. Registration waits with
backoff and fails clearly if the server does not come back, registering nothing.
"""

from __future__ import annotations

import json
import threading

import pytest
from _rel import free_port, start_mlflow, stop
from transformers import TrainerCallback

from kubetune import tracking
from kubetune.core.config import from_dict
from kubetune.errors import StageError
from kubetune.stages.register import RegisterConfig, register
from kubetune.core.train import TrainConfig, run_training

STEPS, KILL_AT = 10, 3


def _report(path):
    path.write_text(json.dumps({"evaluated": True, "primary_metric": "val_loss", "higher_is_better": False,
                                "min_improvement": 0.0, "candidate": {"val_loss": 1.0}, "base": {"val_loss": 2.0},
                                "champion": None, "champion_version": None, "forgetting": None,
                                "beats_base": True, "beats_champion": True, "data_fingerprint": "fp"}))
    return path


def test_server_stopped_mid_training_then_back(tokenized, tiny_llama, tmp_path, monkeypatch, capfd):
    import mlflow
    from mlflow.tracking import MlflowClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = {"proc": start_mlflow(tmp_path / "server", port)}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("KUBETUNE_MLFLOW_SPOOL", str(tmp_path / "spool"))
    # A down server must not stall each call for minutes in MLflow's own HTTP retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    ctx = tracking.RunContext(model_name="outage", pipeline_run_id="run-outage", pipeline="peft")

    class StopServer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == KILL_AT:
                stop(server["proc"])

    try:
        _, tok = tokenized
        cfg = from_dict(TrainConfig, {"base_model": str(tiny_llama), "method": "lora", "max_steps": STEPS,
                                      "save_steps": 100, "batch_size": 2, "lora_rank": 4})
        result = run_training("train_peft", cfg, tok, tmp_path / "model", tmp_path / "ws", ctx=ctx,
                              callbacks=(StopServer(),))
        # Training finished although the server died at step 3 of 10.
        assert result.metrics["steps"] == STEPS and (tmp_path / "model" / "kubetune_method.json").exists()
        assert server["proc"].poll() is not None and not tracking.server_up()
        err = capfd.readouterr().err
        assert "is unreachable" in err and "will be sent when it answers again" in err
        spooled = tracking.pending_spool()
        assert len(spooled) == 1
        lines = [json.loads(x) for x in spooled[0].read_text().splitlines()]
        assert {r["step"] for r in lines if r["kind"] == "metrics" and "loss" in r["data"]} >= set(
            range(KILL_AT + 1, STEPS + 1))
        assert lines[-1] == {**lines[-1], "kind": "end", "data": {"status": "FINISHED"}}
        train_run = spooled[0].stem

        # Registration while the server is still down: backoff, then a clear error.
        _report(tmp_path / "eval.json")
        monkeypatch.setenv("KUBETUNE_MLFLOW_WAIT_S", "4")
        with pytest.raises(StageError, match=r"did not answer for 4 s \(\d+ attempts\); nothing was written"):
            register(RegisterConfig(model_name="outage"), tmp_path / "model", tmp_path / "eval.json", ctx=ctx)
        assert "retrying in" in capfd.readouterr().err

        # Registration again; the server comes back while it waits: it goes through.
        monkeypatch.setenv("KUBETUNE_MLFLOW_WAIT_S", "300")
        out = {}
        worker = threading.Thread(target=lambda: out.update(r=register(
            RegisterConfig(model_name="outage"), tmp_path / "model", tmp_path / "eval.json", ctx=ctx)))
        worker.start()
        server["proc"] = start_mlflow(tmp_path / "server", port)
        worker.join(300)
        assert out["r"].version == "1" and out["r"].promoted

        # Everything spooled was replayed: the loss of every step, the final metrics, the status.
        mlflow.set_tracking_uri(url)
        client = MlflowClient()
        assert not tracking.pending_spool()
        steps = sorted(m.step for m in client.get_metric_history(train_run, "loss"))
        assert steps == list(range(1, STEPS + 1)), steps
        run = client.get_run(train_run)
        assert run.info.status == "FINISHED" and run.data.metrics["steps"] == STEPS
        # The failed attempt registered nothing: exactly one version exists.
        assert [v.version for v in client.search_model_versions("name='outage'")] == ["1"]
    finally:
        stop(server["proc"])
        mlflow.set_tracking_uri(None)
