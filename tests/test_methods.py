"""Every method through its training stage (train_full / train_peft) on the tiny Llama.

For each: exactly the intended parameters train (every frozen tensor byte-identical after
training, every trainable one moved), the loss falls, the saved artifact reloads (through
evaluate's ``load_model_artifact``) and gives the outputs the trained model gave before saving,
and the trainable-parameter count and share reach the stage's MLflow run.
"""

from __future__ import annotations

import json

import pytest
import torch

import kubetune.core.train
from kubetune.errors import StageError
from kubetune.core.scoring import load_model_artifact
from kubetune.stages.train_full import train_full
from kubetune.stages.train_peft import train_peft
from kubetune.tracking import RunContext
from kubetune.core.train import TrainConfig

# Learning rates for a random 2-layer model and 12 steps: the methods' defaults (tuned for real
# models and longer runs) would move the tiny model too little to see the loss fall reliably.
CASES = {
    "full": dict(learning_rate=1e-3),
    "lora": dict(learning_rate=3e-3),
    "dora": dict(learning_rate=3e-3),
    "adapter": dict(learning_rate=3e-3),
    "ia3": dict(learning_rate=1e-1),
    "prompt": dict(learning_rate=3e-2, num_virtual_tokens=8),
    # gradient checkpointing asked for: prefix tuning cannot use it, and it is turned off
    "prefix": dict(learning_rate=1e-1, num_virtual_tokens=8, gradient_checkpointing=True),
}


@pytest.fixture(scope="module")
def tiny_tickets_unpacked(tmp_path_factory, tiny_llama, tiny_tickets):
    """The tiny tickets tokenized without packing (prompt and prefix tuning need it)."""
    from kubetune.stages.tokenize_data import TokenizeConfig, tokenize_data

    ds, _ = tiny_tickets
    out = tmp_path_factory.mktemp("tiny-tickets-unpacked") / "tok"
    tokenize_data(TokenizeConfig(base_model=str(tiny_llama), max_length=512, packing=False), ds, out)
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_method_trains_exactly_its_parameters(method, tiny_llama, tiny_tickets, tiny_tickets_unpacked, tmp_path,
                                              mlflow_uri, monkeypatch):
    import datasets
    import mlflow

    tok_dir = tiny_tickets_unpacked if method in ("prompt", "prefix") else tiny_tickets[1]
    cfg = TrainConfig(base_model=str(tiny_llama), method=method, max_steps=12, batch_size=2, lora_rank=4,
                      save_steps=100, **CASES[method])

    # Keep the model the training core builds, and a copy of its weights before training.
    made, load = {}, kubetune.core.train.load_for_training

    def spy(c, device, tokenizer=None):
        model = load(c, device, tokenizer)
        made["model"] = model
        made["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        made["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return model

    monkeypatch.setattr(kubetune.core.train, "load_for_training", spy)
    stage = train_full if method == "full" else train_peft
    result = stage(cfg, tok_dir, tmp_path / "model", tmp_path / "ws", ctx=RunContext("m", "run-1", "test"))
    m = result.metrics

    # exactly the intended parameters trained
    model = made["model"].eval()
    after = dict(model.named_parameters())
    trainable, before = made["trainable"], made["before"]
    assert trainable, "nothing was trainable"
    frozen = set(before) - trainable
    if method == "full":
        assert not frozen and m["trainable_share"] == 1.0
    else:
        assert frozen and 0 < m["trainable_share"] < 0.5, m
    for name in frozen:
        assert torch.equal(after[name].detach(), before[name]), f"frozen {name} changed"
    unmoved = [n for n in trainable if torch.equal(after[n].detach(), before[n])]
    assert not unmoved, f"trainable tensors that did not move: {unmoved}"
    assert m["trainable_params"] == sum(before[n].numel() for n in trainable)

    # the loss fell
    assert m["train_loss_last"] < m["train_loss_first"] - 0.05, m

    # the artifact reloads and gives the outputs the trained model gave before saving
    manifest = json.loads((tmp_path / "model" / "kubetune_method.json").read_text())
    assert manifest["method"] == method and manifest["parameters"]["trainable"] == m["trainable_params"]
    rows = datasets.load_from_disk(str(tok_dir))["validation"]
    x = torch.tensor([rows[0]["input_ids"][:48]])
    reloaded = load_model_artifact(tmp_path / "model")
    with torch.no_grad():
        expected, got = model(input_ids=x).logits, reloaded(input_ids=x).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    # parameter count and share on the stage's MLflow run
    stage_name = "train-full" if method == "full" else "train-peft"
    run = mlflow.search_runs(experiment_names=["kubetune/m"], output_format="list",
                             filter_string=f"tags.`kubetune.stage` = '{stage_name}'")[0]
    assert run.data.metrics["trainable_params"] == m["trainable_params"]
    assert run.data.metrics["trainable_share"] == pytest.approx(m["trainable_share"])
    assert run.data.params["kubetune.method"] == method


def test_prompt_and_prefix_refuse_packed_rows(tiny_llama, tiny_tickets, tmp_path):
    """Virtual tokens are added once per row: packed rows would leak between examples."""
    for method in ("prompt", "prefix"):
        cfg = TrainConfig(base_model=str(tiny_llama), method=method, max_steps=2)
        with pytest.raises(StageError, match="packing=false"):
            train_peft(cfg, tiny_tickets[1], tmp_path / method, tmp_path / "ws")
        assert not (tmp_path / method).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; on a GPU qlora trains (test_gpu.py)")
def test_qlora_fails_at_config_time_without_a_gpu(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr("kubetune.core.models.load_causal_lm", lambda *a, **k: loaded.append(1))
    cfg = TrainConfig(base_model=str(tiny_llama), method="qlora", max_steps=2)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train_peft(cfg, tiny_tickets[1], tmp_path / "model", tmp_path / "ws")
    assert not loaded and not (tmp_path / "model").exists()
