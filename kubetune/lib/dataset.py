"""Datasets on disk: reading records of any supported format, the ingested folder format, a
content fingerprint, the record views every stage shares, and writing outputs atomically.

An ingested dataset folder holds ``train.jsonl``, ``validation.jsonl`` and ``meta.json``
(shape, fingerprint, counts); ``ingest`` writes it, every later stage reads it back with
``load_dataset_dir``. Outputs are written into a temporary folder (or file) beside their
destination and renamed into place when complete (``atomic_dir``, ``atomic_file``): a crash
or an error never leaves a half-written output where a later step or a rerun would take it
for a finished one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kubetune.errors import DataError, StageError

# Lines longer than this are refused rather than parsed: a 100 MB "line" is a broken file
# (a missing newline, a binary blob), not a training example.
MAX_LINE_BYTES = 1 << 20


# ---------------------------------------------------------------- reading any format


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                yield where, DataError(f"{where}: line is {len(raw)} bytes (limit {MAX_LINE_BYTES})")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark at the start of the file is harmless
            if b"\x00" in raw:
                yield where, DataError(f"{where}: contains NUL bytes (binary or UTF-16 data?)")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 at byte {e.start}")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        yield str(path), DataError(f"{path}: contains NUL bytes (binary or UTF-16 data?)")
        return
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        yield str(path), DataError(f"{path}: not valid UTF-8 at byte {e.start}")
        return
    except json.JSONDecodeError as e:
        yield f"{path}:{e.lineno}", DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield str(path), DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        return
    for i, rec in enumerate(data):
        yield f"{path}: record {i}", rec


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        yield str(path), DataError(f"{path}: contains NUL bytes (binary or UTF-16 data?)")
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield f"{path}:{line}", DataError(f"{path}:{line}: not valid UTF-8 at byte {e.start}")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        return
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            yield where, DataError(f"{where}: more values than the {len(reader.fieldnames)} header columns")
            continue
        yield where, {k: v for k, v in row.items() if v is not None}


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        yield str(path), DataError(f"{path}: not a readable Parquet file ({e})")
        return
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", rec


def _read_hf_folder(path: Path) -> dict[str, list[tuple[str, Any]]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    splits = ds if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    out = {}
    for name, split in splits.items():
        out[name] = [(f"{path} [{name}] row {i}", rec) for i, rec in enumerate(split)]
    return out


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
           ".parquet": _read_parquet}


def read_records(path: Path) -> dict[str, list[tuple[str, Any]]]:
    """Read every record of a file or folder: {split: [(where, record or DataError)]}."""
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _read_hf_folder(path)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in READERS)
        if len(files) != 1:
            raise DataError(f"{path}: a data folder must hold one data file ({', '.join(READERS)}) or a saved "
                            f"datasets folder; found {len(files)} data files")
        path = files[0]
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown format '{path.suffix}'; use one of {', '.join(READERS)}")
    return {"all": list(reader(path))}


# ---------------------------------------------------------------- fingerprint


def record_key(rec: dict) -> str:
    """Canonical text of a record (sorted keys): equal records, equal keys."""
    return json.dumps(rec, sort_keys=True, ensure_ascii=False)


def fingerprint(records: list[dict]) -> str:
    """Content hash of a set of records, independent of their order."""
    digests = sorted(hashlib.sha256(record_key(r).encode()).hexdigest() for r in records)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the ingested folder


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file written by kubetune (trusted: no per-line checks, see ``read_records``)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_dataset_dir(path: str | Path, meta: dict, train: list[dict], validation: list[dict]) -> Path:
    """Write an ingested dataset folder (atomically: complete or not there).

    Args:
        path: The folder; an existing one is replaced.
        meta: The ``meta.json`` content (at least ``shape`` and ``fingerprint``).
        train: Training records.
        validation: Validation records.

    Returns:
        The folder.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "validation.jsonl", validation)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def load_dataset_dir(path: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """Read an ingested dataset folder back: (meta, train, validation)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    return meta, read_jsonl(path / "train.jsonl"), read_jsonl(path / "validation.jsonl")


# ---------------------------------------------------------------- record views


def to_messages(record: dict, shape: str) -> list[dict] | None:
    """Chat form of a record, or None for shapes that are not conversations."""
    if shape == "chat":
        return record["messages"]
    if shape == "instruction":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return None


def prompt_messages(record: dict, shape: str) -> list[dict]:
    """The conversation up to (not including) the final assistant answer; used to generate."""
    messages = to_messages(record, shape)
    if messages is None:
        raise StageError(f"shape '{shape}' has no prompt to generate from")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def reference_answer(record: dict, shape: str) -> str | None:
    """The answer a model should give for ``record`` (None for shapes without one)."""
    if shape == "instruction":
        return record["output"]
    if shape == "completion":
        return record["completion"]
    if shape == "chat":
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    return None


# ---------------------------------------------------------------- atomic outputs


def staging_dir(dest: str | Path) -> Path:
    """The folder a new ``dest`` is written into before it is swapped in: ``<dest>.tmp``.

    Beside ``dest`` so the final rename stays on one filesystem (atomic), and named so no reader
    takes it for a finished output. Only for writers that cannot use ``atomic_dir`` because
    several processes write into the folder (distributed ranks) and one of them swaps it in.
    """
    dest = Path(dest)
    return dest.with_name(dest.name + ".tmp")


def swap_in(staged: str | Path, dest: str | Path) -> None:
    """Put the fully written ``staged`` folder or file in the place of ``dest`` (replaced if there)."""
    dest = Path(dest)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    os.replace(staged, dest)


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Write a folder whole or not at all.

    Yields an empty folder beside ``dest`` (``staging_dir``; one a killed run left is cleared
    first). When the block ends normally the folder replaces ``dest``; when it raises, the
    folder is removed and ``dest`` is left as it was.

    Args:
        dest: The folder to (re)write.

    Yields:
        The folder to write into.
    """
    dest = Path(dest)
    tmp = staging_dir(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, dest)


@contextmanager
def atomic_file(dest: str | Path, durable: bool = False) -> Iterator[Path]:
    """Write a file whole or not at all.

    Yields a path beside ``dest``, unique to this writer (process id and a random part), so two
    processes writing the same ``dest`` at once (parallel tasks filling one cache) never write
    into each other's file. When the block ends normally the file replaces ``dest``; when it
    raises, the file is removed.

    Args:
        dest: The file to (re)write; its folder is created.
        durable: Also fsync the file before the rename and the folder after it, so that after a
            crash or power loss ``dest`` is the old file or the complete new one.

    Yields:
        The path to write to (it does not exist yet).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(dest.parent)


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
