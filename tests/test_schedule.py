"""`kubetune schedule / schedules / unschedule` against a real HTTP server on 127.0.0.1.

We have no KFP backend here; the server (tests/kfp_fake.py) answers the few KFP v2beta1 REST
calls the real client makes and records every request, so the test checks what a real
backend would receive, field by field.
"""

from __future__ import annotations

import pytest

from kfp_fake import API, FakeKFP
from kubetune.cli import main


@pytest.fixture
def kfp_server(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json from the machine
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "test-token-123")
    import kfp.client.client as kc

    monkeypatch.setattr(kc.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-context.json"))
    fake = FakeKFP().start()
    yield fake
    fake.stop()


def test_schedule_payload_list_and_unschedule(kfp_server, tmp_path, capsys):
    cfg = tmp_path / "weekly.yaml"
    cfg.write_text("max_steps: 30\nmethod: dora\ndata_uri: s3://bucket/tickets.jsonl\n")

    assert main(["schedule", "peft", "--cron", "0 3 * * 1", "--config", str(cfg), "--host", kfp_server.url,
                 "--set", "learning_rate=0.0002"]) == 0

    posts = [c for c in kfp_server.calls if c["method"] == "POST"]
    assert [c["path"] for c in posts] == [f"{API}/pipelines/upload", f"{API}/experiments", f"{API}/recurringruns"]
    assert posts[0]["query"]["name"] == ["kubetune-peft"]
    assert posts[1]["body"]["display_name"] == "kubetune"
    rr = posts[2]["body"]
    # The recurring-run payload, field by field.
    assert rr["display_name"] == "kubetune-peft"
    assert rr["experiment_id"] == "exp-1"
    assert rr["mode"] == "ENABLE"
    assert int(rr["max_concurrency"]) == 1
    assert rr["no_catchup"] is True
    assert rr["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert rr["runtime_config"]["parameters"] == {"max_steps": 30, "method": "dora",
                                                  "data_uri": "s3://bucket/tickets.jsonl", "learning_rate": 0.0002}
    # The schedule runs an uploaded, versioned pipeline, not a spec pasted into the schedule.
    assert "pipeline_spec" not in rr
    ref = rr["pipeline_version_reference"]
    (pipeline_id,) = kfp_server.pipelines
    assert ref["pipeline_id"] == pipeline_id and ref["pipeline_version_id"] in kfp_server.versions
    spec, _ = kfp_server.spec_of_version(ref["pipeline_version_id"])
    assert spec["pipelineInfo"]["name"] == "peft"
    # The compiled pipeline: the skip-when-unchanged branch and its parameters are in it.
    assert "force" in spec["root"]["inputDefinitions"]["parameters"]
    assert "comp-register-skipped" in spec["components"]
    # Wrapped in the exit handler that ends the run's MLflow runs whatever the outcome.
    assert {"exit-handler-1", "finalize"} <= set(spec["root"]["dag"]["tasks"])
    # Auth: the bearer token from KF_PIPELINES_TOKEN reached the server, and was not printed.
    assert {c["authorization"] for c in posts} == {"Bearer test-token-123"}
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
