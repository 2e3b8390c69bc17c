"""Shared fixtures: tiny models built locally, an isolated MLflow per test, no network."""

from __future__ import annotations

import os

import pytest

# No test may reach a hub: everything runs on tiny local models or packaged ones.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests track to SQLite files on purpose, also when CI itself runs in a Kubernetes pod (where
# stages otherwise refuse a file store); the tests of that refusal unset it.
os.environ.setdefault("KUBETUNE_ALLOW_FILE_STORE", "1")

# Tiny models gain nothing from intra-op threads, and several torch processes with 2 threads
# each on a 2-core machine thrash (spin-waiting OpenMP workers): one thread per test process.
# Subprocesses (kfp.local tasks, servers) are not affected; they use the machine as usual.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("KUBETUNE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Path of a tiny random Llama (2 layers, hidden 64) with a locally trained tokenizer."""
    from kubetune.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite-backed MLflow for one test, exported the way components read it.

    The test runs in ``tmp_path``: MLflow puts a SQLite store's artifacts in ``./mlruns``.
    """
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------- real servers on loopback

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

BIN = Path(sys.executable).parent

from kubetune.testing import free_port as _free_port, wait_http as _wait_http  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1: from .ci/run, or started here."""
    url = os.environ.get("KUBETUNE_TEST_S3_ENDPOINT")
    proc = None
    if not url:
        port = _free_port()
        log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
    _wait_http(url, 60, proc)
    yield url
    if proc:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """boto3's standard variables pointed at the moto server, and a fresh bucket."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"kt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1: from .ci/run, or started here (~20 s)."""
    url = os.environ.get("KUBETUNE_TEST_MLFLOW_URI")
    proc = None
    if not url:
        root = tmp_path_factory.mktemp("mlflow-server")
        port = _free_port()
        log = open(root / "server.log", "w")
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                                 "--artifacts-destination", str(root / "artifacts")],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                # no GenAI job consumers: seven more processes the tests never use
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", 120, proc)
        yield url
    finally:
        if proc:  # the server and the workers it forked: its own process group
            import signal

            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(20)


@pytest.fixture
def mlflow_server_env(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def tiny_tickets(tmp_path_factory, tiny_llama):
    """(ingested dir, tokenized dir) of 60 bundled tickets, tokenized for the tiny Llama."""
    from kubetune.stages.ingest import IngestConfig, ingest
    from kubetune.stages.tokenize_data import TokenizeConfig, tokenize_data

    root = tmp_path_factory.mktemp("tiny-tickets")
    ingest(IngestConfig(data_uri="bundled://tickets", max_rows=60, validation_fraction=0.2), root / "ds")
    tokenize_data(TokenizeConfig(base_model=str(tiny_llama), max_length=512), root / "ds", root / "tok")
    return root / "ds", root / "tok"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run on the GPU machine (see docs/performance.md); elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
