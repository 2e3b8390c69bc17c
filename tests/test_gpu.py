"""On a CUDA machine the pipelines' training stages take the GPU fast path (and QLoRA trains).

Run on the GPU machine: python -m pytest -m gpu tests/test_gpu.py tests/test_peft_methods.py
"""

from __future__ import annotations

import pytest
import torch

from kubetune.stages.evaluate import load_model_artifact
from kubetune.stages.train_full import train_full
from kubetune.stages.train_peft import train_peft
from kubetune.train import TrainConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_stage_takes_the_fast_path_on_gpu(tiny_llama, tiny_tickets, tmp_path, method, monkeypatch):
    monkeypatch.setenv("KUBETUNE_NPROC_PER_NODE", "1")  # one GPU; more would re-run under torchrun
    _, tok_dir = tiny_tickets
    cfg = TrainConfig(base_model=str(tiny_llama), method=method, max_steps=20, learning_rate=3e-3, batch_size=4)
    stage = train_full if method == "full" else train_peft
    m = stage(cfg, tok_dir, tmp_path / "model", tmp_path / "ws").metrics
    assert m["fast_path"] == 1, m
    assert m["train_loss_last"] < m["train_loss_first"] - 0.05, m
    assert m["tokens_per_s"] > 0 and m["peak_memory_gb"] > 0
    model = load_model_artifact(tmp_path / "model")
    x = torch.tensor([[5, 17, 42, 99]], device=next(model.parameters()).device)
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape[1] == 7


def test_qlora_trains_through_the_stage(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("KUBETUNE_NPROC_PER_NODE", "1")
    _, tok_dir = tiny_tickets
    cfg = TrainConfig(base_model=str(tiny_llama), method="qlora", max_steps=15, learning_rate=3e-3, batch_size=4)
    m = train_peft(cfg, tok_dir, tmp_path / "model", tmp_path / "ws").metrics
    assert m["fast_path"] == 0  # 4-bit matmuls stay on bitsandbytes' own path
    assert m["train_loss_last"] < m["train_loss_first"], m
    assert (tmp_path / "model" / "adapter_model.safetensors").exists()
