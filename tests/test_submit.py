"""`kubetune submit`: the real kfp.Client against a KFP v2beta1 REST server on 127.0.0.1.

The server (tests/kfp_fake.py) records every request, so the tests check what a real backend
would receive: the uploaded, versioned pipeline with the profile's Kubernetes settings, the
run in the profile's namespace with its service account and pipeline root, and the state the
command follows with ``--wait``.
"""

from __future__ import annotations

import pytest

from kfp_fake import API, FakeKFP
from kubetune.cli import main

PROFILE = """
name: team
namespace: team-llm
service_account: kubetune-runner
pipeline_root: s3://kubetune/pipeline-root
gpus: 2
tracking_uri: http://mlflow.team-llm.svc:5000
queue: team-llm
"""


@pytest.fixture
def kfp_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json from the machine
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "test-token-123")
    import kfp.client.client as kc

    monkeypatch.setattr(kc.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-context.json"))
    profile = tmp_path / "team.yaml"
    profile.write_text(PROFILE)
    return profile


@pytest.fixture
def kfp_server(kfp_env):
    fake = FakeKFP(multi_user=True).start()
    yield fake
    fake.stop()


def test_submit_uploads_a_version_and_runs_it_where_the_profile_says(kfp_server, kfp_env, capsys):
    assert main(["submit", "peft", "--profile", str(kfp_env), "--host", kfp_server.url, "--set", "max_steps=200",
                 "--set", "method=dora", "--wait", "--poll", "0.01", "--name", "first"]) == 0
    out, err = capsys.readouterr()

    upload, = kfp_server.posts("/pipelines/upload")
    assert upload["query"]["name"] == ["kubetune-peft"] and upload["query"]["namespace"] == ["team-llm"]
    experiment, = kfp_server.posts("/experiments")
    assert experiment["body"]["display_name"] == "kubetune" and experiment["body"]["namespace"] == "team-llm"
    run, = kfp_server.posts("/runs")
    body = run["body"]
    assert body["display_name"] == "first" and body["experiment_id"] == "exp-1"
    assert body["service_account"] == "kubetune-runner"
    assert body["runtime_config"] == {"pipeline_root": "s3://kubetune/pipeline-root",
                                      "parameters": {"max_steps": 200, "method": "dora"}}
    assert "pipeline_spec" not in body
    (pipeline_id,) = kfp_server.pipelines
    (version_id,) = kfp_server.versions
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline_id, "pipeline_version_id": version_id}
    assert run["authorization"] == "Bearer test-token-123" and "test-token-123" not in out + err

    # The uploaded version is the profile's compile: tracking URI, queue label, one GPU to evaluate.
    spec, platform = kfp_server.spec_of_version(version_id)
    executors = spec["deploymentSpec"]["executors"]
    env = {e["name"]: e["value"] for e in executors["exec-register"]["container"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.team-llm.svc:5000"
    assert platform["deploymentSpec"]["executors"]["exec-train-peft"]["podMetadata"]["labels"] == {
        "kueue.x-k8s.io/queue-name": "team-llm"}
    assert executors["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert "kubetune" in kfp_server.versions[version_id]["description"]

    run_id = next(iter(kfp_server.runs))
    assert f"run {run_id} SUCCEEDED: {kfp_server.url}/#/runs/details/{run_id}" in out
    assert [line for line in err.splitlines() if line.startswith("run ")] == [
        f"run {run_id}: PENDING", f"run {run_id}: RUNNING", f"run {run_id}: SUCCEEDED"]

    # A second submit adds a version to the same pipeline, and its run uses the new one.
    assert main(["submit", "peft", "--profile", str(kfp_env), "--host", kfp_server.url]) == 0
    assert len(kfp_server.pipelines) == 1 and len(kfp_server.versions) == 2
    second, = kfp_server.posts("/pipelines/upload_version")
    assert second["query"]["pipelineid"] == [pipeline_id]
    newest = kfp_server.posts("/runs")[-1]["body"]["pipeline_version_reference"]["pipeline_version_id"]
    assert newest != version_id and newest in kfp_server.versions


def test_submit_wait_exits_1_with_the_url_when_the_run_fails(kfp_env, capsys):
    fake = FakeKFP(run_states=("RUNNING", "FAILED"), multi_user=True).start()
    try:
        assert main(["submit", "full", "--profile", str(kfp_env), "--host", fake.url, "--wait", "--poll", "0.01",
                     "--namespace", "other-team"]) == 1
    finally:
        fake.stop()
    err = capsys.readouterr().err
    run_id = next(iter(fake.runs))
    assert f"ended FAILED: {fake.url}/#/runs/details/{run_id}" in err and "Traceback" not in err
    # --namespace wins over the profile's.
    assert fake.posts("/pipelines/upload")[0]["query"]["namespace"] == ["other-team"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "max_stepz=3"], "unknown parameter(s) ['max_stepz']"),
        (["--set", "max_steps=many"], "max_steps"),
        (["--profile", "no-such-profile"], "no profile file no-such-profile"),
        (["--wait", "--poll", "0"], "'--poll' must be positive"),
    ],
)
def test_submit_refuses_bad_input_before_anything_reaches_kfp(kfp_server, args, message, capsys):
    assert main(["submit", "peft", "--host", kfp_server.url, *args]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("kubetune: note:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert kfp_server.calls == []


def test_submit_profile_error_names_the_file_and_field(kfp_server, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmlflow_secret: ''\n")
    assert main(["submit", "peft", "--host", kfp_server.url, "--profile", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'tracking_uri'" in err
    assert kfp_server.calls == []


def test_a_namespace_on_a_standalone_kfp_is_refused_before_anything_is_uploaded(kfp_env, capsys):
    fake = FakeKFP(multi_user=False).start()
    try:
        assert main(["submit", "peft", "--profile", str(kfp_env), "--host", fake.url]) == 1
    finally:
        fake.stop()
    assert "standalone (single-user)" in capsys.readouterr().err
    assert [c["path"] for c in fake.calls] == [f"{API}/healthz"]


def test_schedule_carries_service_account_and_pipeline_root(kfp_server, kfp_env):
    assert main(["schedule", "peft", "--cron", "0 3 * * 1", "--profile", str(kfp_env),
                 "--host", kfp_server.url]) == 0
    rr, = kfp_server.posts("/recurringruns")
    assert rr["body"]["service_account"] == "kubetune-runner"
    assert rr["body"]["runtime_config"]["pipeline_root"] == "s3://kubetune/pipeline-root"
    assert kfp_server.posts("/pipelines/upload")[0]["query"]["namespace"] == ["team-llm"]
    assert kfp_server.posts("/experiments")[0]["body"]["namespace"] == "team-llm"
    ref = rr["body"]["pipeline_version_reference"]
    assert ref["pipeline_version_id"] in kfp_server.versions
    assert all(c["path"].startswith(API) for c in kfp_server.calls)


def test_kfp_api_errors_and_an_unreachable_server_are_one_line_errors(kfp_server, kfp_env, capsys):
    from kubetune.testing import free_port

    # Listed, but deleted before the version upload: the server answers HTTP 404.
    kfp_server.pipelines["stale"] = {"pipeline_id": "pl-gone", "display_name": "kubetune-peft",
                                     "namespace": "team-llm"}
    assert main(["submit", "peft", "--profile", str(kfp_env), "--host", kfp_server.url]) == 1
    err = capsys.readouterr().err
    assert f"{kfp_server.url}: HTTP 404: no pipeline pl-gone" in err and "Traceback" not in err

    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", "peft", "--profile", str(kfp_env), "--host", dead]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach {dead}" in err and "Traceback" not in err
