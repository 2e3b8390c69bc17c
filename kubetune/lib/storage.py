"""Where data and artifacts live: local paths, ``file://`` and ``s3://`` URIs.

S3 goes through boto3 with its standard configuration: credentials and region from the usual
AWS variables/files, the endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3
reads both itself; MinIO, moto and Ceph are reached that way). Retries use botocore's
"standard" mode (exponential backoff with jitter) so a flaky store is retried, not fatal; a
transfer that still fails (the server restarted and dropped a multipart upload) is started
again from the beginning, with backoff. Uploads carry their SHA-256 in the object metadata;
downloads are checked against it, else against the object's S3 checksum (``x-amz-checksum-*``,
read with ``ChecksumMode``), else against the ETag only where S3 defines it as the MD5 (a
single-part object without SSE-KMS or SSE-C encryption), else by size.

``KUBETUNE_S3_SSE_C_KEY``: the customer key (32 bytes) of objects stored with SSE-C; sent on
every read and write, never logged.

``KUBETUNE_DATA_ROOTS`` (comma-separated folders and/or ``s3://bucket/prefix``): when set,
data URIs must lie under one of them; ``..`` and symlinks that lead outside are refused. Every URI
passes that check, ``bundled://`` included: a bundled name is one of the datasets shipped in the
package (a closed set, names of ``[a-z0-9_-]``), and the package's data folder counts as an allowed
root, since its files are the same read-only files on every machine. No path can ride on a bundled
name: a name outside that set (``/abs/path``, ``../x``) is refused before anything is read.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

from kubetune.errors import DataError
from kubetune.lib.dataset import atomic_file


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


BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data"


def bundled_names() -> list[str]:
    """The datasets shipped in the package: the closed set ``bundled://`` may name."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.jsonl") if re.fullmatch(r"[a-z0-9_-]+", p.stem))


def bundled(uri: str) -> Path:
    """``bundled://NAME``: a dataset shipped inside the kubetune package (same on every machine).

    NAME is looked up in ``bundled_names()``, never joined onto a path, so ``bundled:///etc/x``
    or ``bundled://../../x`` cannot reach a file outside the package.
    """
    name = uri[len("bundled://"):]
    if name not in bundled_names():
        raise DataError(f"{uri}: no bundled dataset '{name}'; bundled: {bundled_names()}")
    return BUNDLED_DIR / f"{name}.jsonl"


def fetch(uri: str, cache_dir: str | Path) -> Path:
    """Make ``uri`` available locally and return the local path (file or folder).

    Local and ``file://`` URIs are returned as they are (no copy). An ``s3://`` URI naming one
    object is downloaded as a file; one naming a prefix is downloaded as a folder.
    """
    check_allowed(uri)
    if uri.startswith("bundled://"):
        return bundled(uri)
    if not is_s3(uri):
        path = local_path(uri)
        if not path.exists():
            raise DataError(f"{uri}: no such file or folder")
        return path
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return _fetch_s3(uri, cache_dir)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise DataError(f"{uri}: cannot read from S3 ({code or e})") from None
    except BotoCoreError as e:
        # No credentials, an endpoint that does not answer, a malformed request: botocore's own
        # message says which; the hint says where S3 access is configured.
        raise DataError(f"{uri}: cannot reach S3: {e}; S3 access comes from the AWS variables "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile, AWS_ENDPOINT_URL_S3 for "
                        "MinIO and the like)") from None


def _fetch_s3(uri: str, cache_dir: str | Path) -> Path:
    bucket, key = split_s3(uri)
    client = s3_client()
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    target_root = Path(cache_dir) / f"s3-{digest}"
    from botocore.exceptions import ClientError

    if key and not key.endswith("/"):  # s3://bucket and s3://bucket/prefix/ name folders, never one object
        try:
            client.head_object(Bucket=bucket, Key=key, **sse_c_args())
            target = target_root / Path(key).name
            target.parent.mkdir(parents=True, exist_ok=True)
            _download_verified(client, bucket, key, target)
            return target
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchKey", "NotFound"):
                raise
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


SHA256_META = "sha256"  # user metadata key (x-amz-meta-sha256) written by upload_dir
TRANSFER_ATTEMPTS = int(os.environ.get("KUBETUNE_S3_ATTEMPTS", "5"))


def allowed_roots() -> list[str]:
    return [r.strip() for r in os.environ.get("KUBETUNE_DATA_ROOTS", "").split(",") if r.strip()]


def check_allowed(uri: str) -> None:
    """Refuse a data URI outside ``KUBETUNE_DATA_ROOTS`` (when set): no ``..`` or symlink escapes."""
    roots = allowed_roots()
    if not roots:
        return
    if uri.startswith("bundled://"):
        bundled(uri)  # a name of the closed set inside the package, or an error
        return
    if is_s3(uri):
        bucket, key = split_s3(uri)
        parts = key.split("/")
        if ".." in parts:
            raise DataError(f"{uri}: '..' is not allowed in a data URI")
        for root in (r for r in roots if is_s3(r)):
            rb, rk = split_s3(root)
            rk = rk.rstrip("/")
            if bucket == rb and (not rk or key == rk or key.startswith(rk + "/")):
                return
    else:
        path = os.path.realpath(local_path(uri))  # resolves '..' and symlinks
        for root in (r for r in roots if not is_s3(r)):
            real_root = os.path.realpath(local_path(root))
            if os.path.commonpath([path, real_root]) == real_root:
                return
    raise DataError(f"{uri}: outside the allowed data roots (KUBETUNE_DATA_ROOTS={','.join(roots)})")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _with_retries(what: str, fn, attempts: int | None = None):
    """Run a whole transfer again on failure: 1, 2, 4, ... s between attempts.

    botocore retries single requests; this covers what it cannot (a multipart upload the
    server forgot when it restarted, a download cut in the middle). Errors that another try
    cannot fix (access denied, no such key) are raised at once.
    """
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    attempts = attempts or TRANSFER_ATTEMPTS
    for i in range(attempts):
        try:
            return fn()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or i == attempts - 1:
                raise DataError(f"{what}: S3 error {code or e} after {i + 1} attempt(s)") from None
            last = f"{code or e}"
        except (BotoCoreError, S3UploadFailedError, S3TransferFailedError, OSError, _ChecksumMismatch) as e:
            if i == attempts - 1:
                raise DataError(f"{what}: failed after {attempts} attempts ({e})") from None
            last = str(e)
        delay = 2 ** i
        print(f"kubetune: {what}: attempt {i + 1} failed ({last}); retrying in {delay} s", flush=True)
        time.sleep(delay)


