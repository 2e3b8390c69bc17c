"""What a user sees when a command cannot do its work: one line naming the input and the fix,
exit status 1, no traceback, and nothing run or written. Each case runs the real CLI
(``kubetune.cli.main``; one through a subprocess, as a shell runs it)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from _rel import child_env, free_port, rows, start_moto, stop, write_jsonl

from kubetune import cli


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 1 with exactly one line on stderr and no traceback. Returns the line."""
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, (rc, out, err)
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- compile --profile


@pytest.mark.parametrize("content,expected", [
    ("name: [1,\n", "not valid YAML"),
    ("- name: a\n", "a profile is a mapping of fields, got list"),
    ("name: a\nbogus: 1\n", "unknown profile field(s) ['bogus']"),
    (None, "no profile file"),
], ids=["malformed", "list", "unknown-field", "missing"])
def test_compile_with_a_bad_profile(tmp_path, capsys, content, expected):
    profile = tmp_path / "p.yaml"
    if content is not None:
        profile.write_text(content)
    line = one_line_error(capsys, ["compile", "peft", "--out", str(tmp_path / "build"), "--profile", str(profile)])
    assert expected in line and "p.yaml" in line, line
    assert not (tmp_path / "build" / "peft.yaml").exists()


# ---------------------------------------------------------------- validate


def test_validate_with_an_unknown_shape(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    line = one_line_error(capsys, ["validate", str(data), "--shape", "bogus"])
    assert "'shape' must be one of" in line and "'bogus'" in line, line


def test_validate_s3_without_credentials_or_with_a_dead_endpoint(tmp_path, capsys, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups off a cloud VM
    for uri in ("s3://bucket", "s3://bucket/data/d.jsonl"):
        line = one_line_error(capsys, ["validate", uri])
        assert line.startswith(f"{uri}: cannot reach S3: Unable to locate credentials") and "AWS_" in line, line

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    line = one_line_error(capsys, ["validate", "s3://bucket/d.jsonl"])
    assert "cannot reach S3: Could not connect to the endpoint URL" in line, line
    assert time.monotonic() - t0 < 60


def test_validate_a_whole_bucket(tmp_path, capsys, monkeypatch):
    """``s3://bucket`` names the bucket's objects, as ``s3://bucket/prefix/`` names a folder."""
    import boto3

    port = free_port()
    moto = start_moto(port, tmp_path / "moto.log")
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="empty")
        s3.create_bucket(Bucket="data")
        s3.upload_file(str(write_jsonl(tmp_path / "d.jsonl", rows(12))), "data", "d.jsonl")
        assert cli.main(["validate", "s3://data"]) == 0
        assert "OK  shape=instruction" in capsys.readouterr().out
        line = one_line_error(capsys, ["validate", "s3://empty"])
        assert line == "s3://empty: no such object or prefix in S3", line
    finally:
        stop(moto)


# ---------------------------------------------------------------- the registry


def test_registry_commands_on_missing_or_oddly_named_models(mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient

    MlflowClient().search_registered_models()  # an existing registry (a new one logs its creation)
    capsys.readouterr()
    line = one_line_error(capsys, ["promote", "no-such-model", "3"])
    assert "model 'no-such-model' has no version '3'" in line and "kubetune models no-such-model" in line, line
    line = one_line_error(capsys, ["models", "x'"])
    assert "no registered model \"x'\"" in line, line
    line = one_line_error(capsys, ["promote", "x'", "1"])
    assert "has no version '1'" in line, line
    line = one_line_error(capsys, ["rollback", "no-such-model"])
    assert "no-such-model has no champion" in line, line


def test_registry_commands_against_a_dead_server_fail_in_seconds(tmp_path):
    """Nothing listens on the port: each command gives up after KUBETUNE_MLFLOW_WAIT_S, in one line."""
    env = child_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}", KUBETUNE_MLFLOW_WAIT_S="3")
    env.pop("MLFLOW_REGISTRY_URI", None)
    for argv in (["models", "m"], ["promote", "m", "1"], ["rollback", "m"]):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "kubetune.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        took = time.monotonic() - t0
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
        assert f"kubetune {argv[0]}: the MLflow server" in lines[0] and "did not answer for 3 s" in lines[0]
        assert took < 30, took  # MLflow's own retries would take minutes


# ---------------------------------------------------------------- run: everything checked before anything runs


@pytest.mark.parametrize("setting,expected", [
    ("max_steps=-1", "'max_steps' (-1) or 'epochs' (1.0) must be > 0"),
    ("lora_rank=0", "'lora_rank' must be >= 1, got 0"),
    ("learning_rate=5", "'learning_rate' must be in [0, 1], got 5.0"),
    ("method=nonexistent", "'method' must be one of"),
    ('train_settings={"bogus": 1}', "train_settings: unknown key(s) ['bogus'] for step train-peft"),
    ('eval_settings={"bogus": 1}', "eval_settings: unknown key(s) ['bogus'] for step evaluate"),
    ('register_settings={"bogus": 1}', "register_settings: unknown key(s) ['bogus'] for step register"),
    ('train_settings={"batch_size": null}', "train_settings: 'batch_size' must be an integer, got NoneType"),
    ("base_model=/no/such/model", "base_model: /no/such/model: no such folder"),
    ('train_settings={"batch_size": 100000000}', "batch_size=100000000 x max_length=256 needs an estimated"),
], ids=["max_steps", "lora_rank", "learning_rate", "method", "train_key", "eval_key", "register_key",
        "null", "base_model", "memory"])
def test_run_refuses_before_any_step_runs(tmp_path, capsys, monkeypatch, setting, expected):
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    line = one_line_error(capsys, ["run", "peft", "--set", setting])
    assert expected in line, line
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / ".kubetune").exists() and not (tmp_path / "mlflow.db").exists()


