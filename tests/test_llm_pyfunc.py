"""Registered LLM versions are MLflow models: pyfunc load by alias, LoggedModel lineage, real `mlflow models serve`."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch

PROMPT = "my router is broken, please help"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def talking_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with an output layer of its own.

    With tied embeddings the random model repeats the prompt's last token (a newline) and every
    answer strips to '', which would make any two models look alike.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, tie_word_embeddings=False)
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("talking-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def _trained(kind: str, tiny_llama: Path, out: Path) -> Path:
    """A folder shaped like the training stage's output for ``kind`` (untrained weights will do)."""
    from transformers import AutoTokenizer

    from kubetune.core.peft_methods import PeftSettings, apply_method, load_base_model, save_trained

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    if kind == "moe":
        from kubetune.experimental import moe

        model = moe.upcycle(str(tiny_llama), num_experts=2, top_k=2)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "kubetune_method.json").write_text(json.dumps({"method": "moe", "base_model": str(tiny_llama)}))
        return out
    if kind == "dpo":  # DPO and PPO policies are merged, plain causal LMs
        load_base_model(tiny_llama).save_pretrained(out)
        tok.save_pretrained(out)
        (out / "kubetune_method.json").write_text(json.dumps({"method": "dpo", "base_model": str(tiny_llama)}))
        return out
    model = apply_method(load_base_model(tiny_llama), kind, PeftSettings(num_virtual_tokens=4), tokenizer=tok)
    with torch.no_grad():  # "trained": adapters that change the answers (LoRA starts as a no-op)
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    save_trained(model, out, tokenizer=tok)
    manifest = json.loads((out / "kubetune_method.json").read_text())
    (out / "kubetune_method.json").write_text(json.dumps({**manifest, "base_model": str(tiny_llama)}))
    return out


def _register(name: str, folder: Path) -> str:
    import mlflow

    from kubetune import tracking
    from kubetune.serving.llm_pyfunc import log_version

    mlflow.set_experiment(name)  # this test's own store: no experiment id left over from another test
    with mlflow.start_run(run_name="register") as run:
        mv = log_version(name, folder, {"kubetune.method": "x"}, description="d", card=f"# {name} card\n")
    tracking.move_alias(name, tracking.CHAMPION, str(mv.version), expected_current=None)
    return run.info.run_id


def _expected(folder: Path) -> list[str]:
    """What evaluate's own load + generate answer: the served model must answer the same."""
    from kubetune.serving.llm_pyfunc import _tokenizer
    from kubetune.core.scoring import generate, load_model_artifact

    return generate(load_model_artifact(folder), _tokenizer(folder), [[{"role": "user", "content": PROMPT}]],
                    NEW_TOKENS, 1)


@pytest.mark.parametrize("kind", ["lora", "prompt", "prefix", "ia3", "adapter", "full", "moe", "dpo"])
def test_champion_loads_as_pyfunc_and_answers(kind, talking_llama, mlflow_uri, tmp_path):
    import mlflow

    tiny_llama = talking_llama
    folder = _trained(kind, Path(tiny_llama), tmp_path / "trained")
    name = f"tiny-{kind.replace('_', '-')}"
    run_id = _register(name, folder)

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answers = model.predict([PROMPT], params={"max_new_tokens": NEW_TOKENS})
    assert answers == _expected(folder)
    assert isinstance(answers[0], str) and answers[0].strip()
    if kind not in ("full", "moe", "dpo"):  # the adapter is applied, not just its base
        from kubetune.core.scoring import generate
        from kubetune.core.models import load_causal_lm

        assert answers != generate(load_causal_lm(str(tiny_llama)), model.unwrap_python_model().tokenizer,
                                   [[{"role": "user", "content": PROMPT}]], NEW_TOKENS, 1)
    assert model.metadata.get_input_schema().input_types() == [__import__("mlflow").types.DataType.string]

    # One LoggedModel, output of the register run and source of the version.
    mv = mlflow.MlflowClient().get_model_version(name, "1")
    model_id = mv.source.removeprefix("models:/")
    logged = mlflow.get_logged_model(model_id)
    assert logged.source_run_id == run_id and str(logged.status) == "READY" and mv.run_id == run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": name, "version": 1}]
    assert [o.model_id for o in mlflow.get_run(run_id).outputs.model_outputs] == [model_id]

    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    assert (files / "README.md").read_text() == f"# {name} card\n"
    inner = files / "artifacts" / "model"
    assert json.loads((inner / "kubetune_method.json").read_text())["base_model"] == str(tiny_llama)
    whole = kind in ("full", "moe", "dpo")
    # Adapters reference their base: no base weights travel with the version.
    assert (inner / "config.json").exists() == whole
    base_bytes = (Path(tiny_llama) / "model.safetensors").stat().st_size
    weights = sum(f.stat().st_size for f in inner.glob("*.safetensors"))
    assert (weights >= base_bytes) == whole


def test_download_version_returns_the_trained_folder(tiny_llama, mlflow_uri, tmp_path):
    from kubetune import tracking

    folder = _trained("lora", Path(tiny_llama), tmp_path / "trained")
    _register("tiny-dl", folder)
    got = tracking.download_version("tiny-dl", "1", tmp_path / "dl")
    assert {p.name for p in got.iterdir()} == {p.name for p in folder.iterdir()} | {"README.md"}


def test_mlflow_models_serve_answers_invocations(talking_llama, mlflow_uri, tmp_path):
    """The real `mlflow models serve` process on the champion, over HTTP."""
    from kubetune.serving.deploy import serve_local, stop
    from kubetune.testing import free_port, wait_http

    folder = _trained("lora", Path(talking_llama), tmp_path / "trained")
    _register("tiny-serve", folder)
    port = free_port()
    proc = serve_local("models:/tiny-serve@champion", port, tmp_path / "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=proc)
        body = json.dumps({"inputs": [PROMPT], "params": {"max_new_tokens": NEW_TOKENS}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        stop(proc)
    assert answer == {"predictions": _expected(folder)} and answer["predictions"][0].strip()
