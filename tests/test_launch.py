"""The distributed launcher (kubetune/launcher): the multi-node job manifests field by field, the
client side against a real HTTP server on 127.0.0.1 that stands in for the Kubernetes API (no
mocks of the client), one process per GPU under torchrun, FSDP, and the training stages run in
several processes on CPU. The rendered TrainJob against the vendored CRD schema is
tests/test_launch_schema.py's."""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch
import yaml

from kubetune.core.train import TrainConfig
from kubetune.launcher.trainjob import (
    TrainJobFailed,
    build_manifest,
    job_name,
    job_state,
    main,
    run_job,
)
from kubetune.ops import kube
from kubetune.ops.kube import load_profile
from kubetune.stages.train_peft import train_peft

REPO = Path(__file__).resolve().parent.parent
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


# --------------------------------------------------------------------------------------
# The launcher: one process per GPU under torchrun.
# --------------------------------------------------------------------------------------

ENTRY = '''
import json, os, sys

def main(config_path):
    cfg = json.load(open(config_path))
    rank = os.environ.get("RANK", "inproc")
    with open(os.path.join(cfg["out"], f"rank-{rank}.json"), "w") as f:
        json.dump({"world": os.environ.get("WORLD_SIZE"), "local_rank": os.environ.get("LOCAL_RANK"),
                   "argv": sys.argv[1:]}, f)
    if cfg.get("fail_rank") == rank:
        raise SystemExit(3)
    return "ran " + rank

if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--config") + 1])
'''


@pytest.fixture
def entry_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mods"
    pkg.mkdir()
    (pkg / "fake_entry.py").write_text(textwrap.dedent(ENTRY))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]))
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", kube.NPROC_ENV):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    return out


def _config(out, tmp_path, **extra):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"out": str(out), **extra}))
    return str(cfg)


def test_one_gpu_runs_in_process(entry_module, tmp_path, monkeypatch):
    from kubetune.launcher.launch import run_training

    monkeypatch.setenv(kube.NPROC_ENV, "1")
    result = run_training(_config(entry_module, tmp_path), module="fake_entry")
    assert result == "ran inproc"
    assert [p.name for p in entry_module.iterdir()] == ["rank-inproc.json"]


def test_two_gpus_reexecute_under_torchrun(entry_module, tmp_path, monkeypatch):
    from kubetune.launcher.launch import run_training

    monkeypatch.setenv(kube.NPROC_ENV, "2")  # what request_gpus(task, 2) exports
    cfg = _config(entry_module, tmp_path)
    assert run_training(cfg, module="fake_entry") is None
    ranks = {p.name: json.loads(p.read_text()) for p in entry_module.iterdir()}
    assert set(ranks) == {"rank-0.json", "rank-1.json"}
    assert {r["local_rank"] for r in ranks.values()} == {"0", "1"}
    assert all(r["world"] == "2" and r["argv"] == ["--config", cfg] for r in ranks.values())


def test_a_failing_worker_fails_the_launch(entry_module, tmp_path):
    import subprocess

    from kubetune.launcher.launch import run_training

    with pytest.raises(subprocess.CalledProcessError):
        run_training(_config(entry_module, tmp_path, fail_rank="1"), nproc=2, module="fake_entry")


def test_inside_torchrun_the_entry_point_runs_in_process(entry_module, tmp_path, monkeypatch):
    from kubetune.launcher.launch import run_training

    # A worker must not start torchrun again (that would fork N*N processes).
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_training(_config(entry_module, tmp_path), nproc=8, module="fake_entry") == "ran inproc"


def test_torchrun_command_is_the_shared_entry_point():
    from kubetune.launcher.launch import torchrun_command

    cmd = torchrun_command("/workspace/cfg.json", 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in cmd and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "kubetune.launcher.train_entry", "--config", "/workspace/cfg.json"]


def test_fsdp_arguments_are_accepted_by_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from kubetune.launcher.launch import fsdp_training_args

    assert fsdp_training_args(1) == {}
    args = TrainingArguments(output_dir=str(tmp_path), **fsdp_training_args(2))
    assert args.fsdp_config["version"] == 2
    # Sharded, resumable checkpoints: one file per rank, reloaded by resume_from_checkpoint.
    assert args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"


