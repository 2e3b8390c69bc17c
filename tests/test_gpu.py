"""On a CUDA machine the pipelines' training stages take the GPU fast path (and QLoRA trains).

Run on the GPU machine: python -m pytest -m gpu tests/test_gpu.py tests/test_peft_methods.py
"""

from __future__ import annotations

import pytest
import torch

from kubetune.core.scoring import load_model_artifact
from kubetune.stages.train_full import train_full
from kubetune.stages.train_peft import train_peft
from kubetune.core.train import TrainConfig

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


def _llama8b_layers(n_layers=2, lora=False):
    """Two decoder layers of the Llama-3.1-8B shape (width, heads, MLP, vocabulary, untied head), bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=n_layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    return model


def _rows(n=400, vocab=128256):
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for k in np.clip(rng.lognormal(np.log(260), 0.8, n).astype(int), 16, 2048):
        motif = rng.integers(2, vocab, 8).tolist()
        ids = (motif * (k // 8 + 1))[:k]  # learnable: the loss falls within a few steps
        rows.append({"input_ids": ids, "labels": ids, "position_ids": list(range(k))})
    return rows


class _Crash(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True])
def test_fast_path_resumes_after_a_crash_on_gpu(tmp_path, lora):
    from kubetune.core.fastpath import fast_train, last_checkpoint

    kw = dict(max_steps=8, lr=1e-4 if lora else 1e-5, warmup_steps=2, lr_scheduler="cosine", tokens_per_step=4096)
    whole = fast_train(_llama8b_layers(lora=lora), _rows(), **kw)["losses"]

    def crash(step, *_):
        if step == 6:
            raise _Crash

    with pytest.raises(_Crash):
        fast_train(_llama8b_layers(lora=lora), _rows(), checkpoint_dir=tmp_path, save_steps=3, on_step=crash, **kw)
    assert last_checkpoint(tmp_path).name == "fast-checkpoint-6"
    resumed = fast_train(_llama8b_layers(lora=lora), _rows(), checkpoint_dir=tmp_path, save_steps=3, **kw)
    assert resumed["resumed_from"] == 6
    assert resumed["losses"][-1] == pytest.approx(whole[-1], rel=1e-2)
    assert whole[-1] < whole[0]


def test_activation_checkpointing_and_8bit_adamw_save_memory_on_gpu():
    pytest.importorskip("bitsandbytes")
    from kubetune.core.fastpath import fast_train

    peaks = {}
    for name, kw in {"plain": {}, "recompute": {"activation_checkpointing": True},
                     "8bit": {"optimizer": "adamw_8bit"}}.items():
        model = _llama8b_layers(n_layers=4)
        out = fast_train(model, _rows(), max_steps=3, lr=1e-5, tokens_per_step=8192, timing_warmup=1, **kw)
        assert all(l == l for l in out["losses"]), (name, out["losses"])  # no NaN
        peaks[name] = out["peak_mem_gib"]
        del model
        torch.cuda.empty_cache()
    print("peak GiB", peaks)
    assert peaks["recompute"] < peaks["plain"] - 1.0
    assert peaks["8bit"] < peaks["plain"] - 1.0
