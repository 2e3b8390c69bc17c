"""Stage `ingest`: read a data URI, recognise the record shape, validate, split, fingerprint.

Input: a local path, ``file://`` or ``s3://`` URI naming a JSONL, JSON, CSV or Parquet file,
or a saved HF ``datasets`` folder. Output: a dataset folder with ``train.jsonl``,
``validation.jsonl`` and ``meta.json`` (shape, fingerprint, counts).

Every problem is reported with its file, line (or row) and field, all at once, so a user fixes
a file in one pass rather than one error per run.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from kubetune.core.config import setting
from kubetune.lib import storage
from kubetune.lib.dataset import fingerprint, read_records, record_key, write_dataset_dir
from kubetune.errors import ConfigError, DataError
from kubetune.tracking import RunContext, log_metrics, maybe_stage, tag_parent
from kubetune.tracking import set_tags as mlflow_set_tags

SHAPES = ("text", "completion", "instruction", "chat", "preference", "classification")
ROLES = ("system", "user", "assistant")


@dataclass
class IngestConfig:
    data_uri: str = setting("", "Where the data is: a path, file://, s3:// or a saved HF datasets folder.")
    shape: Literal["auto", "text", "completion", "instruction", "chat", "preference", "classification"] = setting(
        "auto", "Record shape; 'auto' recognises it from the fields of the records.")
    validation_fraction: float = setting(0.1, "Share of rows held out for validation (seeded split).")
    seed: int = setting(0, "Seed of the train/validation split.")
    duplicates: Literal["drop", "fail"] = setting("drop", "Exact duplicate records: drop them (counted) or fail.")
    max_rows: int = setting(0, "Keep at most this many rows after validation (0 = all).")
    group_by: str = setting(
        "auto", "Field whose equal values stay on one side of the split (e.g. 'prompt' for preference pairs, or "
                "a template/topic key of generated data), so validation measures generalisation rather than "
                "recall; it may be any field of the records and is kept in the written rows. 'auto' = the "
                "'group' field when every record has one (the bundled datasets carry their template or topic "
                "key there), else row by row; '' = split row by row.")

    def __post_init__(self):
        if not self.data_uri:
            raise ConfigError("'data_uri' is required")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"'validation_fraction' must be between 0 and 1 (exclusive), got {self.validation_fraction}")
        if self.max_rows < 0:
            raise ConfigError(f"'max_rows' must be >= 0, got {self.max_rows}")


@dataclass
class IngestResult:
    shape: str
    fingerprint: str
    counts: dict[str, int]
    output_dir: str


# ---------------------------------------------------------------- validation


SHAPE_FIELDS = {"chat": "messages", "preference": "prompt+chosen+rejected", "instruction": "instruction+output",
                "completion": "prompt+completion", "classification": "text+label", "text": "text"}


def detect_shape(record: dict) -> str | None:
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def _need_str(rec: dict, field: str, where: str, problems: list[str], allow_empty: bool = False) -> str | None:
    if field not in rec or rec[field] is None:
        problems.append(f"{where}: field '{field}' is missing")
        return None
    value = rec[field]
    if not isinstance(value, str):
        problems.append(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        return None
    if not allow_empty and not value.strip():
        problems.append(f"{where}: field '{field}' is empty")
        return None
    return value


def normalize(rec: Any, shape: str, where: str, problems: list[str]) -> dict | None:
    """Validate one record of ``shape``; return its canonical form or None (problems appended)."""
    if not isinstance(rec, dict):
        problems.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
        return None
    n = len(problems)
    if shape == "text":
        out = {"text": _need_str(rec, "text", where, problems)}
    elif shape == "completion":
        out = {"prompt": _need_str(rec, "prompt", where, problems),
               "completion": _need_str(rec, "completion", where, problems)}
    elif shape == "instruction":
        inp = rec.get("input", "")
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            problems.append(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
        out = {"instruction": _need_str(rec, "instruction", where, problems), "input": inp,
               "output": _need_str(rec, "output", where, problems)}
    elif shape == "preference":
        out = {k: _need_str(rec, k, where, problems) for k in ("prompt", "chosen", "rejected")}
        if len(problems) == n and out["chosen"].strip() == out["rejected"].strip():
            problems.append(f"{where}: fields 'chosen' and 'rejected' are identical (no preference to learn)")
    elif shape == "classification":
        label = rec.get("label")
        if label is None or (isinstance(label, str) and not label.strip()):
            problems.append(f"{where}: field 'label' is missing or empty")
        elif isinstance(label, bool) or not isinstance(label, (str, int)):
            problems.append(f"{where}: field 'label' must be a string or integer, got {type(label).__name__}")
        out = {"text": _need_str(rec, "text", where, problems), "label": str(label).strip() if label is not None else None}
    elif shape == "chat":
        out = {"messages": _check_messages(rec.get("messages"), where, problems)}
    else:  # pragma: no cover - guarded by the config Literal
        raise ValueError(shape)
    return out if len(problems) == n else None


def _check_messages(messages: Any, where: str, problems: list[str]) -> list[dict] | None:
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where}: field 'messages' must be a non-empty list")
        return None
    out, n = [], len(problems)
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where}: field '{field}' must be an object with 'role' and 'content'")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"{where}: field '{field}.role' must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{where}: field '{field}.content' must be a non-empty string")
        out.append({"role": role, "content": content})
    if len(problems) > n:
        return None
    roles = [m["role"] for m in out]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        problems.append(f"{where}: field 'messages': a system message may only come first")
    elif not body or body[0] != "user":
        problems.append(f"{where}: field 'messages': the conversation must start with a user message")
    elif any(a == b for a, b in zip(body, body[1:])):
        i = next(i for i, (a, b) in enumerate(zip(body, body[1:])) if a == b) + 1 + (len(roles) - len(body))
        problems.append(f"{where}: field 'messages[{i}].role': user and assistant turns must alternate")
    elif "assistant" not in body:
        problems.append(f"{where}: field 'messages': no assistant message to learn from")
    return out if len(problems) == n else None


def split_fingerprint(train: list[dict], val: list[dict], cfg: "IngestConfig") -> str:
    """Fingerprint of the data as split: each split's content and every split setting.

    The same rows split another way (seed, fraction, grouping) train another model and are
    scored on other validation rows, so they are other data. Every setting but the URI counts
    (whatever the config holds, new split settings included); the URI does not: the same
    content from another place is the same data.
    """
    settings = {k: v for k, v in asdict(cfg).items() if k != "data_uri"}
    payload = json.dumps([fingerprint(train), fingerprint(val), settings], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate(split_records: dict[str, list[tuple[str, Any]]], shape: str = "auto",
             duplicates: str = "drop", group_by: str = "") -> tuple[str, dict[str, list[dict]], dict[str, int]]:
    """Validate all records; return (shape, {split: records}, counts) or raise DataError.

    ``group_by`` names a field every record must have; it is kept in the canonical record (which
    otherwise holds only its shape's fields) so the split can group on it.
    """
    problems: list[str] = []
    first_where = next((w for recs in split_records.values() for w, r in recs), None)
    if first_where is None:
        raise DataError("the data has no records (empty file)")
    if shape == "auto":
        first = next((r for recs in split_records.values() for _, r in recs if isinstance(r, dict)), None)
        shape = detect_shape(first) if first is not None else None
        # Every row votes: a file whose first row is {"text"} and the rest {"text", "label"} is not
        # a text file whose labels can be dropped, it is an error to resolve.
        first_of: dict[str, str] = {}
        for recs in split_records.values():
            for where, rec in recs:
                seen_shape = detect_shape(rec) if isinstance(rec, dict) else None
                if seen_shape is not None:
                    first_of.setdefault(seen_shape, where)
        if len(first_of) > 1:
            each = "; ".join(f"{where}: {name} ({SHAPE_FIELDS[name]})" for name, where in first_of.items())
            raise DataError(f"mixed record shapes (the first row of each: {each}); every row must have the "
                            "fields of one shape, or name the shape with shape=...")
        read_errors = [p for recs in split_records.values() for _, r in recs if isinstance(r, DataError)
                       for p in r.problems]
        if first is None and read_errors:  # nothing readable: the reading errors are the story
            raise DataError(read_errors)
        if shape is None:
            w = next(w for recs in split_records.values() for w, r in recs)
            keys = sorted(first) if isinstance(first, dict) else []
            raise DataError(f"{w}: cannot recognise the record shape from fields {keys}; expected one of: "
                            "text | prompt+completion | instruction+input+output | messages | "
                            "prompt+chosen+rejected | text+label")
    out: dict[str, list[dict]] = {}
    counts = {"rows_read": 0, "duplicates_dropped": 0}
    seen: dict[str, tuple[str, str]] = {}
    for split, recs in split_records.items():
        out[split] = []
        for where, rec in recs:
            counts["rows_read"] += 1
            if isinstance(rec, DataError):
                problems.extend(rec.problems)
                continue
            norm = normalize(rec, shape, where, problems)
            if norm is not None and group_by and group_by not in norm:
                if rec.get(group_by) is None:
                    problems.append(f"{where}: field '{group_by}' is missing (group_by: the split groups on it)")
                    continue
                norm[group_by] = rec[group_by]
            if norm is None:
                continue
            key = record_key(norm)
            if key in seen:
                if split != "all" and seen[key][0] != split:
                    problems.append(f"{where}: duplicates {seen[key][1]} across splits "
                                    f"({seen[key][0]} and {split}): validation rows leak into training")
                elif duplicates == "fail":
                    problems.append(f"{where}: duplicate of {seen[key][1]}")
                else:
                    counts["duplicates_dropped"] += 1
                continue
            seen[key] = (split, where)
            out[split].append(norm)
    if problems:
        raise DataError(problems)
    if sum(len(v) for v in out.values()) < 2:
        raise DataError(f"{first_where}: fewer than 2 valid records after removing duplicates; nothing to train on")
    return shape, out, counts


def check_labels(train: list[dict], val: list[dict], where: str) -> None:
    """Labels seen at evaluation must exist in training: a model cannot predict a class it never saw."""
    known = {r["label"] for r in train}
    unknown = [(i, r["label"]) for i, r in enumerate(val) if r["label"] not in known]
    if unknown:
        raise DataError([f"{where} row {i}: field 'label' value {label!r} never occurs in the training split "
                         f"(training labels: {sorted(known)})" for i, label in unknown])


# ---------------------------------------------------------------- stage


def split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split; the same records and seed give the same split on every machine."""
    order = sorted(records, key=record_key)  # independent of input order
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * fraction))
    return order[n_val:], order[:n_val]


