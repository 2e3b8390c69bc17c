"""The training core through train_peft / train_full: what trains, what stays, what is logged.
Several processes under torchrun are tests/test_launch.py's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kubetune.errors import ConfigError
from kubetune.core.scoring import load_model_artifact
from kubetune.stages.train_full import train_full
from kubetune.stages.train_peft import train_peft
from kubetune.tracking import RunContext
from kubetune.core.train import COMPLETE_MARKER, TrainConfig, last_complete_checkpoint


def _state(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_lora_trains_adapters_only_and_reloads(tiny_llama, tiny_tickets, tmp_path, mlflow_uri):
    import mlflow

    _, tok_dir = tiny_tickets
    cfg = TrainConfig(base_model=str(tiny_llama), method="lora", max_steps=12, learning_rate=3e-3, batch_size=2,
                      save_steps=5, lora_rank=4)
    result = train_peft(cfg, tok_dir, tmp_path / "model", tmp_path / "ws", ctx=RunContext("t", "run-1", "peft"))
    m = result.metrics
    assert m["train_loss_last"] < m["train_loss_first"] - 0.05, m
    assert m["steps"] == 12 and m["tokens_per_s"] > 0 and m["peak_memory_gb"] > 0
    # tokens counted on the batches trained on: 12 steps x 2 rows, non-padding, rows <= 512
    assert 12 * 2 * 50 < m["tokens"] <= 12 * 2 * 512
    assert 0 < m["trainable_share"] < 0.5
    # the adapter alone is saved (no base weights), and it moved away from LoRA's zero init
    adapter = load_file(tmp_path / "model" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    manifest = json.loads((tmp_path / "model" / "kubetune_method.json").read_text())
    assert manifest["method"] == "lora" and manifest["base_model"] == str(tiny_llama)
    # base weights untouched on disk; the reloaded adapter changes the model's outputs
    model = load_model_artifact(tmp_path / "model")
    base_after = _state(tiny_llama)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_after[k])
    x = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base(x).logits, atol=1e-4)
        out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 9
    # checkpoints are gone after success; metrics reached MLflow under the stage's child run
    assert not any((tmp_path / "ws" / "checkpoints").glob("*/checkpoint-*"))
    run = mlflow.search_runs(experiment_names=["kubetune/t"], filter_string="tags.`kubetune.stage` = 'train-peft'",
                             output_format="list")[0]
    client = mlflow.tracking.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 12
    assert len(client.get_metric_history(run.info.run_id, "tokens_per_s")) >= 12  # per step, and at the end
    for key in ("tokens_per_s", "peak_memory_gb", "trainable_params", "trainable_share"):
        assert key in run.data.metrics
    assert run.data.params["kubetune.method"] == "lora"
    assert run.data.params["kubetune.train_path"] == "trainer"  # the CPU: the reason is logged with it
    assert "no CUDA device" in run.data.params["kubetune.train_path_reason"]
    assert run.data.tags["mlflow.parentRunId"]


def test_full_trains_every_weight(tiny_llama, tiny_tickets, tmp_path):
    _, tok_dir = tiny_tickets
    before = _state(tiny_llama)
    cfg = TrainConfig(base_model=str(tiny_llama), max_steps=4, learning_rate=1e-3, batch_size=2)
    result = train_full(cfg, tok_dir, tmp_path / "model", tmp_path / "ws")
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert result.metrics["trainable_share"] == 1.0
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) == len(after), set(after) - set(changed)


def test_train_peft_refuses_full_and_config_errors_name_the_key(tiny_llama):
    with pytest.raises(ConfigError, match="train_full"):
        train_peft(TrainConfig(method="full"), "x", "y", "z")
    with pytest.raises(ConfigError, match=r"'max_steps' \(0\) or 'epochs' \(0.0\) must be > 0"):
        TrainConfig(max_steps=0, epochs=0.0)
    from kubetune.core.config import from_dict

    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr'\]"):
        from_dict(TrainConfig, {"lr": 1e-4}, "train_settings")
    with pytest.raises(ConfigError, match="'batch_size' must be an integer"):
        from_dict(TrainConfig, {"batch_size": "four"}, "train_settings")


def test_only_complete_checkpoints_are_resumed(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / COMPLETE_MARKER).write_text(str(step))
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_epochs_set_the_steps_and_early_stopping_keeps_the_best_evaluation(tiny_llama, tiny_tickets, tmp_path):
    """max_steps=0 + epochs: the step count follows the data; evaluation during training with
    best_checkpoint + early stopping ends with the weights of the lowest validation loss seen."""
    import datasets

    from kubetune.core.scoring import validation_loss

    _, tok_dir = tiny_tickets
    data = datasets.load_from_disk(str(tok_dir))
    n_train = len(data["train"])
    per_epoch = math.ceil(n_train / 2)
    assert TrainConfig(max_steps=0, epochs=1.5, batch_size=2, min_steps=1, step_cap=0).steps_for(n_train) == \
        math.ceil(1.5 * per_epoch)
    # lr 1.0 on LoRA overshoots: validation loss gets worse after the first evaluations, so the run stops early
    cfg = TrainConfig(base_model=str(tiny_llama), method="lora", max_steps=0, epochs=3, learning_rate=1.0,
                      batch_size=2, lora_rank=4, eval_steps=2, best_checkpoint=True, early_stopping_patience=1,
                      warmup_ratio=0.0)
    m = train_peft(cfg, tok_dir, tmp_path / "model", tmp_path / "ws").metrics
    planned = cfg.steps_for(n_train)
    assert m["evaluations"] >= 2 and m["stopped_early"] == 1 and m["steps"] < planned, m
    assert m["eval_loss_best"] < m["eval_loss_last"]
    model = load_model_artifact(tmp_path / "model")
    saved = validation_loss(model, list(data["validation"]), 0, 2)
    assert saved == pytest.approx(m["eval_loss_best"], rel=1e-3), (saved, m)


def test_default_length_follows_the_data():
    """max_steps 0 (the default): one pass over the training rows, kept within [min_steps, step_cap]."""
    from dataclasses import replace

    cfg = TrainConfig(batch_size=2)  # the pipelines' batch: 2 rows per step
    assert cfg.max_steps == 0
    assert cfg.steps_for(216) == 60  # the bundled tickets: 108 steps an epoch, capped
    assert cfg.steps_for(100) == 50  # a few hundred short examples packed into 100 rows: one epoch
    assert cfg.steps_for(101) == 51  # a last partial batch is a step
    assert cfg.steps_for(100, world=2) == 25  # each step takes 2 rows per process
    assert cfg.steps_for(10) == 20  # tiny data: the minimum, repeated
    assert cfg.steps_for(100_000) == 60  # huge data: the cap
    assert replace(cfg, step_cap=0).steps_for(100_000) == 50_000
    assert replace(cfg, epochs=0.5).steps_for(100) == 25
    assert replace(cfg, max_steps=7).steps_for(100_000) == 7  # steps asked for by name are taken as they are
    assert cfg.eval_every(60) == 15 and cfg.eval_every(21) == 6
    assert replace(cfg, eval_steps=7).eval_every(60) == 7


def test_pipeline_defaults_train_by_the_data_and_keep_the_best_evaluation(tiny_llama, tiny_tickets, tmp_path):
    """The peft pipeline's default parameters, turned into a config as its train step does: the
    step count comes from the data, and the validation loss is evaluated during training with the
    best evaluation's weights saved."""
    import datasets

    from kubetune.core.config import from_dict
    from kubetune.ops.runner import get_pipeline, parameters
    from kubetune.stages.evaluate import validation_loss

    _, tok_dir = tiny_tickets
    data = datasets.load_from_disk(str(tok_dir))
    params = {k: v.default for k, v in parameters(get_pipeline("peft")).items()}
    cfg = from_dict(TrainConfig, {**params["train_settings"], "base_model": str(tiny_llama), "method": params["method"],
                                  "max_steps": params["max_steps"], "learning_rate": params["learning_rate"],
                                  "lora_rank": params["lora_rank"]}, "peft defaults")
    planned = cfg.steps_for(len(data["train"]))
    assert params["max_steps"] == 0 and planned == cfg.min_steps  # 48 tiny tickets: the minimum
    m = train_peft(cfg, tok_dir, tmp_path / "model", tmp_path / "ws").metrics
    assert m["evaluations"] >= 3 and m["steps"] <= planned, m  # 4 planned; early stopping may end it at 3
    assert m["eval_loss_best"] <= m["eval_loss_last"]
    manifest = json.loads((tmp_path / "model" / "kubetune_method.json").read_text())["train"]
    assert manifest["max_steps"] == planned and manifest["eval_steps"] == math.ceil(planned / 4)
    assert manifest["best_checkpoint"] and manifest["early_stopping_patience"] > 0
    saved = validation_loss(load_model_artifact(tmp_path / "model"), list(data["validation"]), 0, 2)
    assert saved == pytest.approx(m["eval_loss_best"], rel=1e-3), (saved, m)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_steps=0, epochs=0), "epochs"), (dict(evaluations=0), "eval_steps"),
    (dict(eval_steps=5, best_checkpoint=False), "best_checkpoint"), (dict(eval_steps=-1), "eval_steps"),
    (dict(min_steps=0), "min_steps"), (dict(min_steps=30, step_cap=20), "step_cap")])
def test_training_length_and_evaluation_settings_are_checked(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kwargs)
