"""ingest: shapes, validation errors naming file/line/field, split, fingerprint, S3."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kubetune.errors import DataError
from kubetune.lib.dataset import fingerprint, load_dataset_dir
from kubetune.stages.ingest import IngestConfig, ingest

KUBETUNE = [sys.executable, "-m", "kubetune.cli"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,shape", [
    ({"text": "hello there"}, "text"),
    ({"prompt": "2+2=", "completion": "4"}, "completion"),
    ({"instruction": "Add", "input": "2 and 2", "output": "4"}, "instruction"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "chat"),
    ({"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}, "preference"),
    ({"text": "great film", "label": "positive"}, "classification"),
])
def test_recognises_every_shape(tmp_path, row, shape):
    rows = [row, {**row, **{k: v + " again" for k, v in row.items() if isinstance(v, str) and k != "label"}}]
    if shape == "chat":
        rows[1] = {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]}
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    result = ingest(IngestConfig(data_uri=str(src)), tmp_path / "out")
    assert result.shape == shape
    meta, train, val = load_dataset_dir(tmp_path / "out")
    assert meta["shape"] == shape and len(train) + len(val) == 2 and len(val) == 1


def test_formats_agree(tmp_path):
    """JSONL, JSON, CSV and Parquet holding the same rows give the same fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"example {i}", "label": "a" if i % 2 else "b"} for i in range(10)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    fps = {ingest(IngestConfig(data_uri=str(tmp_path / f"d.{ext}")), tmp_path / f"out-{ext}").fingerprint
           for ext in ("jsonl", "json", "csv", "parquet")}
    assert len(fps) == 1


def test_hf_datasets_folder_with_leak_is_refused(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"text": f"t{i}"} for i in range(5)])
    val = datasets.Dataset.from_list([{"text": "t1"}, {"text": "v"}])
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="leak"):
        ingest(IngestConfig(data_uri=str(tmp_path / "hf")), tmp_path / "out")
    datasets.DatasetDict({"train": train, "validation": val.select([1])}).save_to_disk(str(tmp_path / "hf2"))
    result = ingest(IngestConfig(data_uri=f"file://{tmp_path / 'hf2'}"), tmp_path / "out")
    assert result.counts["train"] == 5 and result.counts["validation"] == 1


def test_split_is_deterministic_and_fingerprint_ignores_order(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(50)]
    a = ingest(IngestConfig(data_uri=str(write_jsonl(tmp_path / "a.jsonl", rows)), seed=3), tmp_path / "A")
    b = ingest(IngestConfig(data_uri=str(write_jsonl(tmp_path / "b.jsonl", rows[::-1])), seed=3), tmp_path / "B")
    assert a.fingerprint == b.fingerprint
    assert load_dataset_dir(tmp_path / "A")[2] == load_dataset_dir(tmp_path / "B")[2]
    c = ingest(IngestConfig(data_uri=str(tmp_path / "a.jsonl"), seed=4), tmp_path / "C")
    assert load_dataset_dir(tmp_path / "C")[2] != load_dataset_dir(tmp_path / "A")[2]
    assert fingerprint(rows[:-1]) != a.fingerprint
    assert a.counts == {"rows_read": 50, "duplicates_dropped": 0, "rows_valid": 50, "train": 45, "validation": 5}


def test_fingerprint_covers_the_split(tmp_path):
    """The same rows split another way are other data: other training rows, other validation rows."""
    rows = [{"instruction": f"topic {i % 5}", "input": f"row {i}", "output": "ok"} for i in range(50)]
    src = str(write_jsonl(tmp_path / "a.jsonl", rows))
    base = ingest(IngestConfig(data_uri=src, seed=3), tmp_path / "A")
    meta = load_dataset_dir(tmp_path / "A")[0]
    assert meta["validation_fingerprint"] == fingerprint(load_dataset_dir(tmp_path / "A")[2])
    others = [ingest(IngestConfig(data_uri=src, seed=4), tmp_path / "seed"),
              ingest(IngestConfig(data_uri=src, seed=3, validation_fraction=0.2), tmp_path / "fraction"),
              ingest(IngestConfig(data_uri=src, seed=3, group_by="instruction"), tmp_path / "grouped")]
    fps = [base.fingerprint] + [o.fingerprint for o in others]
    assert len(set(fps)) == len(fps), fps
    # The same rows and split from another place are the same data.
    again = ingest(IngestConfig(data_uri=str(write_jsonl(tmp_path / "copy.jsonl", rows)), seed=3), tmp_path / "B")
    assert again.fingerprint == base.fingerprint


def test_duplicates_dropped_with_count_or_fail(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "a"}, {"text": "c"}])
    assert ingest(IngestConfig(data_uri=str(src)), tmp_path / "o").counts["duplicates_dropped"] == 1
    with pytest.raises(DataError, match=r"d.jsonl:3: duplicate of .*d.jsonl:1"):
        ingest(IngestConfig(data_uri=str(src), duplicates="fail"), tmp_path / "o2")


