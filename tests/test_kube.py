"""Kubernetes helpers: what a compiled pipeline carries for a GPU step and a CPU step, the
profile files and the image constant. The torchrun launcher is tests/test_launch.py's."""

# No `from __future__ import annotations`: KFP reads the components' type hints as objects.
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from kubetune.ops import kube
from kubetune.ops.kube import Profile, ProfileError, apply_profile, load_profile

REPO = Path(__file__).resolve().parent.parent
SECRET_VALUE = "s3cr3t-value-that-must-not-leak"


@dsl.component(base_image="python:3.11-slim")
def train_step(steps: int) -> str:
    return str(steps)


@dsl.component(base_image="python:3.11-slim")
def register_step(model: str) -> str:
    return model


def _compile(tmp_path, profile: Profile) -> tuple[dict, dict, str]:
    @dsl.pipeline(name="kube-helpers")
    def pipeline(steps: int = 3):
        train = train_step(steps=steps)
        apply_profile(train, profile, "train", cache=False)
        reg = register_step(model=train.output)
        apply_profile(reg, profile, "cpu", retry=False)

    out = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    text = out.read_text()
    docs = list(yaml.safe_load_all(text))
    # The platform document exists only when some task carries Kubernetes settings.
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], executors, text


def test_gpu_step_carries_accelerator_limits_tolerations_volume_and_secrets(tmp_path, monkeypatch):
    # Secret values in the compiling process's environment must never reach the YAML.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET_VALUE)
    spec, k8s, text = _compile(tmp_path, load_profile("a100x8"))
    assert SECRET_VALUE not in text

    train = spec["deploymentSpec"]["executors"]["exec-train-step"]["container"]
    res = train["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert res["accelerator"]["resourceCount"] == "8"
    assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("88", "1000Gi")
    assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == ("88", "1000Gi")
    env = {e["name"]: e["value"] for e in train["env"]}
    assert Profile.from_dict(json.loads(env.pop("KUBETUNE_PROFILE_JSON"))) == load_profile("a100x8")
    assert env == {"KUBETUNE_NPROC_PER_NODE": "8", "KUBETUNE_WORKSPACE": "/workspace",
                   "HF_HOME": "/workspace/cache/huggingface", "KUBETUNE_HOME": "/workspace/cache/kubetune",
                   "KUBETUNE_GIT_COMMIT": kube._compile_commit(), "KUBETUNE_IMAGE_REF": "python:3.11-slim",
                   "TMPDIR": "/scratch"}

    gpu = k8s["exec-train-step"]
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert gpu["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert gpu["pvcMount"][0]["mountPath"] == "/workspace"
    assert gpu["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "kubetune-workspace"
    secret_env = {m["envVar"]: (s["secretName"], m["secretKey"], s["optional"]) for s in gpu["secretAsEnv"] for m in s["keyToEnv"]}
    assert secret_env == {
        "AWS_ACCESS_KEY_ID": ("kubetune-s3", "AWS_ACCESS_KEY_ID", False),
        "AWS_SECRET_ACCESS_KEY": ("kubetune-s3", "AWS_SECRET_ACCESS_KEY", False),
        "AWS_ENDPOINT_URL": ("kubetune-s3", "AWS_ENDPOINT_URL", False),
        "MLFLOW_S3_ENDPOINT_URL": ("kubetune-s3", "MLFLOW_S3_ENDPOINT_URL", False),
        "MLFLOW_TRACKING_URI": ("kubetune-mlflow", "MLFLOW_TRACKING_URI", False),
        "MLFLOW_TRACKING_USERNAME": ("kubetune-mlflow", "MLFLOW_TRACKING_USERNAME", True),
        "MLFLOW_TRACKING_PASSWORD": ("kubetune-mlflow", "MLFLOW_TRACKING_PASSWORD", True),
        "HF_TOKEN": ("kubetune-hf", "HF_TOKEN", True),
    }
    assert gpu["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                      "sizeLimit": "64Gi"}]
    assert gpu["activeDeadlineSeconds"] == "259200"

    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train-step"]["retryPolicy"] == {
        "maxRetryCount": 2,
        "backoffDuration": "120s",
        "backoffFactor": 2.0,
        "backoffMaxDuration": "3600s",
    }
    assert tasks["train-step"]["cachingOptions"].get("enableCache", False) is False


def test_cpu_step_gets_no_gpu_and_no_gpu_placement(tmp_path):
    spec, k8s, _ = _compile(tmp_path, load_profile("a100x8"))
    reg = spec["deploymentSpec"]["executors"]["exec-register-step"]["container"]
    assert "accelerator" not in reg["resources"]
    assert (reg["resources"]["resourceCpuLimit"], reg["resources"]["resourceMemoryLimit"]) == ("4", "16Gi")
    assert "KUBETUNE_NPROC_PER_NODE" not in {e["name"] for e in reg["env"]}
    cpu = k8s["exec-register-step"]
    assert "tolerations" not in cpu and "nodeSelector" not in cpu
    assert cpu["pvcMount"] and cpu["secretAsEnv"]  # workspace and credentials everywhere
    tasks = spec["root"]["dag"]["tasks"]
    assert "retryPolicy" not in tasks["register-step"]
    assert tasks["register-step"]["cachingOptions"]["enableCache"] is True


def test_cpu_profile_requests_no_gpu_and_empty_fields_switch_helpers_off(tmp_path):
    profile = Profile(name="bare", gpus=0, workspace_pvc="", s3_secret="", mlflow_secret="", hf_secret="",
                      tracking_uri="http://mlflow:5000", retries=0)
    spec, _, text = _compile(tmp_path, profile)
    train = spec["deploymentSpec"]["executors"]["exec-train-step"]["container"]
    assert "accelerator" not in train["resources"]
    assert "pvcMount" not in text and "secretAsEnv" not in text
    assert "retryPolicy" not in spec["root"]["dag"]["tasks"]["train-step"]


FULL_PROFILE = """
name: team
namespace: team-llm
service_account: kubetune-runner
pipeline_root: s3://kubetune/root
gpus: 4
train: {cpu: "32", memory: 200Gi, timeout: 86400s, scratch: 300Gi}
eval: {cpu: "8", memory: 64Gi, timeout: 3600s}
cpu: {cpu: "2", memory: 8Gi, timeout: 1800s}
shm_size: 32Gi
scratch_storage_class: fast-local
model_cache: /workspace/models
mlflow_config_map: kubetune-mlflow-uri
hf_secret: hf-gated
image_pull_secrets: [regcred, mirror]
queue: team-llm
"""


def test_every_profile_field_lands_in_the_compiled_kubernetes_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET_VALUE)
    (tmp_path / "team.yaml").write_text(FULL_PROFILE)
    profile = load_profile(tmp_path / "team.yaml")

    @dsl.pipeline(name="roles")
    def pipeline(steps: int = 3):
        kube.on_cluster(profile, gpu=[train_step(steps=steps).set_display_name("train")],
                        eval=[train_step(steps=steps).set_display_name("evaluate")],
                        cpu=[register_step(model="m").set_display_name("ingest")],
                        once=[register_step(model="m").set_display_name("register")])

    out = tmp_path / "roles.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    assert SECRET_VALUE not in out.read_text()
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    executor = {name: tasks[name]["componentRef"]["name"].replace("comp-", "exec-") for name in tasks}
    by_role = {tasks[name]["taskInfo"]["name"]: (spec["deploymentSpec"]["executors"][executor[name]]["container"],
                                                  k8s[executor[name]]) for name in tasks}

    for role, (container, pod) in by_role.items():
        env = {e["name"]: e["value"] for e in container["env"]}
        # Everywhere: the model cache on the workspace, the tracking URI's ConfigMap, the
        # credentials, the gated-model token, pull secrets and the Kueue queue label.
        assert env["HF_HOME"] == "/workspace/models/huggingface", role
        assert pod["configMapAsEnv"][0]["configMapName"] == "kubetune-mlflow-uri"
        assert pod["configMapAsEnv"][0]["keyToEnv"] == [{"configMapKey": "MLFLOW_TRACKING_URI",
                                                         "envVar": "MLFLOW_TRACKING_URI"}]
        secret_env = {m["envVar"]: s["secretName"] for s in pod["secretAsEnv"] for m in s["keyToEnv"]}
        assert secret_env["HF_TOKEN"] == "hf-gated"
        assert "MLFLOW_TRACKING_URI" not in secret_env  # the ConfigMap names it; the Secret only logs in
        assert secret_env["MLFLOW_TRACKING_PASSWORD"] == "kubetune-mlflow"
        assert [s["secretName"] for s in pod["imagePullSecret"]] == ["regcred", "mirror"]
        assert pod["podMetadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-llm"}

    train, train_pod = by_role["train"]
    assert train["resources"]["accelerator"]["resourceCount"] == "4"
    assert train_pod["activeDeadlineSeconds"] == "86400"
    assert train_pod["emptyDirMounts"][0] == {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                              "sizeLimit": "32Gi"}
    scratch = train_pod["genericEphemeralVolume"][0]
    assert (scratch["mountPath"], scratch["storageClassName"], scratch["size"]) == ("/scratch", "fast-local", "300Gi")
    assert {e["name"]: e["value"] for e in train["env"]}["TMPDIR"] == "/scratch"

    # Evaluation: one GPU of the four, on the GPU nodes, with /dev/shm, its own size and deadline.
    ev, ev_pod = by_role["evaluate"]
    assert ev["resources"]["accelerator"]["resourceCount"] == "1"
    assert {e["name"]: e["value"] for e in ev["env"]}["KUBETUNE_NPROC_PER_NODE"] == "1"
    assert (ev["resources"]["resourceCpuLimit"], ev["resources"]["resourceMemoryLimit"]) == ("8", "64Gi")
    assert ev_pod["activeDeadlineSeconds"] == "3600" and ev_pod["emptyDirMounts"]
    assert "genericEphemeralVolume" not in ev_pod

    for role in ("ingest", "register"):
        container, pod = by_role[role]
        assert "accelerator" not in container["resources"] and "emptyDirMounts" not in pod
        assert pod["activeDeadlineSeconds"] == "1800"
    # register has side effects outside KFP: it is never retried; the others are.
    retries = {tasks[n]["taskInfo"]["name"]: tasks[n].get("retryPolicy", {}).get("maxRetryCount") for n in tasks}
    assert retries == {"train": 2, "evaluate": 2, "ingest": 2, "register": None}


def test_tracking_uri_in_the_profile_is_written_into_every_task(tmp_path):
    profile = Profile(name="uri", tracking_uri="http://mlflow.kubetune.svc:5000")
    spec, k8s, _ = _compile(tmp_path, profile)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env = {e["name"]: e["value"] for e in executor["container"]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.kubetune.svc:5000", name
        assert "MLFLOW_TRACKING_URI" not in {m["envVar"] for s in k8s[name]["secretAsEnv"] for m in s["keyToEnv"]}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "x", "mlflow_secret": ""}, "'tracking_uri'"),
        ({"name": "x", "tracking_uri": "sqlite:///mlflow.db"}, "'tracking_uri'"),
        ({"name": "x", "tracking_uri": "/tmp/mlruns"}, "'tracking_uri'"),
        ({"name": "x", "tracking_uri": "https://bob:hunter2@mlflow.example"}, "'tracking_uri': must not carry"),
        ({"name": "x", "namespace": "Team_A"}, "'namespace'"),
        ({"name": "x", "queue": "gpu queue"}, "'queue'"),
        ({"name": "x", "shm_size": "lots"}, "'shm_size'"),
        ({"name": "x", "train": {"timeout": "2h"}}, "'train.timeout'"),
        ({"name": "x", "eval": {"scratch": "big"}}, "'eval.scratch'"),
        ({"name": "x", "model_cache": "/cache"}, "'model_cache'"),
        ({"name": "x", "image_pull_secrets": "regcred"}, "'image_pull_secrets'"),
        ({"name": "x", "allow_file_store": "yes"}, "'allow_file_store'"),
    ],
)
def test_cluster_profile_errors_name_the_field(data, field):
    with pytest.raises(ProfileError, match=re.escape(field)):
        Profile.from_dict(data)


