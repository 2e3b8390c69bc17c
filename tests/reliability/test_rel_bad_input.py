"""Bad input: a corpus of malformed data files and configs, each refused with an error that
names file/line/field (or the config key), exit status 1, nothing registered; and property-based
tests (hypothesis) of the parsers: whatever the bytes, they report, they never crash."""

from __future__ import annotations

import json

import pytest
from _rel import rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune import cli
from kubetune.core.config import from_dict, parse_set
from kubetune.errors import ConfigError, DataError, KubetuneError, StageError
from kubetune.stages.evaluate import EvaluateConfig
from kubetune.lib.dataset import _read_csv, _read_json, _read_jsonl, read_records
from kubetune.stages.ingest import IngestConfig, ingest, normalize, validate
from kubetune.stages.register import RegisterConfig
from kubetune.stages.tokenize_data import TokenizeConfig, tokenize_data
from kubetune.core.train import TrainConfig


def _j(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
CHAT_OK = {"messages": [U, A]}
PREF_OK = {"prompt": "p", "chosen": "good", "rejected": "bad"}
INSTR_OK = {"instruction": "do", "input": "", "output": "done"}
CLS_OK = {"text": "fine", "label": "pos"}

# (file name, content, the text the error must contain: file:line and field)
CORPUS = [
    # truncated files, one per format
    ("trunc.jsonl", b'{"text": "ok"}\n{"text": "cut in the mi', "trunc.jsonl:2: invalid JSON"),
    ("trunc.json", b'[{"text": "a"}, {"text": "b"', "trunc.json:1: invalid JSON"),
    ("trunc.csv", b'text,label\n"open quote,a\n', "trunc.csv"),
    ("trunc.parquet", b"PAR1\x15\x04\x15", "trunc.parquet: not a readable Parquet file"),
    # invalid JSON lines
    ("comma.jsonl", b'{"text": "a"}\n{"text": "b",}\n', "comma.jsonl:2: invalid JSON"),
    ("notobject.jsonl", b'{"text": "a"}\n42\n', "notobject.jsonl:2: expected a JSON object, got int"),
    ("jsonobject.json", b'{"rows": [{"text": "a"}]}', "jsonobject.json: expected a JSON list"),
    # encodings, BOMs, NULs, huge lines
    ("utf16.jsonl", '{"text": "a"}\n'.encode("utf-16"), "utf16.jsonl:1: contains NUL"),
    ("latin1.csv", b"text,label\ncaf\xe9,a\n", "latin1.csv:2: not valid UTF-8"),
    ("bom2.jsonl", b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n', "bom2.jsonl:2: invalid JSON"),
    ("nul.csv", b"text,label\na\x00b,x\n", "nul.csv: contains NUL"),
    ("huge.jsonl", b'{"text": "a"}\n{"text": "' + b"x" * (1 << 20) + b'"}\n', "huge.jsonl:2: line is"),
    # wrong types, empty strings, missing fields: text / completion / instruction
    ("text_null.jsonl", _j({"text": "a"}, {"text": None}), "text_null.jsonl:2: field 'text' is missing"),
    ("text_empty.jsonl", _j({"text": "a"}, {"text": " \n\t"}), "text_empty.jsonl:2: field 'text' is empty"),
    ("comp_list.jsonl", _j({"prompt": "p", "completion": "c"}, {"prompt": ["p"], "completion": "c"}),
     "comp_list.jsonl:2: field 'prompt' must be a string, got list"),
    ("instr_input.jsonl", _j(INSTR_OK, {**INSTR_OK, "input": 7}), "instr_input.jsonl:2: field 'input' must be a string"),
    ("instr_empty.jsonl", _j(INSTR_OK, {**INSTR_OK, "instruction": ""}),
     "instr_empty.jsonl:2: field 'instruction' is empty"),
    # chat: wrong roles or order
    ("chat_str.jsonl", _j(CHAT_OK, {"messages": "hi"}), "chat_str.jsonl:2: field 'messages' must be a non-empty list"),
    ("chat_empty.jsonl", _j(CHAT_OK, {"messages": []}), "chat_empty.jsonl:2: field 'messages' must be a non-empty"),
    ("chat_role.jsonl", _j(CHAT_OK, {"messages": [U, {"role": "bot", "content": "x"}]}),
     "chat_role.jsonl:2: field 'messages[1].role' must be one of"),
    ("chat_first.jsonl", _j(CHAT_OK, {"messages": [A, U]}), "chat_first.jsonl:2: field 'messages': the conversation "
     "must start with a user message"),
    ("chat_system.jsonl", _j(CHAT_OK, {"messages": [U, {"role": "system", "content": "s"}, A]}),
     "chat_system.jsonl:2: field 'messages': a system message may only come first"),
    ("chat_noanswer.jsonl", _j(CHAT_OK, {"messages": [{"role": "system", "content": "s"}, U]}),
     "chat_noanswer.jsonl:2: field 'messages': no assistant message"),
    ("chat_content.jsonl", _j(CHAT_OK, {"messages": [U, {"role": "assistant", "content": 5}]}),
     "chat_content.jsonl:2: field 'messages[1].content' must be a non-empty string"),
    # preference pairs
    ("pref_same.jsonl", _j(PREF_OK, {"prompt": "q", "chosen": "same ", "rejected": " same"}),
     "pref_same.jsonl:2: fields 'chosen' and 'rejected' are identical"),
    ("pref_missing.jsonl", _j(PREF_OK, {"prompt": "q", "chosen": "x"}),
     "pref_missing.jsonl:2: field 'rejected' is missing"),
    # classification: missing labels, wrong types
    ("cls_nolabel.jsonl", _j(CLS_OK, {"text": "t", "label": None}), "cls_nolabel.jsonl:2: field 'label' is missing"),
    ("cls_list.jsonl", _j(CLS_OK, {"text": "t", "label": ["a"]}),
     "cls_list.jsonl:2: field 'label' must be a string or integer, got list"),
    ("cls_bool.jsonl", _j(CLS_OK, {"text": "t", "label": True}), "cls_bool.jsonl:2: field 'label' must be a string"),
    ("cls_csv.csv", b"text,label\nhi,a\nthere,\n", "cls_csv.csv:3: field 'label' is missing or empty"),
    # duplicate-only and empty data, unknown shapes and formats
    ("dups.jsonl", _j({"text": "a"}, {"text": "a"}, {"text": "a"}), "dups.jsonl:1: fewer than 2 valid records"),
    ("blank.jsonl", b"\n \n\n", "no records"),
    ("shape.jsonl", _j({"question": "q", "answer": "a"}), "shape.jsonl:1: cannot recognise the record shape"),
    ("data.txt", b"just text\n", "data.txt: unknown format '.txt'"),
]


@pytest.mark.parametrize("name,content,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_validate_refuses_each_malformed_file(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err, err[:2000]


def _hf_folder(path, train, validation):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "validation": datasets.Dataset.from_list(validation)}).save_to_disk(str(path))
    return path


def test_validation_rows_leaking_into_training(tmp_path, capsys):
    src = _hf_folder(tmp_path / "hf", [{"text": f"t{i}"} for i in range(5)], [{"text": "t3"}, {"text": "v"}])
    assert cli.main(["validate", str(src)]) == 1
    assert "[validation] row 0: duplicates" in capsys.readouterr().err and "leak into training" in str(
        pytest.raises(DataError, ingest, IngestConfig(data_uri=str(src)), tmp_path / "o").value)


def test_unknown_labels_at_evaluation(tmp_path, capsys):
    train = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    src = _hf_folder(tmp_path / "hf", train, [{"text": "v1", "label": "pos"}, {"text": "v2", "label": "meh"}])
    assert cli.main(["validate", str(src)]) == 1
    err = capsys.readouterr().err
    assert "[validation] row 1: field 'label' value 'meh' never occurs in the training split" in err
    ok = _hf_folder(tmp_path / "hf2", train, [{"text": "v1", "label": "pos"}])
    assert cli.main(["validate", str(ok)]) == 0


def test_prompts_longer_than_max_length(tiny_llama, tmp_path):
    src = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 200 + str(i), "output": "x"}
                                                for i in range(6)])
    ingest(IngestConfig(data_uri=str(src)), tmp_path / "ds")
    with pytest.raises(StageError, match="every example is longer than max_length"):
        tokenize_data(TokenizeConfig(base_model=str(tiny_llama), max_length=32), tmp_path / "ds", tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


# ---------------------------------------------------------------- configs

CONFIG_ERRORS = [
    (TrainConfig, {"no_such_key": 1}, "unknown key(s) ['no_such_key']"),
    (TrainConfig, {"max_steps": "many"}, "'max_steps' must be an integer, got str"),
    (TrainConfig, {"max_steps": True}, "'max_steps' must be an integer, got bool"),
    (TrainConfig, {"learning_rate": "fast"}, "'learning_rate' must be a number"),
    (TrainConfig, {"method": "magic"}, "'method' must be one of"),
    (TrainConfig, {"merge": "yes"}, "'merge' must be true or false"),
    (TrainConfig, {"max_steps": 0, "epochs": 0}, "'max_steps' (0) or 'epochs' (0.0) must be > 0"),
    (TrainConfig, {"batch_size": -4}, "'batch_size' must be >= 1"),
    (TrainConfig, {"learning_rate": 3.0}, "'learning_rate' must be in [0, 1]"),
    (TrainConfig, {"warmup_ratio": 1.0}, "'warmup_ratio' must be in [0, 1)"),
    (TrainConfig, {"lora_dropout": -0.1}, "'lora_dropout' must be in [0, 1)"),
    (IngestConfig, {"data_uri": "x", "validation_fraction": 1.0}, "'validation_fraction' must be between 0 and 1"),
    (IngestConfig, {}, "'data_uri' is required"),
    (IngestConfig, {"data_uri": "x", "max_rows": -1}, "'max_rows' must be >= 0"),
    (TokenizeConfig, {"max_length": 4}, "'max_length' must be at least 8"),
    (TokenizeConfig, {"chat_template": "jinja-of-my-own"}, "'chat_template' must be 'auto' or one of"),
    (EvaluateConfig, {"max_new_tokens": 0}, "'max_new_tokens'"),
    (RegisterConfig, {"model_name": ""}, "'model_name' is required"),
]


@pytest.mark.parametrize("cls,values,expected", CONFIG_ERRORS,
                         ids=[f"{c.__name__}-{next(iter(v), 'empty')}" for c, v, _ in CONFIG_ERRORS])
def test_config_errors_name_the_key(cls, values, expected):
    with pytest.raises(ConfigError) as err:
        from_dict(cls, values, "settings.yaml")
    assert expected in str(err.value) and str(err.value).startswith("settings.yaml: ")


@pytest.mark.parametrize("args,expected", [
    (["--set", "no_such=1"], "unknown parameter(s) ['no_such'] for pipeline 'peft'"),
    (["--set", "max_steps=lots"], "'max_steps' must be an integer, got str"),
    (["--set", "max_steps"], "--set 'max_steps': expected key=value"),
    (["--set", "train_settings=3"], "'train_settings' must be a mapping"),
    (["--config", "CFG_LIST"], "top level must be a mapping of settings, got list"),
    (["--config", "CFG_BAD"], "not valid YAML"),
    (["--config", "CFG_MISSING"], "config file not found"),
    (["--set", "max_steps=\x1f"], "--set 'max_steps=\\x1f': the value is not valid YAML"),
], ids=["unknown", "type", "noequals", "mapping", "toplist", "badyaml", "missing", "setyaml"])
def test_run_refuses_bad_parameters_before_running(tmp_path, capsys, args, expected):
    (tmp_path / "list.yaml").write_text("- max_steps: 3\n")
    (tmp_path / "bad.yaml").write_text("max_steps: [1,\n")
    files = {"CFG_LIST": tmp_path / "list.yaml", "CFG_BAD": tmp_path / "bad.yaml", "CFG_MISSING": tmp_path / "no.yaml"}
    args = [str(files.get(a, a)) for a in args]
    assert cli.main(["run", "peft", *args]) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / ".kubetune").exists()