def split_grouped(records: list[dict], fraction: float, seed: int, field: str) -> tuple[list[dict], list[dict]]:
    """Seeded split that keeps all rows with equal ``field`` values in the same split.

    Whole groups go to validation, in seeded order, until it holds ``round(n * fraction)`` rows
    (at least one group); the rest is training data.
    """
    if any(field not in r for r in records):  # validate() keeps the field; this guards direct callers
        raise ConfigError(f"'group_by': the records have no field '{field}' (fields: {sorted(records[0])})")
    groups: dict[str, list[dict]] = {}
    for r in sorted(records, key=record_key):
        groups.setdefault(json.dumps(r[field], sort_keys=True, ensure_ascii=False), []).append(r)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    want = max(1, round(len(records) * fraction))
    train: list[dict] = []
    val: list[dict] = []
    for name in names:
        (val if not val or len(val) < want else train).extend(groups[name])
    return train, val


GROUP_FIELD = "group"


def resolve_group_by(group_by: str, records: dict[str, list[tuple[str, Any]]]) -> str:
    """The field to group the split on: ``group_by`` as given, or for 'auto' the ``group`` field
    when every readable record has one (the bundled data's template/topic key), else ''."""
    recs = [r for rows in records.values() for _, r in rows if isinstance(r, dict)]
    if group_by != "auto":
        if group_by and recs and not any(group_by in r for r in recs):  # a wrong name, not bad rows
            raise ConfigError(f"'group_by': the records have no field '{group_by}' (fields: {sorted(recs[0])})")
        return group_by
    return GROUP_FIELD if recs and all(r.get(GROUP_FIELD) is not None for r in recs) else ""


