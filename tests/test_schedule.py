"""`kubetune schedule / schedules / unschedule` against a real HTTP server on 127.0.0.1.

We have no KFP backend here; the server answers the few KFP v2beta1 REST calls the client
makes (healthz, experiments, recurring runs) and records every request, so the test checks
what a real backend would receive, field by field.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from kubetune.cli import main

API = "/apis/v2beta1"


class FakeKFP:
    """Records requests; keeps experiments and recurring runs in memory."""

    def __init__(self):
        self.calls: list[dict] = []
        self.experiments: list[dict] = []
        self.recurring: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                url = urlparse(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                fake.calls.append({"method": method, "path": url.path, "query": parse_qs(url.query), "body": body,
                                   "authorization": self.headers.get("Authorization")})
                code, out = fake.route(method, url.path, parse_qs(url.query), body)
                self._reply(code, out)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method, path, query, body):
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if path == f"{API}/experiments" and method == "GET":
            flt = json.loads(query.get("filter", ["{}"])[0])
            names = [p.get("stringValue") or p.get("string_value") for p in flt.get("predicates", [])]
            return 200, {"experiments": [e for e in self.experiments if not names or e["display_name"] in names]}
        if path == f"{API}/experiments" and method == "POST":
            exp = {**body, "experiment_id": f"exp-{len(self.experiments) + 1}"}
            self.experiments.append(exp)
            return 200, exp
        if path == f"{API}/recurringruns" and method == "POST":
            rr = {**body, "recurring_run_id": f"rr-{uuid.uuid4().hex[:8]}", "status": "ENABLED"}
            self.recurring[rr["recurring_run_id"]] = rr
            return 200, rr
        if path == f"{API}/recurringruns" and method == "GET":
            return 200, {"recurringRuns": list(self.recurring.values()), "total_size": len(self.recurring)}
        if path.startswith(f"{API}/recurringruns/") and method == "DELETE":
            self.recurring.pop(path.rsplit("/", 1)[-1], None)
            return 200, {}
        return 404, {"error": f"no route {method} {path}"}


@pytest.fixture
def kfp_server(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json from the machine
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "test-token-123")
    import kfp.client.client as kc

    monkeypatch.setattr(kc.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-context.json"))
    fake = FakeKFP()
    fake.thread.start()
    yield fake
    fake.server.shutdown()


def test_schedule_payload_list_and_unschedule(kfp_server, tmp_path, capsys):
    cfg = tmp_path / "weekly.yaml"
    cfg.write_text("max_steps: 30\nmethod: dora\ndata_uri: s3://bucket/tickets.jsonl\n")

    assert main(["schedule", "peft", "--cron", "0 3 * * 1", "--config", str(cfg), "--host", kfp_server.url,
                 "--set", "learning_rate=0.0002"]) == 0

    posts = [c for c in kfp_server.calls if c["method"] == "POST"]
    assert [c["path"] for c in posts] == [f"{API}/experiments", f"{API}/recurringruns"]
    assert posts[0]["body"]["display_name"] == "kubetune"
    rr = posts[1]["body"]
    # The recurring-run payload, field by field.
    assert rr["display_name"] == "kubetune-peft"
    assert rr["experiment_id"] == "exp-1"
    assert rr["mode"] == "ENABLE"
    assert int(rr["max_concurrency"]) == 1
    assert rr["no_catchup"] is True
    assert rr["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert rr["runtime_config"]["parameters"] == {"max_steps": 30, "method": "dora",
                                                  "data_uri": "s3://bucket/tickets.jsonl", "learning_rate": 0.0002}
    spec = rr["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "peft"
    # The compiled pipeline travels inline: the skip-when-unchanged branch and its parameters are in it.
    assert "force" in spec["root"]["inputDefinitions"]["parameters"]
    assert "comp-register-skipped" in spec["components"]
    assert spec["root"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "STRING"
    # Auth: the bearer token from KF_PIPELINES_TOKEN reached the server, and was not printed.
    assert posts[1]["authorization"] == "Bearer test-token-123"
    out = capsys.readouterr().out
    assert "test-token-123" not in out and "0 0 3 * * 1" in out

    assert main(["schedules", "--host", kfp_server.url]) == 0
    listed = capsys.readouterr().out
    rr_id = next(iter(kfp_server.recurring))
    assert rr_id in listed and "kubetune-peft" in listed and "no" in listed.split("\n")[1]

    assert main(["unschedule", "kubetune-peft", "--host", kfp_server.url]) == 0
    assert kfp_server.calls[-1]["method"] == "DELETE" and kfp_server.calls[-1]["path"] == f"{API}/recurringruns/{rr_id}"
    assert kfp_server.recurring == {}
    assert main(["unschedule", "kubetune-peft", "--host", kfp_server.url]) == 1


def test_schedule_catchup_six_field_cron_and_bad_input(kfp_server, capsys):
    assert main(["schedule", "peft", "--cron", "30 0 */6 * * *", "--host", kfp_server.url, "--catchup",
                 "--name", "six-hourly"]) == 0
    rr = [c for c in kfp_server.calls if c["path"] == f"{API}/recurringruns"][0]["body"]
    assert rr["trigger"]["cron_schedule"]["cron"] == "30 0 */6 * * *"
    assert rr["no_catchup"] is False and rr["display_name"] == "six-hourly"
    n = len(kfp_server.calls)
    # Wrong cron or an unknown parameter fail before anything reaches the server.
    assert main(["schedule", "peft", "--cron", "* * *", "--host", kfp_server.url]) == 1
    assert main(["schedule", "peft", "--cron", "0 3 * * 1", "--host", kfp_server.url, "--set", "nope=1"]) == 1
    assert len(kfp_server.calls) == n
    assert "5 fields" in capsys.readouterr().err