def test_memory_refusal_names_the_setting_and_the_remedies(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, ["run", "full", "--set", 'train_settings={"batch_size": 100000000}'])
    assert line.startswith("kubetune: error: train_settings (step train-full): batch_size=100000000")
    for remedy in ("GiB of the CPU", "lower batch_size", "gradient_checkpointing", "PEFT"):
        assert remedy in line, line


def test_check_params_builds_every_stage_config_for_compile_and_submit():
    """The one function compile, submit and schedule call: every pipeline's defaults pass, bad values do not."""
    from kubetune.errors import ConfigError
    from kubetune.pipelines import PIPELINES
    from kubetune.ops.runner import check_params

    for module in PIPELINES.values():
        check_params(module, {}, "defaults")
    cases = [("peft", {"train_settings": {"lora_rank": 0}},
              "train_settings: ['lora_rank'] for step train-peft come from the pipeline parameter(s) ['lora_rank']"),
             ("peft", {"train_settings": {"lora_alpha": -1.0, "lora_dropout": 1.5}}, "'lora_dropout' must be in"),
             ("moe", {"train_settings": {"bogus": 1}}, "unknown key(s) ['bogus']"),
             ("dpo", {"judge_settings": {"bogus": 1}}, "judge_settings: unknown key(s) ['bogus']"),
             ("rlhf", {"ppo_settings": {"bogus": 1}}, "ppo_settings: unknown key(s) ['bogus']"),
             ("feature-extraction", {"embed_settings": {"bogus": 1}}, "embed_settings: unknown key(s)"),
             ("moa", {"eval_settings": {"bogus": 1}}, "eval_settings: unknown key(s) ['bogus']"),
             ("instruction", {"method": "full", "max_steps": -1}, "'max_steps' (-1) or 'epochs' (1.0) must be > 0"),
             # A value the pipeline fixes for a step would silently win over the settings' copy.
             ("rlhf", {"sft_settings": {"merge": True, "lora_rank": 8}},
              "sft_settings: ['lora_rank'] for step train-peft are fixed by the pipeline (lora_rank=16)"),
             ("grpo", {"sft_settings": {"merge": True, "learning_rate": 1e-3}},
              "sft_settings: ['learning_rate'] for step train-peft come from the pipeline parameter(s) "
              "['sft_learning_rate']")]
    for name, params, expected in cases:
        with pytest.raises(ConfigError) as err:
            check_params(PIPELINES[name], params, "parameters")
        assert expected in str(err.value), (name, str(err.value))