@dataclass
class CheckResult:
    """What ``check`` found: the validated, split records and the ``meta.json`` that describes them."""
    shape: str
    fingerprint: str
    counts: dict[str, int]
    meta: dict
    train: list[dict]
    validation: list[dict]


def check(cfg: IngestConfig, cache_dir: str | Path | None = None) -> CheckResult:
    """Read, validate and split the data named by ``cfg.data_uri``, writing nothing.

    What ``ingest`` does up to writing its folder: ``kubetune validate``, ``advise`` and
    ``compare`` use it to read data exactly as a pipeline would.

    Args:
        cfg: The ingest settings.
        cache_dir: Where remote (S3) data is downloaded; default: a temporary folder, removed
            once the records are read.

    Returns:
        The shape, fingerprint, counts, ``meta.json`` content and the two splits.

    Raises:
        DataError: naming file, line and field of every problem found.
    """
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return check(cfg, tmp)
    records = read_records(storage.fetch(cfg.data_uri, cache_dir))
    group_by = resolve_group_by(cfg.group_by, records)
    shape, by_split, counts = validate(records, cfg.shape, cfg.duplicates, group_by)
    if "validation" in by_split and "train" in by_split:
        train, val = by_split["train"], by_split["validation"]
        if shape == "classification":
            check_labels(train, val, f"{cfg.data_uri} [validation]")
    else:
        rows = [r for recs in by_split.values() for r in recs]
        if cfg.max_rows:
            rows = sorted(rows, key=record_key)[: cfg.max_rows]
        if group_by:
            train, val = split_grouped(rows, cfg.validation_fraction, cfg.seed, group_by)
        else:
            train, val = split(rows, cfg.validation_fraction, cfg.seed)
    if not train:
        raise DataError(f"{cfg.data_uri}: no training rows left after the validation split")
    counts.update(rows_valid=len(train) + len(val), train=len(train), validation=len(val))
    if shape == "classification":
        counts["labels"] = len({r["label"] for r in train})
    fp, val_fp = split_fingerprint(train, val, cfg), fingerprint(val)
    if group_by:
        counts["validation_groups"] = len({record_key({"g": r[group_by]}) for r in val})
    meta = {"shape": shape, "fingerprint": fp, "validation_fingerprint": val_fp, "counts": counts,
            "source": cfg.data_uri, "seed": cfg.seed, "group_by": group_by}
    return CheckResult(shape=shape, fingerprint=fp, counts=counts, meta=meta, train=train, validation=val)


