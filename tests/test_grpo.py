"""GRPO: the arithmetic against hand-computed values, rewards, a policy moved by a format reward,
bad input (missing references, rewards that raise or return NaN), and the pipeline's graph."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kubetune.errors import ConfigError, StageError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: more threads only oversubscribe.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- arithmetic


def test_group_advantages_by_hand():
    from kubetune.methods.rl.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735; group 2: no spread -> 0.
    a = group_advantages(rewards, 4)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(a, torch.tensor([expected, -expected, -expected, expected, 0, 0, 0, 0]), atol=1e-6)
    # RLOO: baseline of a 1 is (1 + 0 + 0) / 3, of a 0 is (1 + 0 + 1) / 3.
    r = group_advantages(rewards, 4, "rloo", scale=False)
    assert torch.allclose(r, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_loss_by_hand():
    from kubetune.methods.rl.grpo import aggregate_loss, per_token_loss

    # old log-probs 0 and reference 0, so ρ = exp(logprob) and log(π_ref/π) = -logprob.
    ratio = torch.tensor([[1.5, 0.9], [0.7, 1.0]])
    lp, old, ref = ratio.log(), torch.zeros(2, 2), torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    tok, kl = per_token_loss(lp, old, None, adv, epsilon=0.2, beta=0.0)
    # A=+1: -min(1.5, 1.2) = -1.2, -min(0.9, 0.9) = -0.9; A=-1: -min(-0.7, -0.8) = 0.8.
    assert torch.allclose(tok[0], torch.tensor([-1.2, -0.9])) and tok[1, 0].item() == pytest.approx(0.8)
    assert aggregate_loss(tok, mask, "grpo").item() == pytest.approx(((-1.2 - 0.9) / 2 + 0.8) / 2)
    assert aggregate_loss(tok, mask, "dapo").item() == pytest.approx((-1.2 - 0.9 + 0.8) / 3)

    # k3 = r - 1 - log r with r = π_ref/π = 1/ρ, weighted by β = 0.1.
    def k3(rho):
        return 1 / rho - 1 + math.log(rho)

    tok, kl = per_token_loss(lp, old, ref, adv, epsilon=0.2, beta=0.1)
    assert kl[0, 0].item() == pytest.approx(k3(1.5), rel=1e-5) and kl[1, 0].item() == pytest.approx(k3(0.7), rel=1e-5)
    want = ((-1.2 + 0.1 * k3(1.5) - 0.9 + 0.1 * k3(0.9)) / 2 + 0.8 + 0.1 * k3(0.7)) / 2
    assert aggregate_loss(tok, mask, "grpo").item() == pytest.approx(want, rel=1e-5)
    # Micro-batches with the rollout's counts add up to the rollout's loss.
    parts = [aggregate_loss(tok[i:i + 1], mask[i:i + 1], t, n_sequences=2, n_tokens=3.0) for i in range(2)
             for t in ["grpo"]]
    assert sum(p.item() for p in parts) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- rewards


def test_reward_spec_weights_and_checks():
    from kubetune.methods.rl import rewards as R

    ref = json.dumps({"product": "phone", "issue": "billing", "priority": "low"})
    rs = R.build("json_fields:1.0,format:0.5,length:0.1", max_chars=10)
    right = ref
    half = json.dumps({"product": "phone", "issue": "account", "priority": "high"})
    total, per = rs(["p"] * 3, [right, half, "no json here"], [ref] * 3, lambda i: f"row {i}")
    assert per["json_fields"] == pytest.approx([1.0, 1 / 3, 0.0])
    assert per["format"] == [1.0, 1.0, 0.0]
    assert per["length"][0] == -1.0  # > 2 x max_chars: the penalty is capped
    assert total[0] == pytest.approx(1.0 + 0.5 - 0.1)
    assert rs.needs_reference == ["json_fields"]
    assert R.parse_spec("exact_match") == [("exact_match", 1.0)]

    with pytest.raises(ConfigError, match="unknown reward 'jsonfields'"):
        R.build("jsonfields:1")
    with pytest.raises(ConfigError, match="allow_custom_rewards"):
        R.build("kubetune.methods.rl.rewards.exact_match:1")
    custom = R.build("kubetune.methods.rl.rewards.exact_match:2", allow_custom=True)
    assert custom(["p"], [ref], [ref], str)[0] == [2.0]


def test_rewards_that_raise_or_return_nan_name_the_reward_and_row():
    from kubetune.methods.rl.rewards import RewardSet, RewardTerm

    def nan_on_third(prompts, completions, refs):
        return [float("nan") if c == "c" else 1.0 for c in completions]

    def raises_on_b(prompts, completions, refs):
        return [1 / 0 if c == "b" else 1.0 for c in completions]

    where = lambda i: f"train.jsonl line {i + 7}"  # noqa: E731
    with pytest.raises(StageError, match=r"reward 'mine' returned nan on train.jsonl line 9"):
        RewardSet([RewardTerm("mine", 1.0, nan_on_third, False)])(["p"] * 3, ["a", "b", "c"], [None] * 3, where)
    with pytest.raises(StageError, match=r"reward 'div' raised on train.jsonl line 8: ZeroDivisionError"):
        RewardSet([RewardTerm("div", 1.0, raises_on_b, False)])(["p"] * 3, ["a", "b", "c"], [None] * 3, where)


# ---------------------------------------------------------------- training on the tiny model


def _examples(n=16):
    from kubetune.methods.rl.grpo import Example

    return [Example([{"role": "user", "content": f"hello {i}"}], None, f"row {i}") for i in range(n)]


def test_a_format_reward_moves_the_policy_there(tiny_llama, tmp_path):
    """Reward completions without a space: the share of them rises from ~0.3 to ~1 in 16 steps."""
    from transformers import AutoModelForCausalLM

    from kubetune.methods.rl import rewards as R
    from kubetune.methods.rl.compare import compare_policies
    from kubetune.methods.rl.grpo import GRPOConfig, train_grpo

    no_space = R.build("format:1.0", format_pattern=r"[^ ]*")
    cfg = GRPOConfig(steps=16, prompts_per_step=4, num_generations=8, max_new_tokens=6, learning_rate=2e-2,
                     beta=0.04, lora_target_modules=["q_proj", "v_proj", "lm_head"])
    result = train_grpo(tiny_llama, _examples(), no_space, cfg, tmp_path / "grpo")
    rewards = [h["reward"] for h in result.history]
    # Before the first update policy == reference (the adapter-disabled model): KL exactly 0.
    assert abs(result.history[0]["kl"]) < 1e-6
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    assert all(math.isfinite(h["kl"]) and h["kl"] >= 0 for h in result.history)

    # Frozen base weights unchanged; the saved policy is a plain causal LM that samples the format more.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    for name, param in result.trainer.lm.named_parameters():
        if "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param.detach(), base[key]), name
    score = lambda prompts, responses: no_space(prompts, responses, [None] * len(prompts), str)[0]  # noqa: E731
    report = compare_policies(tmp_path / "grpo", tiny_llama, [f"hi {i}" for i in range(32)], score,
                              max_new_tokens=6)
    assert report["reward_policy"] > report["reward_reference"] + 0.2, report


def test_merged_generation_copy_is_the_policy(tiny_llama):
    """The sampling copy (LoRA merged into its weights) computes the trained policy's logits."""
    from kubetune.methods.rl import rewards as R
    from kubetune.methods.rl.grpo import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(steps=1, prompts_per_step=2, num_generations=4, max_new_tokens=4, learning_rate=5e-2,
                     lora_target_modules=["q_proj", "v_proj", "lm_head"])
    trainer = GRPOTrainer(tiny_llama, R.build("format:1", format_pattern=r"[^ ]*"), cfg)
    for _ in range(2):  # updates: the adapter is no longer zero
        trainer.step(_examples(2))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = trainer.lm(input_ids=ids).logits
        trainer._refresh_generation_weights()
        got = trainer.gen_lm(input_ids=ids).logits
        base = trainer.lm.get_base_model()
    assert torch.allclose(got, want, atol=1e-4)
    with torch.no_grad(), trainer.lm.disable_adapter():
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-4)


