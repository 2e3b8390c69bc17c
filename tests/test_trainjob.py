"""Multi-node launcher: the job manifests field by field, and the client side against a real
HTTP server on 127.0.0.1 that stands in for the Kubernetes API (no mocks of the client)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from kubetune.ops.kube import load_profile
from kubetune.launcher.trainjob import (
    TrainJobFailed,
    build_manifest,
    job_name,
    job_state,
    main,
    run_job,
)

CFG = "/workspace/runs/r1/train.json"


@pytest.fixture
def profile():
    return load_profile("h200x2")


def _env(container_env):
    return {e["name"]: e for e in container_env}


def test_trainjob_manifest_fields(profile):
    m = build_manifest("kt-abc", CFG, num_nodes=3, profile=profile, image="reg/kubetune-train:9.9", namespace="team")
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert m["kind"] == "TrainJob"
    assert m["metadata"]["name"] == "kt-abc" and m["metadata"]["namespace"] == "team"
    assert m["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    tr = m["spec"]["trainer"]
    assert tr["image"] == "reg/kubetune-train:9.9"
    # The same entry point as the single-pod path, under torchrun with operator-set PET_* vars.
    assert tr["command"] == ["torchrun", "-m", "kubetune.launcher.train_entry", "--config", CFG]
    assert tr["numNodes"] == 3 and tr["numProcPerNode"] == 2
    assert tr["resourcesPerNode"]["limits"] == {"cpu": "16", "memory": "120Gi", "nvidia.com/gpu": "2"}
    assert tr["resourcesPerNode"]["requests"] == tr["resourcesPerNode"]["limits"]
    env = _env(tr["env"])
    assert env["KUBETUNE_WORKSPACE"]["value"] == "/workspace"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kubetune-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {"name": "kubetune-mlflow", "key": "MLFLOW_TRACKING_URI"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # Placement, volume, security and service account travel as kubetune's runtime patch of
    # the runtime's "node" job (spec.runtimePatches, Trainer >= v2.2).
    (patch,) = m["spec"]["runtimePatches"]
    assert patch["manager"] == "kubetune.io/launcher"
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    ps = rjob["template"]["spec"]["template"]["spec"]
    assert ps["volumes"] == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "kubetune-workspace"}}]
    (c,) = ps["containers"]
    assert c["name"] == "node" and c["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert ps["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert ps["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "serviceAccountName" not in ps
    with_sa = build_manifest("kt-abc", CFG, num_nodes=2, profile=profile, service_account="trainer-sa")
    assert with_sa["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]["serviceAccountName"] == "trainer-sa"
    assert "podTemplateOverrides" not in m["spec"]


def test_pytorchjob_manifest_fields(profile):
    m = build_manifest("kt-abc", CFG, num_nodes=3, profile=profile, api="pytorchjob", image="img:1")
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = m["spec"]
    assert spec["nprocPerNode"] == "2"
    assert spec["runPolicy"]["backoffLimit"] == 0
    reps = spec["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 2  # 3 nodes = 1 master + 2 workers
    for rep in reps.values():
        pod = rep["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"  # the training operator finds its container by this name
        assert c["command"] == ["torchrun", "-m", "kubetune.launcher.train_entry", "--config", CFG]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert c["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "kubetune-workspace"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]} and pod["securityContext"]["runAsNonRoot"]
    # One node: no Worker replica at all (a Worker with 0 replicas is rejected by the operator).
    single = build_manifest("kt-one", CFG, num_nodes=1, profile=profile, api="pytorchjob")
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_manifest_holds_secret_references_only(profile):
    for api in ("trainjob", "pytorchjob"):
        m = build_manifest("kt-abc", CFG, num_nodes=2, profile=profile, api=api)
        text = json.dumps(m)
        envs = re.findall(r'\{"name": "(AWS_[A-Z_]+|MLFLOW_[A-Z_]+)", "(\w+)"', text)
        assert envs and all(kind == "valueFrom" for _, kind in envs), envs


def test_bad_arguments_are_refused(profile):
    with pytest.raises(ValueError, match="api must be one of"):
        build_manifest("x", CFG, num_nodes=1, profile=profile, api="mpijob")
    with pytest.raises(ValueError, match="num_nodes"):
        build_manifest("x", CFG, num_nodes=0, profile=profile)


def test_job_name_is_an_rfc1035_label_and_fresh():
    a, b = job_name("kubetune-train"), job_name("kubetune-train")
    assert a != b
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 63


def test_job_state_reads_conditions():
    assert job_state({}, "trainjob") == ("Pending", "")
    running = {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}}
    assert job_state(running, "pytorchjob")[0] == "Running"
    done = {"status": {"conditions": [{"type": "Complete", "status": "True", "message": "ok"}]}}
    assert job_state(done, "trainjob") == ("Succeeded", "ok")
    # A False condition is not a verdict.
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "False"}]}}, "trainjob")[0] == "Pending"


# ---------------------------------------------------------------------------------------
# A stand-in Kubernetes API server: records every request, answers from a script.
# ---------------------------------------------------------------------------------------


class FakeKubeAPI:
    def __init__(self, statuses, log_lines=("step 1 loss 2.0", "step 2 loss 1.5"), on_create=None, status_of=None):
        self.on_create = on_create  # called with each created object (e.g. to run the job)
        self.status_of = status_of  # name -> status; else the scripted statuses
        self.requests: list[tuple[str, str, dict, object]] = []
        self.statuses = list(statuses)
        self.log_lines = list(log_lines)
        self.objects: dict[str, dict] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body=None):
                url = urlparse(self.path)
                api.requests.append((self.command, url.path, parse_qs(url.query), body))
                return url.path, parse_qs(url.query)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path, _ = self._record(body)
                api.objects[body["metadata"]["name"]] = body
                if api.on_create:
                    api.on_create(body)
                self._send(201, body)

            def do_GET(self):
                path, query = self._record()
                if path.endswith("/log"):
                    return self._send(200, "".join(f"{line}\n" for line in api.log_lines).encode(), "text/plain")
                if path.endswith("/pods"):
                    pod = {"metadata": {"name": "rank0-pod"}, "status": {"phase": "Running"}}
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]})
                name = path.rsplit("/", 1)[-1]
                if api.status_of:
                    return self._send(200, {**api.objects[name], "status": api.status_of(name)})
                status = api.statuses.pop(0) if len(api.statuses) > 1 else api.statuses[0]
                self._send(200, {**api.objects[name], "status": status})

            def do_DELETE(self):
                self._record()
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def client(self):
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return client.ApiClient(cfg)


def _cond(kind, message=""):
    return {"conditions": [{"type": kind, "status": "True", "message": message}]}


def test_run_job_success_streams_logs_and_cleans_up(profile):
    manifest = build_manifest("kt-ok", CFG, num_nodes=2, profile=profile, namespace="team")
    lines: list[str] = []
    with FakeKubeAPI([{}, _cond("Running"), _cond("Running"), _cond("Complete", "done")]) as kube:
        final = run_job(manifest, api_client=kube.client(), poll_s=0.02, emit=lines.append)
    methods = [(m, p) for m, p, _, _ in kube.requests]
    base = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs"
    assert methods[0] == ("POST", base)
    assert kube.requests[0][3] == manifest  # what the API got is exactly the built manifest
    assert ("GET", f"{base}/kt-ok") in methods
    assert methods[-1] == ("DELETE", f"{base}/kt-ok")
    pod_queries = [q for m, p, q, _ in kube.requests if p == "/api/v1/namespaces/team/pods"]
    assert "jobset.sigs.k8s.io/jobset-name=kt-ok" in pod_queries[0]["labelSelector"][0]
    log_queries = [q for m, p, q, _ in kube.requests if p.endswith("/rank0-pod/log")]
    assert log_queries and log_queries[0]["container"] == ["node"] and log_queries[0]["follow"][0].lower() == "true"
    assert "[rank0-pod] step 2 loss 1.5" in lines
    assert any("Succeeded" in line for line in lines)
    assert final["status"]["conditions"][0]["type"] == "Complete"


def test_run_job_failure_raises_and_still_deletes(profile):
    manifest = build_manifest("kt-bad", CFG, num_nodes=2, profile=profile, api="pytorchjob", namespace="team")
    lines: list[str] = []
    with FakeKubeAPI([_cond("Running"), _cond("Failed", "NCCL timeout on rank 3")]) as kube:
        with pytest.raises(TrainJobFailed, match="NCCL timeout on rank 3"):
            run_job(manifest, api_client=kube.client(), poll_s=0.02, emit=lines.append)
    base = "/apis/kubeflow.org/v1/namespaces/team/pytorchjobs"
    assert (kube.requests[-1][0], kube.requests[-1][1]) == ("DELETE", f"{base}/kt-bad")
    pod_queries = [q for m, p, q, _ in kube.requests if p.endswith("/pods")]
    assert "training.kubeflow.org/replica-type=master" in pod_queries[0]["labelSelector"][0]
    log_queries = [q for m, p, q, _ in kube.requests if p.endswith("/log")]
    assert log_queries[0]["container"] == ["pytorch"]


def test_run_job_timeout_deletes_the_job(profile):
    manifest = build_manifest("kt-slow", CFG, num_nodes=1, profile=profile, namespace="team")
    with FakeKubeAPI([_cond("Running")]) as kube:
        with pytest.raises(TimeoutError):
            run_job(manifest, api_client=kube.client(), poll_s=0.02, timeout_s=0.2, emit=lambda s: None)
    assert kube.requests[-1][0] == "DELETE"


def test_cli_dry_run_prints_the_manifest(capsys):
    assert main(["--config", CFG, "--nodes", "4", "--profile", "a100x8", "--namespace", "ml", "--dry-run"]) == 0
    m = yaml.safe_load(capsys.readouterr().out)
    assert m["kind"] == "TrainJob" and m["metadata"]["namespace"] == "ml"
    assert m["spec"]["trainer"]["numNodes"] == 4 and m["spec"]["trainer"]["numProcPerNode"] == 8
    # Master and Worker templates are written out in full, not as YAML anchors and aliases.
    assert main(["--config", CFG, "--nodes", "2", "--profile", "a100x8", "--api", "pytorchjob", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "&id" not in out and yaml.safe_load(out)["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


def test_nodes_above_one_train_through_a_trainjob(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    """The training stage with KUBETUNE_NODES=2 becomes the launcher: it stages the data on the
    workspace, creates a TrainJob through the Kubernetes API (kubeconfig -> a stand-in server),
    and the job's "node" runs the manifest's own command with the PET_* variables the Trainer
    sets (here one node on the CPU, for real); the model comes back as the stage's output."""
    import dataclasses
    import os
    import subprocess
    import sys
    import time as _time

    from kubetune.ops import kube

    from kubetune.launcher import trainjob
    from kubetune.stages.train_peft import train_peft
    from kubetune.testing import free_port
    from kubetune.core.train import TrainConfig

    _, tok_dir = tiny_tickets
    ws = tmp_path / "ws"
    prof = dataclasses.replace(load_profile("cpu"), workspace_path=str(ws), model_cache=str(ws / "cache"),
                               s3_secret="", mlflow_secret="", allow_file_store=True)
    procs: dict[str, subprocess.Popen] = {}

    def run_node(body):  # what the Trainer's node pod does with the TrainJob
        tr = body["spec"]["trainer"]
        env = {**os.environ, **{e["name"]: e["value"] for e in tr["env"] if "value" in e},
               "PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "1",
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port()),
               "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        for k in (kube.NPROC_ENV, "KUBETUNE_NODES", kube.PROFILE_ENV):
            env.pop(k, None)
        procs[body["metadata"]["name"]] = subprocess.Popen(tr["command"], env=env)

    def status_of(name):
        code = procs[name].poll()
        if code is None:
            return _cond("Running")
        return _cond("Complete") if code == 0 else _cond("Failed", f"exit {code}")

    real_sleep = _time.sleep
    monkeypatch.setattr(trainjob.time, "sleep", lambda s: real_sleep(min(s, 0.2)))
    monkeypatch.setenv("KUBETUNE_NODES", "2")
    monkeypatch.setenv(kube.PROFILE_ENV, json.dumps(dataclasses.asdict(prof)))
    monkeypatch.setenv(kube.SERVICE_ACCOUNT_ENV, "pipeline-runner")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with FakeKubeAPI([], on_create=run_node, status_of=status_of) as kube_api:
        port = kube_api.server.server_address[1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
            "users": [{"name": "u", "user": {"token": "x"}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        cfg = TrainConfig(base_model=str(tiny_llama), method="lora", max_steps=2, learning_rate=3e-3, batch_size=1,
                          lora_rank=4)
        result = train_peft(cfg, tok_dir, tmp_path / "model", ws)
    (created,) = [b for m, p, _, b in kube_api.requests if m == "POST"]
    assert created["kind"] == "TrainJob" and created["spec"]["trainer"]["numNodes"] == 2
    pod = created["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pipeline-runner"
    # The job read its data from, and wrote its model to, the shared workspace.
    cfg_path = created["spec"]["trainer"]["command"][-1]
    assert cfg_path.startswith(str(ws)) and json.loads(open(cfg_path).read())["tokenized_dir"].startswith(str(ws))
    assert result.metrics["steps"] == 2 and result.output_dir == str(tmp_path / "model")
    assert (tmp_path / "model" / "adapter_model.safetensors").exists()
    assert [m for m, *_ in kube_api.requests][-1] == "DELETE"


@pytest.mark.parametrize("name", ["peft", "full"])
def test_nodes_parameter_reaches_the_training_step(name, tmp_path):
    """``nodes`` is a pipeline parameter wired into the train step, which carries the profile
    and its pod's service account (downward API) for the launcher."""
    import importlib

    from kfp import compiler

    from kubetune.ops.kube import PROFILE_ENV, SERVICE_ACCOUNT_ENV, Profile

    module = importlib.import_module(f"kubetune.pipelines.{name}")
    out = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(module.build(load_profile("h200x2")), str(out))
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["nodes"]["defaultValue"] == 1
    step = f"train-{name}"
    wired = [t["inputs"]["parameters"]["nodes"] for c in spec["components"].values()
             for n, t in c.get("dag", {}).get("tasks", {}).items() if n == step]
    assert wired == [{"componentInputParameter": "pipelinechannel--nodes"}]
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["env"]}
    assert Profile.from_dict(json.loads(env[PROFILE_ENV])) == load_profile("h200x2")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{step}"]
    assert {"name": SERVICE_ACCOUNT_ENV, "fieldPath": "spec.serviceAccountName"} in k8s["fieldPathAsEnv"]
