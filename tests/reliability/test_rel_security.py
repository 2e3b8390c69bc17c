"""Security: no remote code or pickle unless opted in, no secret written anywhere, data URIs
confined to the allowed roots. (Images run as a non-root user: tests/test_manifests.py,
``test_dockerfile_structure`` and ``test_pods_run_as_non_root_with_resource_limits``.)"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from _rel import rows, write_jsonl

from kubetune.core import models

from kubetune.lib import storage
from kubetune.errors import DataError, StageError
from kubetune.stages.ingest import IngestConfig, ingest


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_model_that_needs_remote_code_is_refused_unless_opted_in(tiny_llama, tmp_path):
    folder = _copy_model(tiny_llama, tmp_path / "remote")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    for load in (lambda: models.load_causal_lm(str(folder)), lambda: models.load_tokenizer(str(folder))):
        with pytest.raises(StageError, match=r"needs its own Python code .*trust_remote_code=true for this model"):
            load()
    models.check_remote_code(str(folder), trust_remote_code=True)  # opting in passes the gate
    assert models.load_causal_lm(str(tiny_llama)) is not None  # a model without auto_map loads


def test_pickle_weights_are_refused_unless_opted_in(tiny_llama, tmp_path):
    model = models.load_causal_lm(str(tiny_llama))
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the pickle format of old checkpoints
    assert list(folder.glob("*.bin")) and not list(folder.glob("*.safetensors"))
    with pytest.raises(StageError, match=r"only in pickle files .* allow_pickle=true"):
        models.load_causal_lm(str(folder))
    loaded = models.load_causal_lm(str(folder), allow_pickle=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_data_uris_cannot_escape_the_allowed_roots(tmp_path, monkeypatch):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    write_jsonl(allowed / "ok.jsonl", rows(6))
    write_jsonl(outside / "secret.jsonl", rows(6))
    (allowed / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (allowed / "linkdir").symlink_to(outside)
    monkeypatch.setenv("KUBETUNE_DATA_ROOTS", f"{allowed},s3://bucket/datasets/")

    assert storage.fetch(str(allowed / "ok.jsonl"), tmp_path / "c") == allowed / "ok.jsonl"
    assert storage.fetch(f"file://{allowed}/ok.jsonl", tmp_path / "c").exists()
    assert storage.fetch("bundled://tickets", tmp_path / "c").exists()  # shipped data is always allowed
    escapes = [str(outside / "secret.jsonl"), f"{allowed}/../outside/secret.jsonl", f"file://{allowed}/../outside",
               str(allowed / "link.jsonl"), str(allowed / "linkdir" / "secret.jsonl"), "/etc/passwd",
               "s3://bucket/datasets/../private/x.jsonl", "s3://bucket/datasets-other/x.jsonl", "s3://other/x.jsonl"]
    for uri in escapes:
        with pytest.raises(DataError, match="outside the allowed data roots|'..' is not allowed"):
            storage.fetch(uri, tmp_path / "c")
    with pytest.raises(DataError, match="KUBETUNE_DATA_ROOTS"):
        ingest(IngestConfig(data_uri=f"{allowed}/../outside/secret.jsonl"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("KUBETUNE_DATA_ROOTS")
    assert storage.fetch(str(outside / "secret.jsonl"), tmp_path / "c").exists()  # no root set: no limit


def test_no_archive_extraction_to_make_safe():
    """kubetune extracts no archives (zip/tar); adding one must come with a traversal-safe extractor."""
    src = Path(storage.__file__).parent
    found = [f"{p.name}: {m}" for p in src.rglob("*.py")
             for m in re.findall(r"\b(?:tarfile|zipfile|extractall|unpack_archive)\b", p.read_text())]
    assert found == []


CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARY7Q3XJ2LRW9",
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-9f8e7d6c5b4a3f2e1d0c",
    "AWS_SESSION_TOKEN": "canary-aws-session-token-5a4b3c2d1e",
    "MLFLOW_TRACKING_TOKEN": "canary-mlflow-token-1a2b3c4d5e6f",
    "MLFLOW_TRACKING_PASSWORD": "canary-mlflow-password-6f5e4d",
    "HF_TOKEN": "hf_canaryTOKENq8w7e6r5t4y3u2i1o0p",
    "HUGGING_FACE_HUB_TOKEN": "hf_canaryHUBTOKENz9x8c7v6b5n4m",
}


def test_secrets_never_written_anywhere(tiny_llama, mlflow_uri, tmp_path, monkeypatch, capfd):
    """A whole pipeline run and a compile with canary secrets in the environment; then every byte
    written (MLflow database and artifacts, KFP outputs, workspace, stdout/stderr, YAML) is scanned."""
    from kubetune.ops.runner import compile_all, run_local

    for k, v in CANARIES.items():
        monkeypatch.setenv(k, v)
    data = write_jsonl(tmp_path / "d.jsonl", rows(24))
    summary = run_local("peft", {"data_uri": str(data), "base_model": str(tiny_llama), "model_name": "canary",
                                 "max_steps": 2, "max_length": 64,
                                 "eval_settings": {"max_examples": 2, "max_new_tokens": 4, "forgetting": False}},
                        workdir=tmp_path)
    assert summary["version"] == "1"  # the run really went through every stage
    compile_all(tmp_path / "build")
    out, err = capfd.readouterr()

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written) and any(p.suffix == ".yaml" for p in written)
    assert any("mlruns" in p.parts or "artifacts" in p.parts for p in written)
    found = []
    for name, secret in CANARIES.items():
        needle = secret.encode()
        found += [f"{name} in {p}" for p in written if needle in p.read_bytes()]
        found += [f"{name} in {stream}" for stream, text in (("stdout", out), ("stderr", err)) if secret in text]
    assert found == [], found
    assert len(written) > 20  # scanned a real run's output, not an empty folder


def test_bundled_names_cannot_carry_a_path_past_the_roots(tmp_path, monkeypatch):
    """``bundled://`` names one shipped dataset; an absolute or relative path riding on it is refused,
    with or without data roots, while a plain path to the same file is refused by the roots check."""
    private = tmp_path / "private"
    private.mkdir()
    write_jsonl(private / "private.jsonl", rows(6))
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    pkg_data = storage.BUNDLED_DIR
    rel = os.path.relpath(private / "private", pkg_data)
    monkeypatch.setenv("KUBETUNE_DATA_ROOTS", str(allowed))
    for uri in (f"bundled://{private}/private", f"bundled://{rel}", "bundled://../data/tickets", "bundled://Tickets"):
        with pytest.raises(DataError, match="no bundled dataset"):
            storage.fetch(uri, tmp_path / "c")
        with pytest.raises(DataError, match="no bundled dataset"):
            ingest(IngestConfig(data_uri=uri), tmp_path / "out")
    with pytest.raises(DataError, match="outside the allowed data roots"):
        storage.fetch(str(private / "private.jsonl"), tmp_path / "c")
    assert storage.fetch("bundled://tickets", tmp_path / "c") == pkg_data / "tickets.jsonl"
    monkeypatch.delenv("KUBETUNE_DATA_ROOTS")
    with pytest.raises(DataError, match="no bundled dataset"):
        storage.fetch(f"bundled://{rel}", tmp_path / "c")
    assert not (tmp_path / "out").exists()


def _untrusted_base(tiny_llama: Path, folder: Path) -> Path:
    """The tiny Llama as an untrusted checkpoint: pickle weights only, and code of its own (auto_map)."""
    _copy_model(tiny_llama, folder)
    model = models.load_causal_lm(str(folder))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_local.LocalLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_local.py").write_text("from transformers import LlamaForCausalLM\n\n\n"
                                              "class LocalLlamaForCausalLM(LlamaForCausalLM):\n    pass\n")
    return folder


def test_every_loader_applies_the_gates(tiny_llama, tmp_path):
    """The loader QLoRA and evaluate's candidates go through refuses what load_causal_lm refuses."""
    from kubetune.core.peft_methods import load_base_model

    folder = _untrusted_base(tiny_llama, tmp_path / "untrusted")
    with pytest.raises(StageError, match="trust_remote_code=true"):
        load_base_model(str(folder), "lora")
    with pytest.raises(StageError, match="allow_pickle=true"):
        load_base_model(str(folder), "lora", trust_remote_code=True)
    model = load_base_model(str(folder), "lora", trust_remote_code=True, allow_pickle=True)
    assert type(model).__name__ == "LocalLlamaForCausalLM"  # its own code ran, because we opted in
    assert models.LoadPolicy.from_settings({"allow_pickle": True, "batch_size": 2}) == models.LoadPolicy(
        allow_pickle=True)


def test_one_loading_policy_from_train_settings_reaches_every_step(tiny_llama, mlflow_uri, tmp_path, monkeypatch):
    """One pipeline run on an untrusted base with both opt-ins in train_settings: tokenize (the
    tokenizer), train, and evaluate (base and candidate) all load it; the run registers a version."""
    from kubetune.ops.runner import run_local

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # where transformers copies model code
    base = _untrusted_base(tiny_llama, tmp_path / "untrusted")
    data = write_jsonl(tmp_path / "d.jsonl", rows(24))
    summary = run_local("peft", {"data_uri": str(data), "base_model": str(base), "model_name": "opted-in",
                                 "max_steps": 2, "max_length": 64,
                                 "train_settings": {"batch_size": 2, "allow_pickle": True, "trust_remote_code": True},
                                 "eval_settings": {"max_examples": 2, "max_new_tokens": 4, "forgetting": False,
                                                   "reuse_base_scores": False}},
                        workdir=tmp_path)
    assert summary["version"] == "1" and summary["base"] is not None and summary["candidate"] is not None
    assert list((tmp_path / "hf-modules").rglob("modeling_local.py"))  # the model's own code was loaded
