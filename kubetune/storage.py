"""Where data and artifacts live: local paths, ``file://`` and ``s3://`` URIs.

S3 goes through boto3 with its standard configuration: credentials and region from the usual
AWS variables/files, the endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3
reads both itself; MinIO, moto and Ceph are reached that way). Retries use botocore's
"standard" mode (exponential backoff with jitter) so a flaky store is retried, not fatal.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from kubetune.errors import DataError


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 8, "mode": "standard"}))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise DataError(f"{uri}: an s3 URI needs a bucket (s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """The local path a local or ``file://`` URI names."""
    uri = str(uri)
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    return Path(uri).expanduser()


def bundled(uri: str) -> Path:
    """``bundled://NAME``: a dataset shipped inside the kubetune package (same on every machine)."""
    name = uri[len("bundled://"):]
    path = Path(__file__).resolve().parent / "data" / f"{name}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise DataError(f"{uri}: no bundled dataset '{name}'; bundled: {known}")
    return path


def fetch(uri: str, cache_dir: str | Path) -> Path:
    """Make ``uri`` available locally and return the local path (file or folder).

    Local and ``file://`` URIs are returned as they are (no copy). An ``s3://`` URI naming one
    object is downloaded as a file; one naming a prefix is downloaded as a folder.
    """
    if uri.startswith("bundled://"):
        return bundled(uri)
    if not is_s3(uri):
        path = local_path(uri)
        if not path.exists():
            raise DataError(f"{uri}: no such file or folder")
        return path
    bucket, key = split_s3(uri)
    client = s3_client()
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    target_root = Path(cache_dir) / f"s3-{digest}"
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        target = target_root / Path(key).name
        target.parent.mkdir(parents=True, exist_ok=True)
        _download_verified(client, bucket, key, target)
        return target
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchKey", "NotFound"):
            raise DataError(f"{uri}: cannot read from S3 ({code or e})") from None
    prefix = key.rstrip("/") + "/" if key else ""
    paginator = client.get_paginator("list_objects_v2")
    found = False
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if not rel or rel.endswith("/"):
                continue
            found = True
            dest = target_root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _download_verified(client, bucket, obj["Key"], dest)
    if not found:
        raise DataError(f"{uri}: no such object or prefix in S3")
    return target_root


def _download_verified(client, bucket: str, key: str, dest: Path) -> None:
    """Download to a temporary name, check the size against S3's, then rename (atomic)."""
    tmp = dest.with_name(dest.name + ".part")
    client.download_file(bucket, key, str(tmp))
    expected = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    if tmp.stat().st_size != expected:
        tmp.unlink(missing_ok=True)
        raise DataError(f"s3://{bucket}/{key}: downloaded {tmp.stat().st_size} bytes, expected {expected}")
    os.replace(tmp, dest)


def upload_dir(local_dir: str | Path, uri: str) -> list[str]:
    """Upload every file under ``local_dir`` to the ``s3://`` prefix ``uri``."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    keys = []
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}".lstrip("/")
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys
