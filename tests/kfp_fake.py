"""A KFP v2beta1 REST API on 127.0.0.1, for testing what the real ``kfp.Client`` sends.

There is no KFP backend on a test machine. This server answers the calls ``kubetune submit``
and ``kubetune schedule`` make through the real client (healthz, experiments, pipeline and
pipeline-version upload and listing, runs, recurring runs), with the field names of the
``kfp_server_api`` models (their ``attribute_map``), and checks what the real backend checks
where a test depends on it: unique pipeline names per namespace and version names per
pipeline, a run's pipeline version exists, an upload is a pipeline spec, and a standalone
(single-user) server refuses namespaced experiment requests. Every request is
recorded, so a test asserts on what a real backend would have received.
"""

from __future__ import annotations

import json
import threading
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"


def _one(query: dict, key: str) -> str | None:
    return query.get(key, [None])[0]


def _uploaded_file(content_type: str, body: bytes) -> bytes:
    """The ``uploadfile`` part of a multipart/form-data body (what the client's upload sends)."""
    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise ValueError("no uploadfile part")


class FakeKFP:
    """Records requests; keeps experiments, pipelines, versions, runs and recurring runs in memory.

    Args:
        run_states: States a run reports on successive GETs (the last one repeats).
        multi_user: What healthz reports.
    """

    def __init__(self, run_states: tuple[str, ...] = ("PENDING", "RUNNING", "SUCCEEDED"), multi_user: bool = False):
        self.calls: list[dict] = []
        self.experiments: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.run_states = run_states
        self.multi_user = multi_user
        self._gets: dict[str, int] = {}
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
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ctype = self.headers.get("Content-Type") or ""
                if ctype.startswith("multipart/form-data"):
                    body = {"uploadfile": _uploaded_file(ctype, raw).decode()}
                else:
                    body = json.loads(raw) if raw else None
                query = parse_qs(url.query)
                fake.calls.append({"method": method, "path": url.path, "query": query, "body": body,
                                   "authorization": self.headers.get("Authorization")})
                try:
                    code, out = fake.route(method, url.path, query, body)
                except (KeyError, ValueError, yaml.YAMLError) as e:
                    code, out = 400, {"error": str(e), "code": 3}
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

    def start(self) -> FakeKFP:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ what tests read

    def posts(self, path_suffix: str) -> list[dict]:
        return [c for c in self.calls if c["method"] == "POST" and c["path"] == API + path_suffix]

    def spec_of_version(self, version_id: str) -> tuple[dict, dict]:
        """The uploaded pipeline spec and its Kubernetes platform spec ({} if none)."""
        docs = list(yaml.safe_load_all(self.versions[version_id]["_yaml"]))
        platform = docs[1]["platforms"]["kubernetes"] if len(docs) > 1 else {}
        return docs[0], platform

    # ------------------------------------------------------------------ the API

    def route(self, method, path, query, body):  # noqa: C901 - one branch per endpoint, as a router is
        if path == f"{API}/healthz":
            return 200, {"multi_user": self.multi_user}
        if path == f"{API}/experiments" and not self.multi_user and (_one(query, "namespace") or
                                                                     (body or {}).get("namespace")):
            return 400, {"error": "In single-user mode, experiment requests cannot carry a namespace.", "code": 3}
        if path == f"{API}/experiments" and method == "GET":
            names = self._filter_names(query)
            ns = _one(query, "namespace")
            return 200, {"experiments": [e for e in self.experiments if (not names or e["display_name"] in names)
                                         and (ns is None or e.get("namespace") == ns)]}
        if path == f"{API}/experiments" and method == "POST":
            exp = {**body, "experiment_id": f"exp-{len(self.experiments) + 1}"}
            self.experiments.append(exp)
            return 200, exp
        if path == f"{API}/pipelines/upload" and method == "POST":
            name, ns = _one(query, "name"), _one(query, "namespace") or ""
            if any(p["display_name"] == name and p["namespace"] == ns for p in self.pipelines.values()):
                return 409, {"error": f"pipeline {name} already exists", "code": 6}
            pipeline = {"pipeline_id": f"pl-{uuid.uuid4().hex[:8]}", "display_name": name, "namespace": ns,
                        "description": _one(query, "description")}
            self._check_spec(body["uploadfile"])
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], name, pipeline["description"], body["uploadfile"])
            return 200, pipeline
        if path == f"{API}/pipelines/upload_version" and method == "POST":
            pid, name = _one(query, "pipelineid"), _one(query, "name")
            if pid not in self.pipelines:
                return 404, {"error": f"no pipeline {pid}", "code": 5}
            if any(v["pipeline_id"] == pid and v["display_name"] == name for v in self.versions.values()):
                return 409, {"error": f"version {name} already exists", "code": 6}
            self._check_spec(body["uploadfile"])
            return 200, self._public(self._add_version(pid, name, _one(query, "description"), body["uploadfile"]))
        if path == f"{API}/pipelines" and method == "GET":
            names = self._filter_names(query)
            ns = _one(query, "namespace") or ""
            found = [p for p in self.pipelines.values() if (not names or p["display_name"] in names)
                     and p["namespace"] == ns]
            return 200, {"pipelines": found, "total_size": len(found)}
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions") and method == "GET":
            pid = path.split("/")[-2]
            found = sorted((v for v in self.versions.values() if v["pipeline_id"] == pid),
                           key=lambda v: v["_n"], reverse=True)
            return 200, {"pipeline_versions": [self._public(v) for v in found], "total_size": len(found)}
        if path == f"{API}/runs" and method == "POST":
            ref = body.get("pipeline_version_reference") or {}
            version = self.versions.get(ref.get("pipeline_version_id"))
            if not body.get("pipeline_spec") and (not version or version["pipeline_id"] != ref.get("pipeline_id")):
                return 404, {"error": f"no pipeline version {ref}", "code": 5}
            run = {**body, "run_id": f"run-{uuid.uuid4().hex[:8]}", "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
        if path.startswith(f"{API}/runs/") and method == "GET":
            run_id = path.rsplit("/", 1)[-1]
            n = self._gets[run_id] = self._gets.get(run_id, -1) + 1
            self.runs[run_id]["state"] = self.run_states[min(n, len(self.run_states) - 1)]
            return 200, self.runs[run_id]
        if path == f"{API}/recurringruns" and method == "POST":
            rr = {**body, "recurring_run_id": f"rr-{uuid.uuid4().hex[:8]}", "status": "ENABLED"}
            self.recurring[rr["recurring_run_id"]] = rr
            return 200, rr
        if path == f"{API}/recurringruns" and method == "GET":
            return 200, {"recurringRuns": list(self.recurring.values()), "total_size": len(self.recurring)}
        if path.startswith(f"{API}/recurringruns/") and method == "DELETE":
            self.recurring.pop(path.rsplit("/", 1)[-1], None)
            return 200, {}
        return 404, {"error": f"no route {method} {path}", "code": 5}

    @staticmethod
    def _filter_names(query) -> list[str]:
        flt = json.loads(_one(query, "filter") or "{}")
        return [p.get("stringValue") or p.get("string_value") for p in flt.get("predicates", [])]

    @staticmethod
    def _check_spec(text: str) -> None:
        spec = next(yaml.safe_load_all(text))
        if not isinstance(spec, dict) or not {"pipelineInfo", "root", "deploymentSpec"} <= set(spec):
            raise ValueError("not a KFP pipeline spec")

    def _add_version(self, pid: str, name: str, description: str | None, text: str) -> dict:
        version = {"pipeline_id": pid, "pipeline_version_id": f"pv-{uuid.uuid4().hex[:8]}", "display_name": name,
                   "description": description, "_yaml": text, "_n": len(self.versions)}
        self.versions[version["pipeline_version_id"]] = version
        return version

    @staticmethod
    def _public(version: dict) -> dict:
        return {k: v for k, v in version.items() if not k.startswith("_")}
