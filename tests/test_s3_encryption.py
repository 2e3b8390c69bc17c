"""S3 downloads of SSE-KMS and SSE-C objects, against moto's server.

moto stores and returns the SSE headers and the ``x-amz-checksum-*`` values, but it answers
every object with the MD5 of its bytes as ETag. Real S3 does not: for SSE-KMS and SSE-C the
ETag is some other 32-hex value, and an SSE-C object is readable only with its key. A small
pass-through proxy in front of moto gives the ETags and key checks S3 gives (nothing else is
changed, and boto3 talks plain HTTP to it), so downloads are tested against S3's contract.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from kubetune.lib import storage
from kubetune.errors import DataError

SSE_C_ALGORITHM = "x-amz-server-side-encryption-customer-algorithm"
SSE_C_KEY_MD5 = "x-amz-server-side-encryption-customer-key-md5"


class S3Semantics:
    """Forward to moto; rewrite the ETag of SSE-KMS/SSE-C objects and demand SSE-C keys."""

    def __init__(self, upstream: str, corrupt_key: str | None = None):
        self.upstream = urlparse(upstream)
        self.sse_c_keys: dict[str, str] = {}  # object path -> key MD5 it was written with
        self.etags: dict[str, str] = {}  # ETag given out -> moto's (for If-Match on ranged GETs)
        self.corrupt_key = corrupt_key
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = urlparse(self.path).path
                key_md5 = self.headers.get(SSE_C_KEY_MD5)
                if self.command == "PUT" and key_md5:
                    proxy.sse_c_keys[path] = key_md5
                if self.command in ("GET", "HEAD") and path in proxy.sse_c_keys and key_md5 != proxy.sse_c_keys[path]:
                    return self._reply(400, {}, b"<Error><Code>InvalidRequest</Code></Error>")
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers = {k: proxy.etags.get(v, v) if k.lower() == "if-match" else v for k, v in headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = {k: v for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")}
                etag_key = next((k for k in out if k.lower() == "etag"), None)
                encrypted = out.get("x-amz-server-side-encryption", "").startswith("aws:kms") or path in proxy.sse_c_keys
                if etag_key and encrypted and self.command in ("GET", "HEAD", "PUT"):
                    # Still 32 hex digits, but not the MD5 of the bytes (what S3 does).
                    fake = '"' + hashlib.md5(out[etag_key].encode() + b"kms").hexdigest() + '"'
                    proxy.etags[fake] = out[etag_key]
                    out[etag_key] = fake
                if path in proxy.sse_c_keys and self.command in ("GET", "HEAD"):
                    out[SSE_C_ALGORITHM] = "AES256"
                if self.command == "GET" and proxy.corrupt_key and path.endswith(proxy.corrupt_key) and data:
                    data = bytes([data[0] ^ 1]) + data[1:]  # a byte flipped on the wire
                self._reply(resp.status, out, data)
                conn.close()

            def _reply(self, status, headers, data):
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() != "content-length" or self.command == "HEAD":
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3(s3_env, s3_endpoint, monkeypatch):
    """boto3 pointed at the proxy; two whole-transfer attempts so a failure is quick."""
    monkeypatch.setattr(storage, "TRANSFER_ATTEMPTS", 2)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    def start(**kw):
        proxy = S3Semantics(s3_endpoint, **kw).__enter__()
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        started.append(proxy)
        return proxy

    started: list[S3Semantics] = []
    yield s3_env, start
    for proxy in started:
        proxy.__exit__()


BODY = b'{"text": "encrypted row"}\n' * 200


def test_sse_kms_object_downloads_verified_by_its_checksum(s3, tmp_path):
    bucket, start = s3
    start()
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key="kms/data.jsonl", Body=BODY, ServerSideEncryption="aws:kms",
                      ChecksumAlgorithm="SHA256")
    head = client.head_object(Bucket=bucket, Key="kms/data.jsonl", ChecksumMode="ENABLED")
    # The store behaves as S3 does: a 32-hex ETag that is not the MD5, and a SHA-256 checksum.
    assert len(head["ETag"].strip('"')) == 32 and head["ETag"].strip('"') != hashlib.md5(BODY).hexdigest()
    assert head["ChecksumSHA256"] and head["ServerSideEncryption"] == "aws:kms"
    path = storage.fetch(f"s3://{bucket}/kms/data.jsonl", tmp_path)
    assert path.read_bytes() == BODY


def test_sse_kms_object_without_checksum_is_size_checked(s3, tmp_path):
    bucket, start = s3
    start()
    # An object written by a tool that sent no checksum: only its size can be checked.
    import boto3
    from botocore.config import Config

    plain = boto3.client("s3", config=Config(request_checksum_calculation="when_required"))
    plain.put_object(Bucket=bucket, Key="kms/old.jsonl", Body=BODY, ServerSideEncryption="aws:kms")
    head = plain.head_object(Bucket=bucket, Key="kms/old.jsonl", ChecksumMode="ENABLED")
    assert not any(k.startswith("Checksum") and k != "ChecksumType" for k in head)
    assert storage.fetch(f"s3://{bucket}/kms/old.jsonl", tmp_path).read_bytes() == BODY


def test_sse_c_object_downloads_with_the_customer_key(s3, tmp_path, monkeypatch):
    bucket, start = s3
    start()
    key = "k" * 32
    storage.s3_client().put_object(Bucket=bucket, Key="c/data.jsonl", Body=BODY, SSECustomerAlgorithm="AES256",
                                   SSECustomerKey=key)
    with pytest.raises(DataError):  # without the key S3 refuses the read
        storage.fetch(f"s3://{bucket}/c/data.jsonl", tmp_path / "nokey")
    monkeypatch.setenv(storage.SSE_C_KEY_ENV, key)
    assert storage.fetch(f"s3://{bucket}/c/data.jsonl", tmp_path / "key").read_bytes() == BODY
    # Uploads carry the key too, and read back verified.
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "m.bin").write_bytes(BODY)
    storage.upload_dir(tmp_path / "up", f"s3://{bucket}/c/out")
    assert storage.fetch(f"s3://{bucket}/c/out/m.bin", tmp_path / "back").read_bytes() == BODY


def test_a_corrupted_sse_kms_download_is_refused(s3, tmp_path):
    bucket, start = s3
    start(corrupt_key="kms/bad.jsonl")
    # Over boto3's 8 MB multipart threshold: downloaded in ranged GETs, which botocore cannot
    # check against a whole-object checksum, so only kubetune's check stands between.
    big = BODY * 2000
    storage.s3_client().put_object(Bucket=bucket, Key="kms/bad.jsonl", Body=big, ServerSideEncryption="aws:kms",
                                   ChecksumAlgorithm="SHA256")
    with pytest.raises(DataError, match="checksum or size check failed"):
        storage.fetch(f"s3://{bucket}/kms/bad.jsonl", tmp_path)
    assert not list(tmp_path.rglob("bad.jsonl*"))  # nothing half-written