def test_bad_data_through_the_pipeline_registers_nothing(tiny_llama, mlflow_uri, tmp_path):
    """One real pipeline run on malformed data: ingest fails with file:line, nothing is registered."""
    from mlflow.tracking import MlflowClient

    from kubetune.ops.runner import run_local

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_j(*rows(8)) + b'{"instruction": "x", "output": 3}\n')
    with pytest.raises(KubetuneError, match="failed"):
        run_local("peft", {"data_uri": str(bad), "base_model": str(tiny_llama), "model_name": "bad-data",
                           "max_steps": 2}, workdir=tmp_path)
    assert MlflowClient().search_registered_models() == []
    assert not list((tmp_path / ".kubetune").rglob("kubetune_method.json"))


# ---------------------------------------------------------------- properties of the parsers

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=12)
# records that look like each shape, with arbitrary values in the right keys
shaped = st.one_of(*[st.fixed_dictionaries({k: json_values | st.text() for k in keys}) for keys in (
    ["text"], ["prompt", "completion"], ["instruction", "input", "output"], ["prompt", "chosen", "rejected"],
    ["text", "label"])], st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | json_values,
         "content": json_values}), max_size=4) | json_values}))


@PROPS
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_readers_never_crash_and_name_the_file(tmp_path, data, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(data)
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
    for where, rec in reader(path):
        assert where.startswith(str(path))
        if isinstance(rec, DataError):
            assert all(p.startswith(str(path)) for p in rec.problems)
    try:
        validate(read_records(path))
    except DataError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@PROPS
@given(rec=shaped | json_values, shape=st.sampled_from(["text", "completion", "instruction", "chat", "preference",
                                                      "classification"]))
def test_normalize_returns_a_record_or_names_the_problem(rec, shape):
    problems: list[str] = []
    out = normalize(rec, shape, "f.jsonl:7", problems)
    if out is None:
        assert problems and all(p.startswith("f.jsonl:7: ") for p in problems)
    else:
        assert not problems and all(v is None or isinstance(v, (str, list)) for v in out.values())
        json.dumps(out)  # what is written to train.jsonl


@PROPS
@given(values=st.dictionaries(st.sampled_from(["max_steps", "learning_rate", "method", "merge", "target_modules",
                                               "warmup_ratio", "seed", "bogus"]), json_values, max_size=4))
def test_from_dict_builds_or_raises_config_error_naming_the_key(values):
    try:
        cfg = from_dict(TrainConfig, values, "s")
    except ConfigError as e:
        assert any(f"'{k}'" in str(e) for k in values)
    else:
        assert all(getattr(cfg, k) == v for k, v in values.items() if not isinstance(v, float))


@PROPS
@given(items=st.lists(st.text(max_size=20), max_size=5))
def test_parse_set_parses_or_names_the_item(items):
    try:
        out = parse_set(items)
    except ConfigError as e:
        assert "--set" in str(e)
    except Exception as e:  # a YAML value that is not a scalar is the user's, but must not be a crash
        pytest.fail(f"parse_set({items!r}) raised {type(e).__name__}: {e}")
    else:
        assert set(out) == {i.split("=", 1)[0].strip() for i in items}


@PROPS
@given(key=st.from_regex(r"[a-z_]{1,12}", fullmatch=True), value=st.integers() | st.booleans())
def test_parse_set_round_trips_scalars(key, value):
    assert parse_set([f"{key}={json.dumps(value)}"]) == {key: value}


def test_mixed_record_shapes_are_refused_naming_the_first_row_of_each(tmp_path, capsys):
    """The shape comes from every row: labels on all rows but the first are not dropped in silence."""
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(_j({"text": "first"}, *[{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(8)],
                       INSTR_OK))
    assert cli.main(["validate", str(src)]) == 1
    err = capsys.readouterr().err
    assert "mixed record shapes" in err and f"{src}:1: text (text)" in err, err
    assert f"{src}:2: classification (text+label)" in err and f"{src}:10: instruction" in err, err
    assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(DataError, match="mixed record shapes"):
        ingest(IngestConfig(data_uri=str(src)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    one = tmp_path / "one.jsonl"  # one shape with optional fields absent on some rows is not mixed
    one.write_bytes(_j(INSTR_OK, {"instruction": "b", "output": "c"}, {**INSTR_OK, "instruction": "x"}))
    assert cli.main(["validate", str(one)]) == 0
