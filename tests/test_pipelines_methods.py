"""The `full`, `instruction` and `feature-extraction` pipelines end to end through kfp.local
(one run each, tiny models), and their compilation."""

from __future__ import annotations

import json

import yaml

from kubetune.ops.runner import compile_all, run_local

EVAL = {"primary_metric": "val_loss", "max_examples": 4, "max_new_tokens": 8}


def _subset(tmp_path, name, n):
    from kubetune.lib.storage import bundled

    lines = bundled(f"bundled://{name}").read_text().splitlines()[:n]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_full_pipeline_trains_every_weight_and_registers(tiny_llama, tmp_path, mlflow_uri):
    from kubetune import tracking

    out = run_local("full", {"base_model": str(tiny_llama), "data_uri": str(_subset(tmp_path, "tickets", 40)),
                             "model_name": "tiny-full", "max_steps": 6, "learning_rate": 1e-3, "max_length": 512,
                             "eval_settings": EVAL}, workdir=tmp_path)
    assert out["version"] == "1" and out["promoted"] and set(out["aliases"]) == {"champion", "challenger"}
    assert out["candidate"] < out["base"]  # validation loss fell
    assert out["forgetting"] is not None  # general-text perplexity measured against the base
    v1 = tracking.get_alias("tiny-full", "champion")
    assert v1.tags["kubetune.method"] == "full" and v1.tags["kubetune.pipeline"] == "full"


def test_instruction_pipeline_prompt_tuning_on_multi_turn_chat(tiny_llama, tmp_path, mlflow_uri):
    """Prompt tuning cannot train on packed rows: the pipeline derives packing=false from the method."""
    from kubetune import tracking

    out = run_local("instruction", {"base_model": str(tiny_llama), "data_uri": str(_subset(tmp_path, "chat", 40)),
                                    "method": "prompt", "model_name": "tiny-chat", "max_steps": 4,
                                    "eval_settings": {**EVAL, "primary_metric": "exact_match"}}, workdir=tmp_path)
    assert out["version"] == "1" and out["primary_metric"] == "exact_match"
    # A first version becomes champion only by beating the base (4 steps on a tiny model may tie it).
    assert out["promoted"] == (out["candidate"] > out["base"]), out
    v1 = tracking.get_alias("tiny-chat", "challenger")
    assert v1.tags["kubetune.method"] == "prompt" and v1.tags["kubetune.pipeline"] == "instruction"
    assert "eval.rouge_l" in v1.tags and "eval.general_perplexity" in v1.tags


def test_feature_extraction_pipeline_registers_a_text_classifier(tiny_llama, tmp_path, mlflow_uri):
    import mlflow.pyfunc

    data = _subset(tmp_path, "reviews", 90)
    out = run_local("feature-extraction", {"base_model": str(tiny_llama), "data_uri": str(data), "pooling": "last",
                                           "head": "mlp", "model_name": "tiny-fe"}, workdir=tmp_path)
    assert out["version"] == "1" and out["promoted"] and out["primary_metric"] == "macro_f1"
    assert out["forgetting"] == 0.0
    labels = mlflow.pyfunc.load_model("models:/tiny-fe@champion").predict(["Great lamp!", "Awful tent.", "A mug."])
    assert len(labels) == 3 and set(labels) <= {"negative", "neutral", "positive"}


def test_method_pipelines_compile_with_a_gpu_profile(tmp_path):
    from kubetune.pipelines import PIPELINES

    assert {"full", "peft", "instruction", "feature-extraction"} <= set(PIPELINES)
    paths = compile_all(tmp_path, "profiles/h200x2.yaml", names=["full", "instruction", "feature-extraction", "peft"])
    specs = {p.stem: next(yaml.safe_load_all(p.read_text())) for p in paths}  # pipeline spec, then platform
    comps = {name: set(spec["components"]) for name, spec in specs.items()}
    assert {"comp-train-full", "comp-train-peft"} <= comps["instruction"]
    # tokenize_data decides packing from the method (prompt/prefix tuning cannot train on packed rows)
    for name in ("instruction", "peft"):
        tokenizers = [t for c in specs[name]["components"].values() for t in c.get("dag", {}).get("tasks", {}).values()
                      if t["componentRef"]["name"].startswith("comp-tokenize-data")]
        methods = [t["inputs"]["parameters"].get("method", {}).get("componentInputParameter") for t in tokenizers]
        assert "pipelinechannel--method" in methods, (name, methods)
    assert {"comp-embed", "comp-train-head", "comp-evaluate-head", "comp-register"} <= comps["feature-extraction"]
    # the embed pass (the backbone) asks for the GPU; the head trains on the CPU
    executors = specs["feature-extraction"]["deploymentSpec"]["executors"]
    assert "nvidia.com/gpu" in json.dumps(executors["exec-embed"]["container"]["resources"])
    assert "nvidia.com/gpu" not in json.dumps(executors["exec-train-head"]["container"]["resources"])
