"""Killed training: SIGKILL mid-run, rerun resumes from the last complete checkpoint.

A half-written checkpoint (no completion marker) is skipped, and the resumed run ends at the
same loss as an uninterrupted one with the same seed (within 1%).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _rel import HERE, child_env

from kubetune.core.config import from_dict
from kubetune.core.train import (COMPLETE_MARKER, TrainConfig, checkpoint_dir_for, commit_checkpoint,
                            last_complete_checkpoint, run_training)

CONFIG = {"method": "lora", "max_steps": 12, "save_steps": 4, "batch_size": 2, "seed": 7, "lora_rank": 4}


def _spec(tokenized, tiny_llama, root: Path, **fault) -> str:
    return json.dumps({"tokenized": str(tokenized), "output": str(root / "model"), "workspace": str(root / "ws"),
                       "config": {**CONFIG, "base_model": str(tiny_llama)}, **fault})


def _train_runs() -> dict:
    """{pipeline run id: (train run, its parent run)} in the experiment of the jobs below."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("kubetune/resume")
    out = {}
    for run in client.search_runs([exp.experiment_id], "tags.`kubetune.stage` = 'train_peft'"):
        out[run.data.tags["kubetune.pipeline_run_id"]] = (run, client.get_run(run.data.tags["mlflow.parentRunId"]))
    return out


def _run(spec: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "_train_job.py"), spec], capture_output=True, text=True,
                          timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigkill_then_resume_matches_uninterrupted_run(tokenized, tiny_llama, tmp_path, mlflow_uri):
    _, tok = tokenized
    meta = json.loads((tok / "meta.json").read_text())
    ckpts = checkpoint_dir_for(tmp_path / "ws", TrainConfig(**CONFIG, base_model=str(tiny_llama)), meta)

    # 1. Start training slowly and SIGKILL it as soon as a checkpoint is complete.
    proc = subprocess.Popen([sys.executable, str(HERE / "_train_job.py"),
                             _spec(tok, tiny_llama, tmp_path, sleep_per_step=0.5, ctx=["resume", "killed"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    deadline = time.time() + 240
    while last_complete_checkpoint(ckpts) is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint was completed in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    done = last_complete_checkpoint(ckpts)
    killed_at = int(done.name.split("-")[-1])
    assert killed_at < CONFIG["max_steps"] and not (tmp_path / "model").exists()

    # 2. A half-written newer checkpoint (what a kill during a save leaves): files, no marker.
    half = ckpts / "checkpoint-999"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    (half / "trainer_state.json").write_text('{"global_step": 9')
    assert last_complete_checkpoint(ckpts) == done

    # 3. Rerun: resumes from the complete checkpoint, skips the partial one, finishes.
    assert _train_runs()["killed"][0].info.status == "RUNNING"  # nothing ended the killed job's run
    resumed = _run(_spec(tok, tiny_llama, tmp_path, ctx=["resume", "rerun"]))
    assert resumed["resumed_from_step"] == killed_at
    # The rerun that resumed its checkpoint marked the killed job's run, and its pipeline run, KILLED.
    runs = _train_runs()
    (killed, killed_parent), (rerun, _) = runs["killed"], runs["rerun"]
    assert killed.info.status == "KILLED" and killed_parent.info.status == "KILLED"
    assert killed.data.tags["kubetune.ended_by"] == f"resumed by run {rerun.info.run_id}"
    assert rerun.info.status == "FINISHED"
    assert resumed["steps"] == CONFIG["max_steps"]
    assert (tmp_path / "model" / "kubetune_method.json").exists()
    assert not ckpts.exists()  # cleaned once the model is saved

    # 4. The same job uninterrupted (in this process), in another workspace: same final loss within 1%.
    cfg = from_dict(TrainConfig, {**CONFIG, "base_model": str(tiny_llama)})
    clean = run_training("train_peft", cfg, tok, tmp_path / "clean" / "model", tmp_path / "clean" / "ws").metrics
    assert clean["resumed_from_step"] == 0
    assert abs(resumed["train_loss_last"] - clean["train_loss_last"]) <= 0.01 * abs(clean["train_loss_last"]), \
        (resumed["train_loss_last"], clean["train_loss_last"])
    assert resumed["train_loss_last"] < resumed["train_loss_first"]


def test_commit_is_write_fsync_rename(tmp_path, monkeypatch):
    """The marker appears by rename only after every file of the checkpoint was fsynced."""
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"w" * 10)
    (ckpt / "optimizer.pt").write_bytes(b"o" * 10)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    commit_checkpoint(ckpt, 4)
    synced = [p for kind, p in events if kind == "fsync"]
    rename_at = events.index(("rename", str(ckpt / COMPLETE_MARKER)))
    synced_before = [p for kind, p in events[:rename_at] if kind == "fsync"]
    for name in ("model.safetensors", "optimizer.pt"):
        assert str(ckpt / name) in synced_before
    # the marker's own temporary file (written, then renamed onto the marker) was synced too
    assert any(Path(p).name.startswith(COMPLETE_MARKER + ".") and p.endswith(".tmp") for p in synced_before)
    assert str(ckpt) in synced[-2:] and (ckpt / COMPLETE_MARKER).read_text() == "4"
    assert sorted(p.name for p in ckpt.iterdir()) == [COMPLETE_MARKER, "model.safetensors", "optimizer.pt"]
