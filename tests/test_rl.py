"""RLHF on the tiny Llama: reward model, PPO, DPO and the policy comparison, on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kubetune.lib.dataset import read_jsonl

DATA = Path(__file__).resolve().parents[1] / "kubetune" / "data"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: one thread is as fast alone and far faster
    # under load (thread oversubscription made PPO updates ~30x slower in measurements).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs():
    rows = read_jsonl(DATA / "preferences.jsonl")
    # Rows come in adjacent triplets per prompt: cut on a multiple of 3 so no prompt is on both sides.
    return rows[:126], rows[-42:]


@pytest.fixture(scope="module")
def rollout_prompts():
    return [r["prompt"] for r in read_jsonl(DATA / "rollout_prompts.jsonl")]


def space_reward(prompts, responses):
    """A reward the random tiny policy can move: spaces in the response (word-initial tokens)."""
    return [float(r.count(" ")) for r in responses]


def _base_params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bundled_preferences_differ_only_in_format():
    rows = read_jsonl(DATA / "preferences.jsonl")
    assert len(rows) >= 300
    for row in rows:
        chosen_lines = row["chosen"].split("\n")
        assert len(chosen_lines) == 3 and all(line.startswith("- ") for line in chosen_lines)
        assert "\n" not in row["rejected"] and not row["rejected"].startswith("- ")
        # same tips on both sides: every bullet's text appears (lower-cased) in the prose
        for line in chosen_lines:
            tip = line[2:].rstrip(".")
            assert tip[0].lower() + tip[1:] in row["rejected"]
    assert len(read_jsonl(DATA / "rollout_prompts.jsonl")) >= 50


def test_reward_model_learns_the_format_and_scores_consistently(tiny_llama, pairs, tmp_path):
    from kubetune.methods.rl.reward import RewardModelConfig, RewardModelScorer, train_reward_model

    train, val = pairs
    cfg = RewardModelConfig(learning_rate=1e-3, batch_size=16, max_steps=5)
    result = train_reward_model(tiny_llama, train, val, cfg, tmp_path / "rm")

    assert result.metrics["accuracy"] >= 0.85, result.metrics  # chance is 0.5
    assert result.metrics["margin_mean"] > 0.5
    assert result.figure is not None and len(result.margins) == len(val)
    assert (tmp_path / "rm" / "model.safetensors").exists()
    # The saved model, loaded back as PPO's reward callable, gives the same margins.
    scorer = RewardModelScorer(tmp_path / "rm")
    chosen = scorer([p["prompt"] for p in val], [p["chosen"] for p in val])
    rejected = scorer([p["prompt"] for p in val], [p["rejected"] for p in val])
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert margins == pytest.approx(result.margins, abs=1e-4)


def test_ppo_raises_reward_keeps_kl_bounded_and_base_frozen(tiny_llama, rollout_prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    from kubetune.methods.rl.compare import compare_policies
    from kubetune.methods.rl.ppo import PPOConfig, train_ppo

    cfg = PPOConfig(
        steps=8, batch_size=32, mini_batch_size=16, ppo_epochs=4, learning_rate=5e-3, max_new_tokens=6,
        kl_coef=0.05, seed=0,
        # The tiny random model's logits are nearly flat; an adapter on the LM head lets
        # a handful of updates move them (SmolLM2 runs use the all-linear default).
        lora_target_modules=["q_proj", "v_proj", "lm_head"],
    )
    logged = []
    result = train_ppo(tiny_llama, rollout_prompts, space_reward, cfg, tmp_path / "ppo",
                       log_fn=lambda stats, i: logged.append(i))
    rewards = [h["reward"] for h in result.history]
    kls = [h["kl"] for h in result.history]

    assert logged == list(range(8))
    # Before the first update policy == reference, so the measured KL is exactly 0:
    # this also checks the reference really is the adapter-disabled policy.
    assert abs(kls[0]) < 1e-4
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.4, rewards
    assert all(math.isfinite(k) for k in kls) and max(kls) < 10.0, kls
    for key in ("entropy", "clipfrac", "value_loss", "response_length", "approx_kl"):
        assert all(math.isfinite(h[key]) for h in result.history), key
    assert result.samples and {"update", "prompt", "response", "score"} <= set(result.samples[0])

    # Frozen parts unchanged, adapters changed.
    base = _base_params(AutoModelForCausalLM.from_pretrained(tiny_llama))
    lm = result.trainer.policy.lm
    lora_changed = False
    for name, param in lm.named_parameters():
        if "lora_B" in name:
            lora_changed |= bool(param.abs().sum() > 0)  # B starts at zero
        elif "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param, base[key]), name
    assert lora_changed

    # The saved (merged, untied) policy loads as a plain causal LM and beats the base.
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    assert torch.equal(saved.get_input_embeddings().weight, base["model.embed_tokens.weight"])
    assert not torch.equal(saved.get_output_embeddings().weight, base["model.embed_tokens.weight"])
    report = compare_policies(tmp_path / "ppo", tiny_llama, rollout_prompts[:32], space_reward, max_new_tokens=6)
    assert report["reward_policy"] > report["reward_reference"], report
    assert report["win_rate"] > 0.5 and report["kl"] > 0, report


def test_ppo_logprobs_do_not_depend_on_left_padding(tiny_llama):
    from kubetune.methods.rl.ppo import PPOConfig, PPOTrainer

    trainer = PPOTrainer(tiny_llama, space_reward, PPOConfig(batch_size=2, mini_batch_size=1, max_new_tokens=4))
    ro = trainer.rollout(["Hi?", "How do I keep houseplants alive in a dark flat in winter?"])
    assert ro.attention_mask[0, 0] == 0  # the short prompt is left-padded
    for i in range(2):
        keep = ro.attention_mask[i].bool()
        keep[ro.prompt_length:] = True  # compare the whole response window
        P = int(ro.attention_mask[i, : ro.prompt_length].sum())
        alone, _, _ = trainer._logprobs_values(
            trainer.policy, ro.query_responses[i : i + 1, keep], ro.attention_mask[i : i + 1, keep], P
        )
        mask = ro.response_mask[i].bool()
        torch.testing.assert_close(alone[0][mask], ro.logprobs[i][mask], atol=1e-4, rtol=0)


def test_ppo_accepts_a_reward_model_path(tiny_llama, pairs, rollout_prompts, tmp_path):
    from kubetune.methods.rl.ppo import PPOConfig, train_ppo
    from kubetune.methods.rl.reward import RewardModelConfig, train_reward_model

    train, val = pairs
    train_reward_model(tiny_llama, train[:32], val[:6], RewardModelConfig(max_steps=1, batch_size=8), tmp_path / "rm")
    result = train_ppo(tiny_llama, rollout_prompts, tmp_path / "rm",
                       PPOConfig(steps=1, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4))
    assert len(result.history) == 1 and math.isfinite(result.history[0]["reward"])


def test_dpo_raises_the_implicit_reward_margin(tiny_llama, pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    from kubetune.methods.rl.dpo import DPOConfig, train_dpo

    train, val = pairs
    metrics = train_dpo(tiny_llama, train[:64], val[:24],
                        DPOConfig(learning_rate=5e-3, max_steps=6, batch_size=8, sft_weight=0.0),
                        tmp_path / "dpo")
    assert metrics["margin_before"] == pytest.approx(0.0, abs=1e-4)  # π = π_ref before training
    assert metrics["margin_after"] > 0.5, metrics
    assert metrics["accuracy_after"] >= 0.8, metrics

    base = _base_params(AutoModelForCausalLM.from_pretrained(tiny_llama))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo").state_dict()
    # LoRA on the linear layers only: the embeddings (and norms) are frozen, the projections merged.
    assert torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(tuned["model.norm.weight"], base["model.norm.weight"])
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned[q_proj], base[q_proj])


def test_dpo_with_an_nll_term_raises_the_chosen_answers_likelihood_more(tiny_llama, pairs, tmp_path):
    """RPO (sft_weight > 0): the chosen answers' implicit reward rises more than under plain DPO."""
    from kubetune.methods.rl.dpo import DPOConfig, train_dpo

    train, val = pairs
    runs = {w: train_dpo(tiny_llama, train[:32], val[:8], DPOConfig(learning_rate=5e-3, max_steps=4, batch_size=8,
                                                                   sft_weight=w), tmp_path / f"w{w}")
            for w in (0.0, 1.0)}
    assert runs[1.0]["chosen_reward_after"] > runs[0.0]["chosen_reward_after"], runs
    assert runs[1.0]["margin_after"] > 0, runs