# Each malformed file: (file name, bytes, text the error must contain: file:line and field).
MALFORMED = [
    ("empty.jsonl", b"", "no records"),
    ("badjson.jsonl", b'{"text": "ok"}\n{"text": "broken"\n', "badjson.jsonl:2: invalid JSON"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "latin1.jsonl:2: not valid UTF-8"),
    ("nul.jsonl", b'{"text": "ok"}\n{"text": "a\x00b"}\n', "nul.jsonl:2: contains NUL"),
    ("wrongtype.jsonl", b'{"text": "ok"}\n{"text": 42}\n', "wrongtype.jsonl:2: field 'text' must be a string"),
    ("emptystr.jsonl", b'{"prompt": "p", "completion": "c"}\n{"prompt": "p2", "completion": "  "}\n',
     "emptystr.jsonl:2: field 'completion' is empty"),
    ("missing.jsonl", b'{"instruction": "i", "output": "o"}\n{"instruction": "i2"}\n',
     "missing.jsonl:2: field 'output' is missing"),
    ("nolabel.jsonl", b'{"text": "t", "label": "a"}\n{"text": "t2", "label": ""}\n',
     "nolabel.jsonl:2: field 'label' is missing or empty"),
    ("samepref.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "x", '
     b'"rejected": "x"}\n', "samepref.jsonl:2: fields 'chosen' and 'rejected' are identical"),
    ("roles.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
     b'{"messages": [{"role": "robot", "content": "a"}]}\n', "roles.jsonl:2: field 'messages[0].role'"),
    ("order.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
     b'{"role": "assistant", "content": "c"}]}\n', "order.jsonl:1: field 'messages[1].role': user and assistant"),
    ("notobject.jsonl", b'{"text": "a"}\n["text"]\n', "notobject.jsonl:2: expected a JSON object"),
    ("dupsonly.jsonl", b'{"text": "a"}\n{"text": "a"}\n{"text": "a"}\n', "fewer than 2 valid records"),
    ("unknown.jsonl", b'{"foo": 1}\n', "cannot recognise the record shape"),
    ("ragged.csv", b"text,label\nhello,a\nbad,b,extra\n", "ragged.csv:3: more values than"),
]


@pytest.mark.parametrize("name,content,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_validate_cli_rejects_malformed(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    proc = subprocess.run([*KUBETUNE, "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr


def test_validate_cli_accepts_bundled_data():
    proc = subprocess.run([*KUBETUNE, "validate", "bundled://tickets"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "shape=instruction" in proc.stdout and "rows_valid=480" in proc.stdout


def test_all_problems_reported_at_once_and_nothing_written(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": 1}\n{"text": ""}\n{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(DataError) as err:
        ingest(IngestConfig(data_uri=str(src)), tmp_path / "out")
    assert [p.split(": field")[0] for p in err.value.problems] == [f"{src}:1", f"{src}:2", f"{src}:4"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_reads_from_s3_through_moto_server(tmp_path, s3_env):
    import boto3

    body = "".join(json.dumps({"text": f"s3 row {i}"}) + "\n" for i in range(20))
    boto3.client("s3").put_object(Bucket=s3_env, Key="data/train.jsonl", Body=body.encode())
    local = ingest(IngestConfig(data_uri=str(write_jsonl(tmp_path / "l.jsonl", [json.loads(x) for x in
                                                                               body.splitlines()]))), tmp_path / "L")
    remote = ingest(IngestConfig(data_uri=f"s3://{s3_env}/data/train.jsonl"), tmp_path / "R")
    assert remote.fingerprint == local.fingerprint and remote.counts["rows_valid"] == 20
    prefix = ingest(IngestConfig(data_uri=f"s3://{s3_env}/data/"), tmp_path / "P")  # a prefix: a folder of one file
    assert prefix.fingerprint == local.fingerprint
    with pytest.raises(DataError, match="no such object or prefix"):
        ingest(IngestConfig(data_uri=f"s3://{s3_env}/nothing/here.jsonl"), tmp_path / "N")


def test_bundled_tickets_split_holds_out_whole_answers(tmp_path):
    """Validation measures generalisation: no validation answer (the ticket's whole record) occurs in
    training, while every field value it asks for does; the default ('auto') split groups on it."""
    ingest(IngestConfig(data_uri="bundled://tickets"), tmp_path / "out")
    meta, train, val = load_dataset_dir(tmp_path / "out")
    assert meta["group_by"] == "group" and len(val) >= 40
    train_answers = {r["output"] for r in train}
    assert not [r["output"] for r in val if r["output"] in train_answers]
    assert not {r["input"] for r in val} & {r["input"] for r in train}
    for field in ("product", "issue", "priority"):
        seen = {json.loads(r["output"])[field] for r in train}
        assert {json.loads(r["output"])[field] for r in val} <= seen


def test_bundled_preferences_split_holds_out_whole_topics(tmp_path):
    ingest(IngestConfig(data_uri="bundled://preferences"), tmp_path / "out")
    _, train, val = load_dataset_dir(tmp_path / "out")
    assert val and not {r["group"] for r in val} & {r["group"] for r in train}


def test_group_by_a_user_field_keeps_each_group_on_one_side(tmp_path):
    rows = [{"instruction": "Echo", "input": f"text {i}", "output": f"out {i}", "topic": f"t{i % 7}"}
            for i in range(70)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    result = ingest(IngestConfig(data_uri=str(src), group_by="topic", validation_fraction=0.3, seed=3),
                    tmp_path / "out")
    _, train, val = load_dataset_dir(tmp_path / "out")
    assert len(train) + len(val) == 70 and result.counts["validation_groups"] == len({r["topic"] for r in val})
    assert not {r["topic"] for r in val} & {r["topic"] for r in train}
    # Row by row, the same file puts most topics on both sides: the grouping is what keeps them apart.
    ingest(IngestConfig(data_uri=str(src), group_by="", validation_fraction=0.3, seed=3), tmp_path / "plain")
    _, train, val = load_dataset_dir(tmp_path / "plain")
    assert "topic" not in train[0] and len(val) == 21


def test_group_by_field_missing_on_a_row_names_file_line_and_field(tmp_path):
    rows = [{"text": f"row {i}", "topic": "a"} for i in range(5)]
    del rows[3]["topic"]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl:4: field 'topic' is missing"):
        ingest(IngestConfig(data_uri=str(src), group_by="topic"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