def test_precision_sets_the_weights_dtype_and_reaches_the_trainer(tiny_llama):
    """fp32 is the CPU's arithmetic (what a GPU sweep uses to stand for a CPU run); bf16 halves the weights."""
    from kubetune.methods.rl import rewards as R
    from kubetune.methods.rl.grpo import GRPOConfig, GRPOTrainer
    from kubetune.stages.grpo import GRPOConfig as StageConfig

    reward = R.build("format:1", format_pattern=r"[^ ]*")
    small = dict(steps=1, prompts_per_step=1, num_generations=2, max_new_tokens=2)
    assert GRPOTrainer(tiny_llama, reward, GRPOConfig(**small)).dtype == torch.float32  # auto on CPU
    bf16 = GRPOTrainer(tiny_llama, reward, GRPOConfig(precision="bf16", **small))
    assert bf16.dtype == torch.bfloat16
    assert bf16.lm.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    assert StageConfig(precision="fp32").trainer_settings().precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        GRPOConfig(precision="fp16")


def test_stage_refuses_prompts_without_references_and_writes_nothing(tiny_llama, tmp_path):
    from kubetune.stages.grpo import GRPOConfig, grpo
    from kubetune.stages.ingest import IngestConfig, ingest

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"text": f"ticket number {i}"}) + "\n" for i in range(20)))
    ingest(IngestConfig(data_uri=str(src)), tmp_path / "ds")
    with pytest.raises(StageError, match=r"reward 'json_fields' needs a reference answer, but .*train.jsonl line 1 "):
        grpo(GRPOConfig(), tiny_llama, tmp_path / "ds", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOConfig(num_generations=1)


def test_grpo_pipeline_compiles_with_both_branches(tmp_path):
    import yaml

    from kubetune.ops.runner import compile_all, get_pipeline, parameters

    (path,) = compile_all(tmp_path, names=["grpo"])
    text = path.read_text()
    spec = yaml.safe_load(text)
    assert spec["pipelineInfo"]["name"] == "grpo"
    for component in ("comp-grpo", "comp-train-peft", "comp-evaluate", "comp-register", "comp-tokenize-data"):
        assert component in spec["components"], component
    assert "from-sft" in text and "from-base" in text
    params = {k: v.default for k, v in parameters(get_pipeline("grpo")).items()}
    assert params["data_uri"] == "bundled://tickets" and params["rewards"] == "json_fields:1.0,format:0.2"


def test_grpo_pipeline_runs_from_sft_and_registers(tiny_llama, tmp_path, mlflow_uri):
    """One kfp.local run: SFT -> grpo -> evaluate against the SFT policy -> register."""
    from mlflow.tracking import MlflowClient

    from kubetune import tracking
    from kubetune.ops.runner import run_local

    summary = run_local("grpo", {
        "base_model": str(tiny_llama), "model_name": "tiny-grpo", "sft_max_steps": 2, "steps": 2,
        "learning_rate": 1e-2, "sft_learning_rate": 3e-3, "sft_settings": {"merge": True, "batch_size": 2},
        "grpo_settings": {"prompts_per_step": 2, "num_generations": 4, "max_new_tokens": 6, "max_prompts": 16},
        "eval_settings": {"max_examples": 6, "max_new_tokens": 6, "forgetting": False},
    }, workdir=tmp_path)
    assert summary["primary_metric"] == "exact_match" and summary["version"] == "1"
    version = tracking.get_alias("tiny-grpo", "challenger")
    assert version.tags["kubetune.method"] == "grpo" and "eval.exact_match" in version.tags
    client = MlflowClient()
    exp = client.get_experiment_by_name("kubetune/tiny-grpo")
    runs = {r.data.tags["kubetune.stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert {"ingest", "train-peft", "grpo", "evaluate", "register"} <= set(runs)
    grpo_run = runs["grpo"].info.run_id
    for key in ("reward", "kl", "reward_json_fields", "reward_format", "generate_s"):
        assert len(client.get_metric_history(grpo_run, key)) == 2, key  # one point per step
    # evaluate compared with the SFT policy GRPO started from, not the base model.
    assert runs["evaluate"].data.params["base_model"].endswith("merged"), runs["evaluate"].data.params


def test_a_reward_model_is_a_reward(tiny_llama, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune.methods.rl import rewards as R
    from kubetune.stages.grpo import GRPOConfig

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "rm")
    rs = R.build("reward_model:0.5,length:1", reward_model=str(tmp_path / "rm"), max_chars=100)
    total, per = rs(["a ticket", "a ticket"], ["short", "a much longer answer"], [None, None], str)
    assert len(per["reward_model"]) == 2 and per["reward_model"][0] != per["reward_model"][1]
    assert total == pytest.approx([0.5 * s for s in per["reward_model"]])
    assert rs.needs_reference == []
    with pytest.raises(ConfigError, match="'reward_model'"):
        GRPOConfig(rewards="reward_model:1")
