"""S3 flaky: the S3 server (moto standalone on 127.0.0.1) restarts during an upload and during a
download. The transfer is retried with backoff and the artifact is verified by checksum.

moto keeps objects in memory, so the restart loses them; the restarter puts back what a real,
persistent store would still hold (the bucket, and for the download the object) once it is up.
The restart is triggered from botocore's ``before-send`` event, so it happens at the exact
moment the transfer's request is about to go out: deterministic, yet a real dead server.
"""

from __future__ import annotations

import hashlib
import os
import threading

import boto3
import pytest
from _rel import free_port, start_moto, stop

from kubetune.lib import storage
from kubetune.errors import DataError


@pytest.fixture
def moto(tmp_path, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL_S3": url, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = {"proc": start_moto(port, tmp_path / "moto.log"), "port": port, "log": tmp_path / "moto.log",
              "restarts": 0}
    boto3.client("s3").create_bucket(Bucket="art")
    yield server
    stop(server["proc"])


def _restart_on_first(moto, monkeypatch, operation: str, restore):
    """Make storage's client kill the server when it first sends ``operation``; restart it 1 s later."""
    make = storage.s3_client
    done = threading.Event()

    def restarter():
        import time

        time.sleep(1.0)
        moto["proc"] = start_moto(moto["port"], moto["log"])
        restore(boto3.client("s3"))
        moto["restarts"] += 1
        done.set()

    def hook(**kw):
        if moto["restarts"] == 0 and not getattr(hook, "fired", False):
            hook.fired = True
            stop(moto["proc"])
            threading.Thread(target=restarter, daemon=True).start()

    def client():
        c = make()
        c.meta.events.register(f"before-send.s3.{operation}", hook)
        return c

    monkeypatch.setattr(storage, "s3_client", client)
    return done


def test_upload_survives_a_restart_and_is_checksummed(moto, tmp_path, monkeypatch):
    src = tmp_path / "model"
    src.mkdir()
    (src / "adapter.safetensors").write_bytes(os.urandom(300_000))
    (src / "config.json").write_text('{"a": 1}')
    restarted = _restart_on_first(moto, monkeypatch, "PutObject", lambda c: c.create_bucket(Bucket="art"))

    keys = storage.upload_dir(src, "s3://art/runs/1")
    assert restarted.is_set() and moto["restarts"] == 1
    # (retried by botocore's backoff, or, once the server forgot the bucket, by upload_dir's own)
    client = boto3.client("s3")
    for key in keys:
        local = src / key.split("/")[-1]
        head = client.head_object(Bucket="art", Key=key)
        body = client.get_object(Bucket="art", Key=key)["Body"].read()
        want = hashlib.sha256(local.read_bytes()).hexdigest()
        assert head["Metadata"]["sha256"] == want == hashlib.sha256(body).hexdigest()


def test_download_survives_a_restart_and_is_checksummed(moto, tmp_path, monkeypatch):
    payload = os.urandom(400_000)
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "data.jsonl").write_bytes(payload)
    storage.upload_dir(tmp_path / "up", "s3://art/d")
    digest = hashlib.sha256(payload).hexdigest()

    def restore(c):
        c.create_bucket(Bucket="art")
        c.put_object(Bucket="art", Key="d/data.jsonl", Body=payload, Metadata={"sha256": digest})

    restarted = _restart_on_first(moto, monkeypatch, "GetObject", restore)
    path = storage.fetch("s3://art/d/data.jsonl", tmp_path / "cache")
    assert restarted.is_set() and moto["restarts"] == 1
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not list(path.parent.glob("*.tmp"))


def test_corrupt_object_is_refused_by_checksum(moto, tmp_path, monkeypatch):
    """An object whose bytes do not match its recorded SHA-256 is never handed to a stage."""
    monkeypatch.setattr(storage, "TRANSFER_ATTEMPTS", 2)
    boto3.client("s3").put_object(Bucket="art", Key="bad.jsonl", Body=b'{"text": "x"}\n',
                                  Metadata={"sha256": "0" * 64})
    with pytest.raises(DataError, match=r"s3://art/bad.jsonl: checksum or size check failed.*sha256"):
        storage.fetch("s3://art/bad.jsonl", tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("bad.jsonl*"))
    # The ETag (MD5 of a single-part object) checks objects uploaded by other tools.
    boto3.client("s3").put_object(Bucket="art", Key="plain.jsonl", Body=b'{"text": "y"}\n')
    assert storage.fetch("s3://art/plain.jsonl", tmp_path / "cache").read_bytes() == b'{"text": "y"}\n'
