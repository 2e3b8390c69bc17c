"""kubetune.lib.dataset: outputs appear whole or not at all; the ingested folder round-trips."""

from __future__ import annotations

import json
import os

import pytest

from kubetune.lib.dataset import (atomic_dir, atomic_file, fingerprint, load_dataset_dir, staging_dir,
                                  write_dataset_dir)
from kubetune.stages.ingest import IngestConfig, check, ingest


def test_atomic_dir_replaces_the_old_folder_only_when_the_block_succeeds(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]  # the old output untouched

    with atomic_dir(dest) as tmp:
        assert tmp == staging_dir(dest) and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (dest / "old.txt").exists()  # readers see the old folder until the swap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]


def test_atomic_dir_clears_what_a_killed_run_left_in_staging(tmp_path):
    dest = tmp_path / "out"
    staging_dir(dest).mkdir()
    (staging_dir(dest) / "stale.bin").write_text("from a killed run")
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in dest.iterdir()) == ["a"]


def test_atomic_file_keeps_the_old_file_on_error_and_writers_never_share_a_temporary(tmp_path):
    dest = tmp_path / "sub" / "eval.json"
    with atomic_file(dest) as first, atomic_file(dest) as second:
        assert first != second and first.parent == dest.parent  # two concurrent writers of one file
        first.write_text("1")
        second.write_text("2")
    assert dest.read_text() == "1"  # each rename is whole: the writer that finished last wins
    with pytest.raises(ValueError):
        with atomic_file(dest) as tmp:
            tmp.write_text("half")
            raise ValueError("bad")
    assert dest.read_text() == "1" and os.listdir(dest.parent) == ["eval.json"]


def test_dataset_folder_round_trips_and_the_fingerprint_ignores_order(tmp_path):
    train = [{"text": "a"}, {"text": "b ü"}]
    val = [{"text": "c"}]
    meta = {"shape": "text", "fingerprint": fingerprint(train + val)}
    write_dataset_dir(tmp_path / "ds", meta, train, val)
    assert load_dataset_dir(tmp_path / "ds") == (meta, train, val)
    assert fingerprint(train[::-1] + val) == meta["fingerprint"] != fingerprint(train)


def test_check_reads_like_ingest_and_writes_nothing(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = check(IngestConfig(data_uri=str(src)))
    assert os.listdir(tmp_path) == ["d.jsonl"]
    assert result.shape == "completion" and result.counts["train"] + result.counts["validation"] == 20
    assert sorted(result.train + result.validation, key=str) == sorted(rows, key=str)
    written = ingest(IngestConfig(data_uri=str(src)), tmp_path / "out")
    assert (written.fingerprint, written.counts) == (result.fingerprint, result.counts)
    assert load_dataset_dir(tmp_path / "out") == (result.meta, result.train, result.validation)
