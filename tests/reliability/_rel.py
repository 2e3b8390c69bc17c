"""Helpers of the reliability tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

from kubetune.testing import free_port, wait_http  # noqa: E402,F401 - re-exported to the tests


def rows(n: int = 48) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}", "input": "", "output": f"{2 * i + 1}"} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KUBETUNE_NO_PROGRESS": "1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


def start_mlflow(root: Path, port: int, wait: bool = True) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port over an SQLite file in root (restartable)."""
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / f"server-{time.time():.0f}.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                             "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
                             str(root / "artifacts")], stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(), start_new_session=True)
    if wait:
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
    return proc


def start_moto(port: int, log_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log_path, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}", 60, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Kill a server we started and its workers (its own process group, by id) and reap it."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # `mlflow server` serves from child processes
    except ProcessLookupError:
        pass
    proc.wait(30)