def test_a_file_store_is_allowed_only_when_the_profile_says_so(tmp_path):
    profile = Profile.from_dict({"name": "smoke", "mlflow_secret": "", "tracking_uri": "sqlite:////tmp/m.db",
                                 "allow_file_store": True})
    spec, _, _ = _compile(tmp_path, profile)
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-register-step"]["container"]["env"]}
    assert env["KUBETUNE_ALLOW_FILE_STORE"] == "1"


def test_a_stage_in_a_pod_refuses_a_file_store(monkeypatch, tmp_path):
    from kubetune import tracking
    from kubetune.errors import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(kube.ALLOW_FILE_STORE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    tracking.configure()  # outside a pod: the local SQLite default
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    with pytest.raises(ConfigError, match="vanishes with it"):
        tracking.configure()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    with pytest.raises(ConfigError, match="vanishes with it"):
        tracking.configure()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    monkeypatch.setenv(kube.ALLOW_FILE_STORE_ENV, "1")
    tracking.configure()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.kubetune.svc:5000")
    monkeypatch.delenv(kube.ALLOW_FILE_STORE_ENV)
    assert tracking.configure() == "http://mlflow.kubetune.svc:5000"


def test_compile_without_a_profile_gives_pods_that_stop_instead_of_tracking_to_a_file(tmp_path, monkeypatch,
                                                                                     capsys):
    """The profile-less YAML's task environment, as a pod would see it, makes the stage refuse."""
    from kubetune import tracking
    from kubetune.cli import main
    from kubetune.errors import ConfigError

    assert main(["compile", "full", "--out", str(tmp_path)]) == 0
    assert "no --profile" in capsys.readouterr().err
    spec = yaml.safe_load((tmp_path / "full.yaml").read_text())
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-register"]["container"]["env"]}
    assert "MLFLOW_TRACKING_URI" not in env
    for key in ("MLFLOW_TRACKING_URI", kube.ALLOW_FILE_STORE_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**env, "KUBERNETES_SERVICE_HOST": "10.96.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        tracking.configure()


@pytest.mark.parametrize("name", ["peft", "full", "instruction", "moe", "dpo", "rlhf", "feature-extraction", "moa"])
def test_every_pipeline_evaluates_on_one_gpu_and_never_retries_register(name, tmp_path):
    from kubetune.ops.runner import compile_all

    (path,) = compile_all(tmp_path, "a100x8", [name])
    spec, platform = yaml.safe_load_all(path.read_text())
    # Every step is placed: none runs without the tracking URI, the secrets and the volume.
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == \
        set(spec["deploymentSpec"]["executors"])
    gpus = {ex: e["container"]["resources"].get("accelerator", {}).get("resourceCount")
            for ex, e in spec["deploymentSpec"]["executors"].items()}
    evaluators = [ex for ex in gpus if ex.startswith(("exec-evaluate", "exec-embed"))
                  and ex != "exec-evaluate-head"]  # the head scores on the CPU
    trainers = [ex for ex in gpus if ex.startswith(("exec-train", "exec-dpo", "exec-ppo", "exec-reward-model"))
                and ex != "exec-train-head"]
    assert evaluators, gpus
    assert {gpus[ex] for ex in evaluators} == {"1"}
    assert trainers == [] or {gpus[ex] for ex in trainers} == {"8"}

    def tasks(dag):  # every task of every sub-DAG, with its component
        for task in dag.get("tasks", {}).values():
            yield task
            inner = spec["components"][task["componentRef"]["name"]]
            if "dag" in inner:
                yield from tasks(inner["dag"])

    all_tasks = list(tasks(spec["root"]["dag"]))
    registers = [t for t in all_tasks if t["componentRef"]["name"].startswith("comp-register")
                 and t["componentRef"]["name"] != "comp-register-skipped"]
    assert registers and all("retryPolicy" not in t for t in registers)
    assert any("retryPolicy" in t for t in all_tasks if t not in registers)


@pytest.mark.parametrize("path", sorted((REPO / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_loads_and_compiles(path, tmp_path):
    profile = load_profile(path)
    assert profile.name == path.stem
    assert load_profile(path.stem) == profile  # bare names resolve to the shipped file
    assert path.read_text().startswith("#")  # header comment with the command that uses it
    spec, _, _ = _compile(tmp_path, profile)
    res = spec["deploymentSpec"]["executors"]["exec-train-step"]["container"]["resources"]
    assert res.get("accelerator", {}).get("resourceCount", "0") == str(profile.gpus)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "x", "gpu": 2}, "gpu"),
        ({"gpus": 2}, "'name'"),
        ({"name": "x", "gpus": -1}, "'gpus'"),
        ({"name": "x", "gpus": "8"}, "'gpus'"),
        ({"name": "x", "train": {"cpu": "4", "mem": "1Gi"}}, "'train'"),
        ({"name": "x", "node_selector": {"gpu": True}}, "'node_selector'"),
        ({"name": "x", "tolerations": [{"key": "a", "operator": "Exist"}]}, "'tolerations[0].operator'"),
        ({"name": "x", "tolerations": [{"key": "a", "effect": "NoScheduled"}]}, "'tolerations[0].effect'"),
        ({"name": "x", "workspace_path": "workspace"}, "'workspace_path'"),
        ({"name": "x", "retry_backoff": "1m"}, "'retry_backoff'"),
    ],
)
def test_profile_errors_name_the_field(data, field):
    with pytest.raises(ProfileError, match=re.escape(field)):
        Profile.from_dict(data)


def test_profile_file_errors_name_the_file_and_missing_profiles_list_the_shipped(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ngpus: many\n")
    with pytest.raises(ProfileError, match=r"bad\.yaml.*'gpus'"):
        load_profile(bad)
    with pytest.raises(FileNotFoundError, match="h200x2"):
        load_profile("no-such-profile")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match=r"broken\.yaml.*not valid YAML"):
        load_profile(tmp_path / "broken.yaml")


def test_profiles_dir_can_be_moved_by_environment(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("name: mine\ngpus: 4\n")
    monkeypatch.setenv(kube.PROFILES_ENV, str(tmp_path))
    assert load_profile("mine").gpus == 4


def test_apply_profile_refuses_an_unknown_role():
    # @dsl.pipeline runs the body when it decorates it, so that is where the error surfaces.
    with pytest.raises(ValueError, match="role must be 'train', 'eval' or 'cpu'"):

        @dsl.pipeline(name="bad-role")
        def pipeline():
            apply_profile(train_step(steps=1), load_profile("cpu"), "gpu")


# --------------------------------------------------------------------------------------
# The image constant.
# --------------------------------------------------------------------------------------


def test_image_tag_is_the_package_version_and_env_overrides(monkeypatch):
    import kubetune
    import kubetune.ops.image as image

    try:
        monkeypatch.delenv("KUBETUNE_IMAGE", raising=False)
        monkeypatch.delenv("KUBETUNE_CPU_IMAGE", raising=False)
        monkeypatch.setenv("KUBETUNE_REGISTRY", "registry.example.com/ml/")
        importlib.reload(image)
        assert image.TRAIN_IMAGE == f"registry.example.com/ml/kubetune-train:{kubetune.__version__}"
        assert image.CPU_IMAGE == f"registry.example.com/ml/kubetune-cpu:{kubetune.__version__}"
        monkeypatch.setenv("KUBETUNE_IMAGE", "mine/train:dev")
        importlib.reload(image)
        assert image.TRAIN_IMAGE == "mine/train:dev"
        assert image.CPU_IMAGE.endswith(f"kubetune-cpu:{kubetune.__version__}")
    finally:
        monkeypatch.undo()
        importlib.reload(image)
    assert image.TRAIN_IMAGE == f"ghcr.io/kubetune/kubetune-train:{kubetune.__version__}"


# --------------------------------------------------------------------------------------
# Lineage: what a pod records is what was compiled, not what the pod can find.
# --------------------------------------------------------------------------------------


def test_a_pod_records_the_compile_time_image_and_commit(tmp_path, monkeypatch):
    """Compiled with KUBETUNE_REGISTRY set; the pod has no such variable and no git checkout."""
    import kubetune.ops.image as image
    from kubetune import tracking

    monkeypatch.setenv("KUBETUNE_REGISTRY", "registry.example.com/ml")
    monkeypatch.delenv("KUBETUNE_IMAGE", raising=False)
    monkeypatch.setenv("KUBETUNE_GIT_COMMIT", "c0ffee" * 6 + "c0ff")
    importlib.reload(image)
    kube._compile_commit.cache_clear()
    try:
        @dsl.component(base_image=image.TRAIN_IMAGE)
        def stage(steps: int) -> str:
            return str(steps)

        @dsl.pipeline(name="lineage")
        def pipeline():
            kube.on_cluster(None, gpu=[stage(steps=1)])

        out = tmp_path / "lineage.yaml"
        compiler.Compiler().compile(pipeline, str(out))
    finally:
        monkeypatch.undo()
        importlib.reload(image)
        kube._compile_commit.cache_clear()
    container = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]["exec-stage"]["container"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"].startswith("registry.example.com/ml/kubetune-train:")

    # In the pod: only the compiled environment.
    for key in ("KUBETUNE_REGISTRY", "KUBETUNE_IMAGE", "KUBETUNE_GIT_COMMIT", "KUBETUNE_IMAGE_REF"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    tags = tracking.lineage_tags()
    assert tags["kubetune.image"] == container["image"]
    assert tags["kubetune.git_commit"] == "c0ffee" * 6 + "c0ff"


def test_git_commit_is_not_taken_from_a_repository_that_merely_encloses_the_package(tmp_path, monkeypatch):
    """A virtualenv inside some project's checkout must not lend that project's commit to kubetune."""
    import subprocess

    import kubetune
    from kubetune import tracking

    repo = tmp_path / "project"
    site = repo / ".venv" / "lib" / "python3.11" / "site-packages" / "kubetune"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(repo)]
    subprocess.run(git[:5] + ["init", "-q", str(repo)], check=True)
    (repo / "README").write_text("x")
    subprocess.run(git + ["add", "README"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    monkeypatch.delenv("KUBETUNE_GIT_COMMIT", raising=False)
    monkeypatch.setattr(kubetune, "__file__", str(site / "__init__.py"))
    assert tracking.git_commit() == "unknown"
    # The package at the top of its own checkout (an editable install) still answers.
    monkeypatch.setattr(kubetune, "__file__", str(REPO / "kubetune" / "__init__.py"))
    assert len(tracking.git_commit()) == 40


def test_the_compare_report_step_is_told_where_mlflow_is(tmp_path):
    """It reads every method's numbers back from MLflow, so it needs the profile like any step."""
    from kubetune.cli import main

    out = tmp_path / "compare.yaml"
    assert main(["compare", "--methods", "lora", "--compile", str(out), "--profile", "cpu"]) == 0
    _, platform = yaml.safe_load_all(out.read_text())
    report = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-compare-report"]
    assert "MLFLOW_TRACKING_URI" in {m["envVar"] for s in report["secretAsEnv"] for m in s["keyToEnv"]}


@pytest.mark.parametrize("path", sorted((REPO / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_compiled_output_parses_strictly_as_kfp_pipeline_and_kubernetes_specs(path, tmp_path):
    """The compiled YAML against the real protos KFP's backend reads: an unknown field fails."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    from kubetune.ops.runner import compile_all

    (out,) = compile_all(tmp_path, str(path), ["peft"])
    spec, platform = yaml.safe_load_all(out.read_text())
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every step is placed
    for config in executors.values():
        json_format.ParseDict(config, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
