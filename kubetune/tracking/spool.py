"""The offline spool: a training job must not die because the tracking server restarted.

While the server does not answer, metrics, params and tags of the active run are appended to a
local spool ($KUBETUNE_WORKSPACE/mlflow-spool/<run id>.jsonl) and sent, with their original steps
and timestamps, as soon as it answers again (the next log call, or the next stage's start).
Only an http(s) server is spooled for: a database URI that fails is a real error.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

from kubetune.core import defaults
from kubetune.tracking.server import _is_server, _tell, server_up, tracking_uri


_SPOOL_LOCK = threading.RLock()
_TOLD = set()


def spool_dir() -> Path:
    """One folder per tracking server: a spool is only ever replayed to the server it was meant for."""
    import hashlib

    root = os.environ.get("KUBETUNE_MLFLOW_SPOOL")
    root = Path(root) if root else Path(defaults.workspace()) / "mlflow-spool"
    return root / hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def _spool(run_id: str, kind: str, data: dict, step: int | None = None) -> None:
    path = spool_dir() / f"{run_id}.jsonl"
    with _SPOOL_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "data": data, "step": step, "ts": int(time.time() * 1000)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    if run_id not in _TOLD:
        _TOLD.add(run_id)
        _tell(f"MLflow server {tracking_uri()} is unreachable; {kind} of run {run_id} are kept in {path} and "
              "will be sent when it answers again (nothing is lost)")


def _resilient(kind: str, fn, data: dict, step: int | None = None, **kw) -> None:
    """Call an mlflow logging function; spool instead when the server is down."""
    run_id = _active_run_id()
    if kind == "metrics":
        kw["step"] = step
    if not _is_server() or run_id is None:
        fn(data, **kw)
        return
    if server_up():
        if pending_spool():
            replay_spool()
        try:
            fn(data, **kw)
            return
        except Exception:
            if server_up():
                raise  # the server answers: a real error (bad value), not an outage
    _spool(run_id, kind, {k: (v if kind == "metrics" else str(v)) for k, v in data.items()}, step)


def pending_spool() -> list[Path]:
    d = spool_dir()
    return sorted(d.glob("*.jsonl")) if d.exists() else []


def replay_spool() -> int:
    """Send everything spooled to the (now answering) server; return how many records were sent."""
    if not pending_spool() or not server_up():
        return 0
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client, sent = MlflowClient(), 0
    with _SPOOL_LOCK:
        for path in pending_spool():
            try:
                sent += _replay_file(client, path, Metric, Param, RunTag)
            except Exception as e:  # a spool that cannot be replayed must not fail the stage that finds it
                path.rename(path.with_suffix(".failed"))
                _tell(f"could not replay {path} ({type(e).__name__}: {str(e)[:200]}); kept as "
                      f"{path.with_suffix('.failed')}")
    return sent


def _replay_file(client, path: Path, Metric, Param, RunTag) -> int:
    run_id = path.stem
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metrics, params, tags, end = [], {}, {}, None
    for r in records:
        if r["kind"] == "metrics":
            metrics += [Metric(k, float(v), r["ts"], r["step"] or 0) for k, v in r["data"].items()]
        elif r["kind"] == "params":
            params.update(r["data"])
        elif r["kind"] == "tags":
            tags.update(r["data"])
        elif r["kind"] == "end":
            end = r["data"]["status"]
    for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    if params or tags:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    if end:
        client.set_terminated(run_id, end)
    path.unlink()
    _tell(f"MLflow server answers again: sent {len(records)} spooled record(s) of run {run_id}")
    return len(records)


def _end_run(run_id: str, status: str) -> None:
    import mlflow

    if _is_server() and not server_up():
        _pop_active(run_id)
        _spool(run_id, "end", {"status": status})
        return
    try:
        if pending_spool():
            replay_spool()
        mlflow.end_run(status)
    except Exception:
        if not _is_server() or server_up():
            raise
        _pop_active(run_id)
        _spool(run_id, "end", {"status": status})


def _pop_active(run_id: str) -> None:
    """Forget the active run locally without a request to the server (it is down)."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    while stack and stack[-1].info.run_id != run_id:
        stack.pop()
    if stack:
        stack.pop()


@contextlib.contextmanager
def resilient_logging():
    """Route the Trainer's MLflow reporting (``mlflow.log_metrics``/``log_params``) through the spool.

    transformers' MLflowCallback calls ``mlflow.log_metrics(..., synchronous=False)`` on the
    module; asynchronous logging drops a batch the server refuses, so for the duration of a
    stage those calls are made synchronous and spooled when the server is down.
    """
    import mlflow

    orig_metrics, orig_params = mlflow.log_metrics, mlflow.log_params

    def log_metrics_(metrics, step=None, synchronous=None, **kw):
        _resilient("metrics", orig_metrics, {k: v for k, v in metrics.items()}, step=step, **kw)

    def log_params_(params, synchronous=None, **kw):
        _resilient("params", orig_params, dict(params), **kw)

    mlflow.log_metrics, mlflow.log_params = log_metrics_, log_params_
    try:
        yield
    finally:
        mlflow.log_metrics, mlflow.log_params = orig_metrics, orig_params
