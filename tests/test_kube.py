"""Kubernetes helpers: what a compiled pipeline carries for a GPU step and a CPU step, the
profile files, the image constant, and the torchrun launcher."""

# No `from __future__ import annotations`: KFP reads the components' type hints as objects.
import importlib
import json
import re
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from kfp import compiler, dsl

from kubetune import kube
from kubetune.kube import Profile, ProfileError, apply_profile, load_profile

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
    assert env == {"KUBETUNE_NPROC_PER_NODE": "8", "KUBETUNE_WORKSPACE": "/workspace"}

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
    }

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
    profile = Profile(name="bare", gpus=0, workspace_pvc="", s3_secret="", mlflow_secret="", retries=0)
    spec, _, text = _compile(tmp_path, profile)
    train = spec["deploymentSpec"]["executors"]["exec-train-step"]["container"]
    assert "accelerator" not in train["resources"]
    assert "pvcMount" not in text and "secretAsEnv" not in text
    assert "retryPolicy" not in spec["root"]["dag"]["tasks"]["train-step"]


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


def test_profiles_dir_can_be_moved_by_environment(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("name: mine\ngpus: 4\n")
    monkeypatch.setenv(kube.PROFILES_ENV, str(tmp_path))
    assert load_profile("mine").gpus == 4


def test_apply_profile_refuses_an_unknown_role():
    # @dsl.pipeline runs the body when it decorates it, so that is where the error surfaces.
    with pytest.raises(ValueError, match="role must be 'train' or 'cpu'"):

        @dsl.pipeline(name="bad-role")
        def pipeline():
            apply_profile(train_step(steps=1), load_profile("cpu"), "gpu")


# --------------------------------------------------------------------------------------
# The image constant.
# --------------------------------------------------------------------------------------


def test_image_tag_is_the_package_version_and_env_overrides(monkeypatch):
    import kubetune
    import kubetune.image as image

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
    from kubetune.launch import run_training

    monkeypatch.setenv(kube.NPROC_ENV, "1")
    result = run_training(_config(entry_module, tmp_path), module="fake_entry")
    assert result == "ran inproc"
    assert [p.name for p in entry_module.iterdir()] == ["rank-inproc.json"]


def test_two_gpus_reexecute_under_torchrun(entry_module, tmp_path, monkeypatch):
    from kubetune.launch import run_training

    monkeypatch.setenv(kube.NPROC_ENV, "2")  # what request_gpus(task, 2) exports
    cfg = _config(entry_module, tmp_path)
    assert run_training(cfg, module="fake_entry") is None
    ranks = {p.name: json.loads(p.read_text()) for p in entry_module.iterdir()}
    assert set(ranks) == {"rank-0.json", "rank-1.json"}
    assert {r["local_rank"] for r in ranks.values()} == {"0", "1"}
    assert all(r["world"] == "2" and r["argv"] == ["--config", cfg] for r in ranks.values())


def test_a_failing_worker_fails_the_launch(entry_module, tmp_path):
    import subprocess

    from kubetune.launch import run_training

    with pytest.raises(subprocess.CalledProcessError):
        run_training(_config(entry_module, tmp_path, fail_rank="1"), nproc=2, module="fake_entry")


def test_inside_torchrun_the_entry_point_runs_in_process(entry_module, tmp_path, monkeypatch):
    from kubetune.launch import run_training

    # A worker must not start torchrun again (that would fork N*N processes).
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_training(_config(entry_module, tmp_path), nproc=8, module="fake_entry") == "ran inproc"


def test_torchrun_command_is_the_shared_entry_point():
    from kubetune.launch import torchrun_command

    cmd = torchrun_command("/workspace/cfg.json", 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in cmd and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "kubetune.train_entry", "--config", "/workspace/cfg.json"]


def test_fsdp_arguments_are_accepted_by_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from kubetune.launch import fsdp_training_args

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

    from kubetune.launch import fsdp_precision, weights_dtype
    from kubetune.train import TrainConfig, _use_bf16, load_for_training

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
from kubetune.launch import fsdp_training_args, save_full_model

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
    from kubetune.launch import run_training

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