def test_spread_caps_evaluation_rows_evenly():
    from kubetune.methods.rl.data import spread

    rows = [{"i": i} for i in range(10)]
    assert [r["i"] for r in spread(rows, 4)] == [0, 2, 5, 7]
    assert spread(rows, 0) == rows and spread(rows, 20) == rows


def test_full_finetuning_paths_keep_the_reference_frozen(tiny_llama, pairs, rollout_prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    from kubetune.methods.rl.dpo import DPOConfig, train_dpo
    from kubetune.methods.rl.ppo import PPOConfig, train_ppo

    base = _base_params(AutoModelForCausalLM.from_pretrained(tiny_llama))
    result = train_ppo(tiny_llama, rollout_prompts, space_reward,
                       PPOConfig(steps=1, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                                 use_peft=False, learning_rate=1e-3))
    ref, policy = result.trainer.ref_lm.state_dict(), result.trainer.policy.lm.state_dict()
    assert all(torch.equal(ref[k], base[k]) for k in base)  # the deep-copied reference did not move
    assert any(not torch.equal(policy[k], base[k]) for k in base)  # the policy did

    train, val = pairs
    metrics = train_dpo(tiny_llama, train[:16], val[:8],
                        DPOConfig(use_peft=False, learning_rate=1e-3, max_steps=2, batch_size=8), tmp_path / "dpo")
    assert metrics["margin_before"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["margin_after"] > metrics["margin_before"]


def _independent_logprobs(model, ro, temperature: float = 1.0):
    """Per-token log-probs of the rollout's responses under ``model``, computed from scratch."""
    import torch.nn.functional as F

    am = ro.attention_mask
    P = ro.prompt_length
    with torch.no_grad():
        logits = model(input_ids=ro.query_responses, attention_mask=am,
                       position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.float()
    logp = F.log_softmax(logits[:, P - 1:-1] / temperature, dim=-1)
    return logp.gather(-1, ro.query_responses[:, P:, None]).squeeze(-1) * ro.response_mask


def test_ppo_reference_is_the_base_model_and_kl_matches_an_independent_computation(tiny_llama, rollout_prompts,
                                                                                   tmp_path):
    """After updates the reference must still be the untouched base (not the moving policy), the
    KL in the reward must be positive and equal to log pi - log pi_ref computed by separate models,
    and the value of the first response token must be read at the last prompt position."""
    from transformers import AutoModelForCausalLM

    from kubetune.methods.rl import ppo_core as core
    from kubetune.methods.rl.ppo import PPOConfig, PPOTrainer

    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=5e-3, max_new_tokens=6,
                    temperature=0.7, lora_target_modules=["q_proj", "v_proj", "lm_head"], seed=0)
    trainer = PPOTrainer(tiny_llama, space_reward, cfg)
    for _ in range(2):
        trainer.step(rollout_prompts[:8])
    ro = trainer.rollout(rollout_prompts[8:16])
    mask = ro.response_mask.float()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    torch.testing.assert_close(ro.ref_logprobs, _independent_logprobs(base, ro, cfg.temperature), atol=1e-4, rtol=0)
    # The policy as a plain model (saved merged and untied, loaded back), evaluated separately.
    trainer.save(tmp_path / "policy")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32).eval()
    policy_lp = _independent_logprobs(merged, ro, cfg.temperature)
    torch.testing.assert_close(ro.logprobs, policy_lp, atol=1e-4, rtol=0)

    kl = (core.kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask).sum(1).mean()
    independent_kl = ((policy_lp - _independent_logprobs(base, ro, cfg.temperature)) * mask).sum(1).mean()
    assert float(kl) > 1e-3, "two updates at lr 5e-3 must move the policy away from the reference"
    assert float(kl) == pytest.approx(float(independent_kl), abs=1e-4)

    # V(s) for response token t is the value head at the position that predicts it: P-1+t.
    P = ro.prompt_length
    with torch.no_grad():
        _, values = trainer.policy(ro.query_responses, ro.attention_mask,
                                   (ro.attention_mask.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(ro.values[:, 0], values[:, P - 1] * mask[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.values, values[:, P - 1:-1] * mask, atol=1e-5, rtol=0)
