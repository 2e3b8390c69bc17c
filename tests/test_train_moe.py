"""Stage `train_moe` and pipeline `moe`: what trains, the balance loss, reports, reload, registry."""

from __future__ import annotations

import json

import pytest
import torch

from kubetune.experimental import moe
from kubetune.errors import ConfigError
from kubetune.stages.train_moe import moe_config_from_dict, train_moe
from kubetune.tracking import RunContext


def _dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _reload(path):
    """The saved model through plain transformers: no kubetune code, no custom classes."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _is_moe_param(name: str) -> bool:
    return ".mlp.gate." in name or ".mlp.experts." in name


# ------------------------------------------------------------------ settings


def test_settings_are_one_flat_mapping_and_fail_by_name():
    cfg = moe_config_from_dict({"num_experts": 8, "kind": "lora", "max_steps": 7, "batch_size": 2})
    assert (cfg.num_experts, cfg.kind, cfg.train.max_steps, cfg.train.batch_size) == (8, "lora", 7, 2)
    assert cfg.train.save_steps == 100  # the stage's own default for the core, still a setting
    assert "train" not in cfg.moe_settings() and cfg.moe_settings()["num_experts"] == 8

    for values, key in [({"top_k": 1}, "'top_k'"), ({"num_experts": 1}, "'num_experts'"),
                        ({"kind": "mixture"}, "'kind'"), ({"max_steps": -1}, "'max_steps'"),
                        ({"router_aux_loss_coef": -1.0}, "'router_aux_loss_coef'"),
                        ({"num_expert": 4}, "unknown key(s) ['num_expert']"),
                        ({"method": "lora"}, "'method' is not a train_moe setting"),
                        ({"noise_std": "big"}, "'noise_std' must be a number")]:
        with pytest.raises(ConfigError) as err:
            moe_config_from_dict(values)
        assert key in str(err.value), (values, str(err.value))


def test_unsupported_family_fails_clearly(tmp_path, tiny_tickets):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=600, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    cfg = moe_config_from_dict({"base_model": str(tmp_path / "gpt2"), "max_steps": 1})
    with pytest.raises(ConfigError, match="gpt2.*supported families are llama"):
        train_moe(cfg, tiny_tickets[1], tmp_path / "out", tmp_path / "ws")


# ------------------------------------------------------------------ the stage


def test_experts_and_routers_train_the_rest_stays_and_it_is_reported(tiny_llama, tiny_tickets, tmp_path,
                                                                       mlflow_uri):
    import mlflow

    steps = 6
    cfg = moe_config_from_dict({"base_model": str(tiny_llama), "every_k_layers": 1, "max_steps": steps,
                                "learning_rate": 1e-2, "batch_size": 2, "router_z_loss_coef": 1e-3})
    result = train_moe(cfg, tiny_tickets[1], tmp_path / "model", tmp_path / "ws", ctx=RunContext("t", "run-1", "moe"))
    m = result.metrics

    # What changed is exactly the experts and the routers: compare with the same upcycling (same seed).
    dense = _dense(tiny_llama)
    start = moe.upcycle(dense, num_experts=4, top_k=2, every_k_layers=1, noise_std=cfg.noise_std, seed=0)
    start = start.state_dict()
    reloaded = _reload(tmp_path / "model")
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    assert reloaded.config.output_router_logits is False  # evaluate's loss is the plain LM loss
    end = reloaded.state_dict()
    assert set(end) == set(start)
    changed = {k for k in end if not torch.equal(end[k], start[k])}
    assert changed == {k for k in end if _is_moe_param(k)}, changed
    assert any(".mlp.gate." in k for k in changed)
    with torch.no_grad():
        out = reloaded.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 7

    # Total vs active parameters per token: E=4 experts, top-2, on both layers of the tiny Llama.
    c = dense.config
    dense_total = sum(p.numel() for p in dense.parameters())
    mlp, router = 3 * c.hidden_size * c.intermediate_size, 4 * c.hidden_size
    assert m["moe_total_params"] == dense_total + 2 * (3 * mlp + router)
    assert m["moe_active_params"] == dense_total + 2 * (mlp + router)
    assert m["train_loss_last"] < m["train_loss_first"], m

    manifest = json.loads((tmp_path / "model" / "kubetune_method.json").read_text())
    assert manifest["method"] == "moe" and manifest["settings"]["num_experts"] == 4
    assert manifest["base_model"] == str(tiny_llama)
    util = json.loads((tmp_path / "model" / "expert_utilisation.json").read_text())["utilisation"]
    assert sorted(util) == ["0", "1"]
    assert all(len(s) == 4 and abs(sum(s) - 1) < 1e-9 and max(s) < 1 for s in util.values()), util

    # MLflow: the balance and z losses per step, the numbers and the heatmap in the stage's run.
    run = mlflow.search_runs(experiment_names=["kubetune/t"], filter_string="tags.`kubetune.stage` = 'train-moe'",
                             output_format="list")[0]
    client = mlflow.tracking.MlflowClient()
    balance = client.get_metric_history(run.info.run_id, "load_balance_loss")
    assert [h.step for h in balance] == list(range(1, steps + 1)) and all(h.value > 0 for h in balance)
    assert len(client.get_metric_history(run.info.run_id, "router_z_loss")) == steps
    assert run.data.metrics["moe_active_params"] == m["moe_active_params"]
    assert run.data.metrics["expert_share.layer_1.expert_3"] == pytest.approx(util["1"][3])
    assert run.data.tags["kubetune.method"] == "moe"
    assert "expert_utilisation.png" in [a.path for a in client.list_artifacts(run.info.run_id)]


def _router_change(tiny_llama, tiny_tickets, tmp_path, aux_coef):
    """Max change of any router weight after one plain-SGD step with identical experts."""
    cfg = moe_config_from_dict({"base_model": str(tiny_llama), "every_k_layers": 1, "noise_std": 0.0,
                                "router_aux_loss_coef": aux_coef, "router_z_loss_coef": 0.0, "max_steps": 1,
                                "warmup_ratio": 0.0, "optimizer": "sgd", "learning_rate": 0.5})
    out = tmp_path / f"aux-{aux_coef}"
    train_moe(cfg, tiny_tickets[1], out, tmp_path / "ws")
    start = moe.upcycle(_dense(tiny_llama), noise_std=0.0, seed=0).state_dict()
    end = _reload(out).state_dict()
    return max((end[k] - start[k]).abs().max().item() for k in end if ".mlp.gate." in k)


def test_load_balancing_loss_is_in_the_optimized_loss(tiny_llama, tiny_tickets, tmp_path):
    # Identical experts + renormalised top-k weights: the LM loss gives the router no gradient
    # (kubetune.experimental.moe's docstring), so in the first step only the balance loss can move it.
    assert _router_change(tiny_llama, tiny_tickets, tmp_path, aux_coef=0.0) < 1e-7
    assert _router_change(tiny_llama, tiny_tickets, tmp_path, aux_coef=1.0) > 1e-5


def test_lora_experts_on_every_other_layer_save_as_a_native_moe(tiny_llama, tiny_tickets, tmp_path):
    cfg = moe_config_from_dict({"base_model": str(tiny_llama), "kind": "lora", "every_k_layers": 2,
                                "max_steps": 4, "learning_rate": 1e-2, "batch_size": 2})
    result = train_moe(cfg, tiny_tickets[1], tmp_path / "model", tmp_path / "ws")
    dense = _dense(tiny_llama).state_dict()
    reloaded = _reload(tmp_path / "model")
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    end = reloaded.state_dict()
    assert not any("lora" in k or "base_" in k for k in end), "LoRA experts are merged before saving"
    # layer 0 stays a dense MLP, untouched; layer 1's experts moved away from the dense copy
    for proj in ("gate_proj", "up_proj", "down_proj"):
        key = f"model.layers.0.mlp.{proj}.weight"
        assert torch.equal(end[key], dense[key])
    dense_gate_up = torch.cat([dense["model.layers.1.mlp.gate_proj.weight"], dense["model.layers.1.mlp.up_proj.weight"]])
    experts = end["model.layers.1.mlp.experts.gate_up_proj"]
    assert experts.shape[0] == 4
    assert all(not torch.allclose(experts[e], dense_gate_up) for e in range(4))
    for k, v in dense.items():
        if ".mlp." not in k:
            assert torch.equal(end[k], v), k
    # only the LoRA factors and the gate trained; the active count skips 2 of 4 merged experts
    assert result.metrics["trainable_params"] < 0.2 * result.metrics["total_params"]
    assert result.metrics["moe_active_params"] < result.metrics["moe_total_params"]
    with torch.no_grad():
        assert reloaded.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=3, do_sample=False).shape[1] == 6


# ------------------------------------------------------------------ the pipeline


def test_moe_pipeline_runs_locally_and_registers_a_plain_transformers_model(tiny_llama, tmp_path, mlflow_uri):
    from kubetune import tracking
    from kubetune.ops.runner import run_local
    from kubetune.lib.storage import bundled

    data = tmp_path / "tickets.jsonl"
    data.write_text("\n".join(bundled("bundled://tickets").read_text().splitlines()[:60]) + "\n")
    summary = run_local("moe", {"base_model": str(tiny_llama), "data_uri": str(data), "model_name": "tiny-moe",
                                "max_steps": 4, "learning_rate": 1e-2, "max_length": 512,
                                "train_settings": {"batch_size": 2},
                                "eval_settings": {"primary_metric": "val_loss"}},
                        workdir=tmp_path)
    assert summary["version"] == "1" and "challenger" in summary["aliases"]
    assert summary["base"] is not None and summary["candidate"] is not None

    path = tracking.download_version("tiny-moe", "1", tmp_path / "dl")
    model = _reload(path)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"  # default every_k_layers=2 on a 2-layer model
    assert json.loads((path / "kubetune_method.json").read_text())["method"] == "moe"
    assert (path / "expert_utilisation.json").exists()
    with torch.no_grad():
        assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape[1] == 6


def test_moe_public_surface_is_a_decision(tmp_path):
    """Adding a pipeline parameter changes the user's API: update this snapshot on purpose."""
    import yaml

    from kubetune.ops.runner import compile_all, get_pipeline, parameters

    params = {k: v.default for k, v in parameters(get_pipeline("moe")).items()}
    assert params == {
        "base_model": "smollm2-135m-instruct", "data_uri": "bundled://tickets", "num_experts": 4, "top_k": 2,
        "kind": "experts", "max_steps": 30, "learning_rate": 0.0, "max_length": 256, "model_name": "tickets-moe",
        "max_forgetting": -1.0, "train_settings": {}, "eval_settings": {}, "register_settings": {}, "force": False,
        "deploy": False,
    }
    (path,) = compile_all(tmp_path, names=["moe"])
    spec = yaml.safe_load(path.read_text())
    assert "comp-train-moe" in spec["components"]
