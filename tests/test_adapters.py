"""Our bottleneck adapters: identity at start, only adapters train, save/load round trip,
generation, and clear failures for layouts and checkpoints they do not fit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from kubetune.core.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    add_adapters,
    adapter_state_dict,
    load_adapters,
    save_adapters,
)

LAYERS = 2  # the tiny_llama fixture's depth


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _ids() -> torch.Tensor:
    return torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_ids()).logits


@torch.no_grad()
def _generate(model) -> torch.Tensor:
    return model.generate(input_ids=_ids()[:1, :6], max_new_tokens=8, do_sample=False)


def _train(model, steps: int = 5) -> None:
    ids = _ids()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_zero_initialised_adapters_leave_the_model_unchanged(tiny_llama):
    base = _load(tiny_llama)
    adapted = add_adapters(_load(tiny_llama), AdapterConfig(bottleneck_size=8)).eval()
    assert torch.equal(_logits(adapted), _logits(base))
    assert torch.equal(_generate(adapted), _generate(base))

    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(adapted))
    assert len(trainable) == 2 * 2 * 2 * LAYERS  # (attn, mlp) x (down, up) x (weight, bias) per layer
    assert all("_adapter." in n for n in trainable)
    # The adapters are really in the forward path: a non-zero up-projection changes logits.
    with torch.no_grad():
        adapted.model.layers[0].mlp_adapter.up.weight.fill_(0.1)
    assert not torch.allclose(_logits(adapted), _logits(base), atol=1e-4)


def test_training_changes_only_adapters_and_reload_reproduces_outputs(tiny_llama, tmp_path):
    base_logits = _logits(_load(tiny_llama))
    model = add_adapters(_load(tiny_llama), AdapterConfig(bottleneck_size=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != param.requires_grad, name
    tuned_logits, tuned_tokens = _logits(model), _generate(model)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)

    out = save_adapters(model, tmp_path / "adapters")
    saved = load_file(out / WEIGHTS_NAME)
    assert set(saved) == set(adapter_state_dict(model))  # adapters only, no base weights
    config = json.loads((out / CONFIG_NAME).read_text())
    assert (config["bottleneck_size"], config["hidden_size"], config["num_layers"]) == (8, 64, LAYERS)

    reloaded = load_adapters(_load(tiny_llama), out).eval()
    assert torch.equal(_logits(reloaded), tuned_logits)
    assert torch.equal(_generate(reloaded), tuned_tokens)


def test_placement_limits_where_adapters_go(tiny_llama):
    model = add_adapters(_load(tiny_llama), AdapterConfig(bottleneck_size=4, placement=["mlp"]))
    names = set(adapter_state_dict(model))
    assert len(names) == 2 * 2 * LAYERS and all(".mlp_adapter." in n for n in names)


def test_half_precision_base_keeps_float32_adapters(tiny_llama):
    base = _load(tiny_llama, torch.bfloat16)
    model = add_adapters(_load(tiny_llama, torch.bfloat16), AdapterConfig(bottleneck_size=4))
    assert {p.dtype for p in adapter_state_dict(model).values()} == {torch.float32}
    assert _logits(model).dtype == torch.bfloat16
    assert torch.equal(_logits(model), _logits(base))


def test_deepcopy_rebinds_hooks_to_the_copy(tiny_llama):
    model = add_adapters(_load(tiny_llama), AdapterConfig(bottleneck_size=4)).eval()
    original = _logits(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[1].attn_adapter.up.weight.fill_(0.1)
    assert torch.equal(_logits(model), original)
    assert not torch.allclose(_logits(twin), original, atol=1e-4)


def test_unknown_layout_fails_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="`self_attn` and `mlp`.*GPT2LMHeadModel"):
        add_adapters(gpt2, AdapterConfig())
    assert all(p.requires_grad for p in gpt2.parameters())  # refused before freezing anything


def test_adapters_from_another_shape_are_refused(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = save_adapters(add_adapters(_load(tiny_llama), AdapterConfig(bottleneck_size=4)), tmp_path / "a")
    narrower = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="hidden_size=64"):
        load_adapters(narrower, out)
    with pytest.raises(ValueError, match="already has"):
        add_adapters(load_adapters(_load(tiny_llama), out), AdapterConfig())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"bottleneck_size": 0}, "bottleneck_size"), ({"activation": "nope"}, "activation"),
     ({"dropout": 1.5}, "dropout"), ({"placement": ["ffn"]}, "placement")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**kwargs)


def test_pfeiffer_placement_is_selectable_from_a_pipelines_train_settings(tiny_llama, tiny_tickets, tmp_path):
    """``train_settings={"adapter_placement": "pfeiffer"}`` (the peft pipeline's dict, validated by
    from_dict as the component does) trains and saves adapters after the MLP blocks only."""
    import json

    from safetensors.torch import load_file

    from kubetune.core.config import from_dict
    from kubetune.errors import ConfigError
    from kubetune.stages.train_peft import train_peft
    from kubetune.core.train import TrainConfig

    _, tok_dir = tiny_tickets
    settings = {"adapter_placement": "pfeiffer", "batch_size": 2}
    cfg = from_dict(TrainConfig, {**settings, "base_model": str(tiny_llama), "method": "adapter", "max_steps": 2,
                                  "lora_rank": 4}, "train_peft settings")
    train_peft(cfg, tok_dir, tmp_path / "model", tmp_path / "ws")
    saved = json.loads((tmp_path / "model" / "bottleneck_adapters.json").read_text())
    assert saved["placement"] == ["mlp"]
    names = list(load_file(tmp_path / "model" / "bottleneck_adapters.safetensors"))
    assert names and all("mlp_adapter" in n for n in names)
    with pytest.raises(ConfigError, match="adapter_placement"):
        from_dict(TrainConfig, {"adapter_placement": "sideways"}, "train_peft settings")