def ingest(cfg: IngestConfig, output_dir: str | Path, cache_dir: str | Path | None = None,
           ctx: RunContext | None = None) -> IngestResult:
    """Read, validate, split and write the data named by ``cfg.data_uri``.

    Args:
        cfg: The ingest settings.
        output_dir: Folder to write ``train.jsonl``, ``validation.jsonl`` and ``meta.json`` into.
            Written under a temporary name and renamed at the end: never half-written.
        cache_dir: Where remote (S3) data is downloaded; defaults to a folder beside the output.
        ctx: When given, the stage logs to an MLflow child run of the pipeline run.

    Returns:
        The shape, content fingerprint and counts.

    Raises:
        DataError: naming file, line and field of every problem found.
    """
    output_dir = Path(output_dir)
    with maybe_stage(ctx, "ingest", params=asdict(cfg)) as run:
        data = check(cfg, Path(cache_dir) if cache_dir else output_dir.parent / ".ingest-cache")
        write_dataset_dir(output_dir, data.meta, data.train, data.validation)
        if run is not None:
            log_metrics({f"data_{k}": v for k, v in data.counts.items()})
            tags = {"kubetune.data_fingerprint": data.fingerprint, "kubetune.data_shape": data.shape}
            mlflow_set_tags(tags)
            tag_parent(run, tags)
    return IngestResult(shape=data.shape, fingerprint=data.fingerprint, counts=data.counts,
                        output_dir=str(output_dir))
