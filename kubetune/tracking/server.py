"""Where MLflow is, whether it answers, and what its errors mean.

Where: ``MLFLOW_TRACKING_URI`` if set (a server, or a database URI), else an SQLite file
``mlflow.db`` in the working directory, MLflow 3's own default. A stage waits for a server
that does not answer yet (:func:`wait_for_server`); a database URI is always "up", since a
database that fails is a real error, not an outage to wait out.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

from kubetune.errors import StageError


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow at the tracking URI (and the registry at the same place unless set)."""
    import mlflow

    from kubetune.ops.kube import refuse_file_store_in_pod

    uri = tracking_uri()
    refuse_file_store_in_pod(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def _is_server(uri: str | None = None) -> bool:
    return (uri or tracking_uri()).startswith(("http://", "https://"))


def server_up(timeout: float = 5.0) -> bool:
    """Whether the tracking server answers /health now (always True for a database URI)."""
    uri = tracking_uri()
    if not _is_server(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # refused, reset, timed out, 5xx: all mean "not now"
        return False


def wait_for_server(what: str, timeout_s: float | None = None, quiet: bool = False) -> None:
    """Wait with exponential backoff (1, 2, 4 ... 30 s) until MLflow answers, else StageError.

    Args:
        what: Who waits (named in the messages).
        timeout_s: How long to wait; None = ``KUBETUNE_MLFLOW_WAIT_S`` (default 300 s).
        quiet: No line per retry (a CLI command prints its one error line only).
    """
    if not _is_server():
        return
    timeout_s = float(os.environ.get("KUBETUNE_MLFLOW_WAIT_S", "300")) if timeout_s is None else timeout_s
    deadline, delay, attempt = time.monotonic() + timeout_s, 1.0, 1
    while not server_up():
        left = deadline - time.monotonic()
        if left <= 0:
            raise StageError(f"{what}: the MLflow server {tracking_uri()} did not answer for {timeout_s:.0f} s "
                             f"({attempt} attempts); nothing was written to it. Start it (or fix "
                             "MLFLOW_TRACKING_URI) and rerun; KUBETUNE_MLFLOW_WAIT_S sets how long to wait")
        if not quiet:
            _tell(f"{what}: MLflow server {tracking_uri()} is not answering; attempt {attempt}, retrying in "
                  f"{min(delay, left):.0f} s")
        time.sleep(min(delay, left))
        delay, attempt = min(delay * 2, 30.0), attempt + 1


def _tell(message: str) -> None:
    print(f"kubetune: {message}", file=sys.stderr, flush=True)


def has_error_code(e: Exception, code: str) -> bool:
    """Whether an MLflow error carries ``code``: as its ``error_code`` (a store's exception) or in
    its text (a REST answer relayed by a server: 'RESOURCE_DOES_NOT_EXIST: ...')."""
    return getattr(e, "error_code", None) == code or code in str(e)


def already_exists(e: Exception) -> bool:
    """Whether an MLflow error says that the thing being created exists already."""
    return has_error_code(e, "RESOURCE_ALREADY_EXISTS") or "already exists" in str(e).lower()