class _ChecksumMismatch(Exception):
    pass


#: Full-object checksums S3 can return (``x-amz-checksum-*``) that botocore computes without
#: the optional CRT extension, strongest first; CRC32C and CRC64NVME need awscrt.
_S3_CHECKSUMS = ("SHA256", "SHA1", "CRC32")

SSE_C_KEY_ENV = "KUBETUNE_S3_SSE_C_KEY"


def sse_c_args() -> dict[str, str]:
    """The SSE-C arguments of every S3 call: empty unless ``KUBETUNE_S3_SSE_C_KEY`` is set."""
    key = os.environ.get(SSE_C_KEY_ENV)
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key} if key else {}


def _s3_checksum(head: dict) -> tuple[str, str] | None:
    """``(algorithm, base64 value)`` of a full-object checksum S3 stored, if one can be checked."""
    if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None  # COMPOSITE: a checksum of part checksums, not of the bytes
    for algorithm in _S3_CHECKSUMS:
        value = head.get(f"Checksum{algorithm}")
        if value and "-" not in value:
            return algorithm, value
    return None


def _b64_checksum(path: Path, algorithm: str) -> str:
    from botocore.httpchecksum import Crc32Checksum, Sha1Checksum, Sha256Checksum

    h = {"SHA256": Sha256Checksum, "SHA1": Sha1Checksum, "CRC32": Crc32Checksum}[algorithm]()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.b64digest()


def _etag_is_md5(head: dict) -> bool:
    # S3 defines the ETag as the MD5 of the bytes only for single-part objects stored in plain
    # text or with SSE-S3; with SSE-KMS (aws:kms, aws:kms:dsse) or SSE-C it is some other
    # 32-hex value, and a multipart ETag ends in "-<parts>".
    etag = head.get("ETag", "").strip('"')
    encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or head.get("SSECustomerAlgorithm")
    return len(etag) == 32 and "-" not in etag and not encrypted


def _download_verified(client, bucket: str, key: str, dest: Path) -> None:
    """Download to a temporary name, check size and checksum against S3's, then rename (atomic).

    The checksum is, in this order: the SHA-256 ``upload_dir`` put in the metadata; the
    full-object checksum S3 stored (``x-amz-checksum-*``, SDKs send one with every upload);
    the ETag where it is an MD5 (see ``_etag_is_md5``). An object with none of them is checked
    by size only. A mismatch is downloaded again; a persistent one is an error.
    """
    where = f"s3://{bucket}/{key}"
    sse_c = sse_c_args()

    def attempt(tmp: Path):
        tmp.unlink(missing_ok=True)
        client.download_file(bucket, key, str(tmp), ExtraArgs=sse_c or None)
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **sse_c)
        size = tmp.stat().st_size
        if size != head["ContentLength"]:
            raise _ChecksumMismatch(f"downloaded {size} bytes, expected {head['ContentLength']}")
        want = (head.get("Metadata") or {}).get(SHA256_META)
        stored = _s3_checksum(head)
        if want:
            got = sha256_file(tmp)
            if got != want:
                raise _ChecksumMismatch(f"sha256 {got} does not match the stored {want}")
        elif stored:
            algorithm, value = stored
            got = _b64_checksum(tmp, algorithm)
            if got != value:
                raise _ChecksumMismatch(f"{algorithm.lower()} {got} does not match the stored {value}")
        elif _etag_is_md5(head):
            got = _md5_file(tmp)
            etag = head["ETag"].strip('"')
            if got != etag:
                raise _ChecksumMismatch(f"md5 {got} does not match the ETag {etag}")

    try:
        with atomic_file(dest) as tmp:
            _with_retries(f"download {where}", lambda: attempt(tmp))
    except DataError as e:
        raise DataError(f"{where}: checksum or size check failed: {e.problems[0]}") from None


def upload_dir(local_dir: str | Path, uri: str) -> list[str]:
    """Upload every file under ``local_dir`` to the ``s3://`` prefix ``uri``."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    keys = []
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}".lstrip("/")
        digest = sha256_file(path)

        def attempt(path=path, key=key, digest=digest):
            client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {SHA256_META: digest}, **sse_c_args()})
            head = client.head_object(Bucket=bucket, Key=key, **sse_c_args())
            stored = (head.get("Metadata") or {}).get(SHA256_META)
            if head["ContentLength"] != path.stat().st_size or stored != digest:
                raise _ChecksumMismatch(f"stored object has {head['ContentLength']} bytes / sha256 {stored}")

        _with_retries(f"upload s3://{bucket}/{key}", attempt)
        keys.append(key)
    return keys