def test_fsdp_keeps_the_single_gpu_precision_regime(tiny_llama):
    """bf16-mixed (fp32 master weights): bf16 compute, fp32 gradient reduction; bf16 weights: untouched.

    accelerate's own FSDP2 policy (param, reduce and output all bf16, after upcasting bf16
    weights to fp32) made 2 GPUs train differently from one; docs/kubernetes.md has the numbers.
    """
    from types import SimpleNamespace

    from torch.distributed.fsdp import MixedPrecisionPolicy

    from kubetune.launcher.launch import fsdp_precision, weights_dtype
    from kubetune.core.train import TrainConfig, _use_bf16, load_for_training

    def fake_trainer(model, bf16):
        plugin = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, output_dtype=torch.bfloat16))
        return SimpleNamespace(model=model, args=SimpleNamespace(bf16=bf16),
                               accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))

    mixed = TrainConfig(base_model=str(tiny_llama), method="full", precision="bf16-mixed")
    model = load_for_training(mixed, "cpu")
    assert weights_dtype(model) == torch.float32 and _use_bf16(mixed, "cpu")
    trainer = fake_trainer(model, bf16=True)
    fsdp_precision(trainer)
    policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)

    pure = load_for_training(TrainConfig(base_model=str(tiny_llama), method="full", precision="bf16"), "cpu")
    assert weights_dtype(pure) == torch.bfloat16
    trainer = fake_trainer(pure, bf16=False)  # the training core turns AMP off for bf16 weights under FSDP
    before = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    fsdp_precision(trainer)
    assert trainer.accelerator.state.fsdp_plugin.mixed_precision_policy is before


# --------------------------------------------------------------------------------------
# On the GPU machine only: FSDP really shards, checkpoints are sharded and resumable, and
# the final model is saved whole. (On CPU, accelerate runs the same arguments as DDP.)
# --------------------------------------------------------------------------------------

FSDP_WORKER = '''
import json, os, sys
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from kubetune.launcher.launch import fsdp_training_args, save_full_model

def main(config_path):
    cfg = json.load(open(config_path))
    model = AutoModelForCausalLM.from_pretrained(cfg["model"])
    ids = torch.randint(5, 500, (64, 32), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=cfg["out"], per_device_train_batch_size=4, max_steps=cfg["steps"],
                             save_steps=4, logging_steps=1, report_to=[], learning_rate=1e-3,
                             **fsdp_training_args())
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train(resume_from_checkpoint=cfg["resume"])
    save_full_model(trainer, cfg["out"] + "/final")
    if os.environ["RANK"] == "0":
        json.dump({"fsdp": trainer.is_fsdp_enabled, "step": trainer.state.global_step},
                  open(cfg["out"] + f"/result-{cfg['steps']}.json", "w"))

if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--config") + 1])
'''


@pytest.mark.gpu
def test_fsdp_on_two_gpus_shards_resumes_and_saves_whole(tiny_llama, tmp_path, monkeypatch):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from kubetune.launcher.launch import run_training

    (tmp_path / "fsdp_worker.py").write_text(FSDP_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    for steps, resume in ((4, False), (8, True)):
        cfg = tmp_path / f"cfg-{steps}.json"
        cfg.write_text(json.dumps({"model": str(tiny_llama), "out": str(out), "steps": steps, "resume": resume}))
        run_training(str(cfg), nproc=2, module="fsdp_worker")
    first = json.loads((out / "result-4.json").read_text())
    second = json.loads((out / "result-8.json").read_text())
    assert first == {"fsdp": True, "step": 4} and second == {"fsdp": True, "step": 8}
    # Sharded checkpoint (one directory of per-rank shards), then a whole model at the end.
    assert any(p.name.startswith("pytorch_model_fsdp") for p in (out / "checkpoint-4").iterdir())
    assert (out / "final" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------
# Training stages under torchrun on CPU (gloo): several processes per pod.
# --------------------------------------------------------------------------------------


def test_several_processes_run_under_torchrun(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    """With 2 processes per pod the stage re-runs itself under torchrun (gloo/DDP on CPU):
    rank 0 saves a model that differs from the base, and the result comes back to the caller."""
    _, tok_dir = tiny_tickets
    monkeypatch.setenv("KUBETUNE_NPROC_PER_NODE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = TrainConfig(base_model=str(tiny_llama), method="lora", max_steps=3, learning_rate=3e-3, batch_size=1,
                      lora_rank=4)
    result = train_peft(cfg, tok_dir, tmp_path / "model", tmp_path / "ws")
    assert result.metrics["steps"] == 3 and result.metrics["train_loss_first"] > 0
    assert (tmp_path / "model" / "adapter_model.safetensors").exists()
    assert (tmp_path / "ws" / "jobs").exists()


def test_two_processes_follow_the_one_process_loss_curve(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    """Same global batch (1 x 4 rows vs 2 x 2 rows), same rows in the same order: data-parallel
    training must reproduce the single-process loss step by step (fp32 on CPU: to ~1e-4)."""
    from kubetune.stages.train_full import train_full

    _, tok_dir = tiny_tickets
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    curves = {}
    for procs, batch in ((1, 4), (2, 2)):
        monkeypatch.setenv("KUBETUNE_NPROC_PER_NODE", str(procs))
        cfg = TrainConfig(base_model=str(tiny_llama), method="full", max_steps=4, learning_rate=3e-3,
                          batch_size=batch, save_steps=1000)
        curves[procs] = train_full(cfg, tok_dir, tmp_path / f"m{procs}", tmp_path / f"w{procs}").losses
    assert len(curves[1]) == len(curves[2]) == 4
    assert curves[1][-1] < curves[1][0]
    for one, two in zip(curves[1], curves[2]):
        assert abs(one - two) / one < 1e-3, (curves[1], curves[2])
