"""The RLHF and DPO stages with MLflow, and the `rlhf` and `dpo` pipelines through kfp.local.

The learning itself (reward model accuracy, PPO raising reward at bounded KL, DPO raising the
implicit margin, frozen parts unchanged) is tested on the library in tests/test_rl.py; here:
the stages' contracts (grouped splits, eval.json for register, MLflow logging, manifests) and
one run of each pipeline that registers a version.
"""

from __future__ import annotations

import json

import pytest

from kubetune.errors import ConfigError

# Tiny-model settings: the tiny Llama's logits are nearly flat, so learning rates are high and
# the PPO adapter includes the LM head (as in tests/test_rl.py).
REWARD = {"learning_rate": 1e-3, "batch_size": 16}
PPO = {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6,
       "target_modules": "q_proj,v_proj,lm_head"}
EVAL = {"max_new_tokens": 6, "max_prompts": 6, "forgetting": True}


@pytest.fixture
def prefs(tmp_path):
    from kubetune.stages.ingest import IngestConfig, ingest

    ingest(IngestConfig(data_uri="bundled://preferences", group_by="prompt"), tmp_path / "prefs")
    return tmp_path / "prefs"


def test_ingest_group_by_keeps_each_prompt_on_one_side(tmp_path):
    from kubetune.lib.dataset import load_dataset_dir
    from kubetune.stages.ingest import IngestConfig, ingest

    result = ingest(IngestConfig(data_uri="bundled://preferences", group_by="prompt"), tmp_path / "g")
    _, train, val = load_dataset_dir(tmp_path / "g")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert len(val) == result.counts["validation"] == 36 and len(train) + len(val) == 360
    # Row by row (group_by=''), prompts straddle: that is what group_by is for.
    ingest(IngestConfig(data_uri="bundled://preferences", group_by=""), tmp_path / "r")
    _, train, val = load_dataset_dir(tmp_path / "r")
    assert {r["prompt"] for r in train} & {r["prompt"] for r in val}
    with pytest.raises(ConfigError, match="no field 'question'"):
        ingest(IngestConfig(data_uri="bundled://preferences", group_by="question"), tmp_path / "x")


def test_rollouts_leave_out_the_topics_the_evaluation_holds_out(tmp_path):
    """PPO's rollout prompts share goals with the held-out preference prompts (other phrasings of
    the same topics); with the preference data given, those topics are not rolled out on."""
    from kubetune.errors import DataError
    from kubetune.lib.dataset import read_jsonl
    from kubetune.lib.storage import BUNDLED_DIR
    from kubetune.methods.rl.data import load_pairs, load_prompts
    from kubetune.stages.ingest import IngestConfig, ingest

    ingest(IngestConfig(data_uri="bundled://preferences"), tmp_path / "prefs")  # group_by=auto: topics
    _, train, val = load_pairs(tmp_path / "prefs")
    held_topics = {r["group"] for r in val}
    assert held_topics and not held_topics & {r["group"] for r in train}
    topic_of = {r["prompt"]: r["group"] for r in read_jsonl(BUNDLED_DIR / "rollout_prompts.jsonl")}

    everything = load_prompts("bundled://rollout_prompts", tmp_path / "c")
    assert {topic_of[p] for p in everything} & held_topics  # without the data, they overlap
    kept = load_prompts("bundled://rollout_prompts", tmp_path / "c", val)
    assert kept and not {topic_of[p] for p in kept} & held_topics
    assert len(kept) == sum(1 for p in everything if topic_of[p] not in held_topics)
    # A prompts file with no group still loses the held-out prompts themselves.
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                              for p in [val[0]["prompt"], "Something else entirely?"]))
    assert load_prompts(str(tmp_path / "p.jsonl"), tmp_path / "c", val) == ["Something else entirely?"]
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": val[0]["prompt"]}) + "\n")
    with pytest.raises(DataError, match="held-out prompt or topic"):
        load_prompts(str(tmp_path / "q.jsonl"), tmp_path / "c", val)


def test_stage_loaders_repair_a_row_by_row_split(tmp_path):
    from kubetune.methods.rl.data import load_pairs
    from kubetune.stages.ingest import IngestConfig, ingest
    from kubetune.stages.preference_sft_data import preference_sft_data

    ingest(IngestConfig(data_uri="bundled://preferences", group_by=""), tmp_path / "r")
    _, train, val = load_pairs(tmp_path / "r")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert len(train) + len(val) == 360 and len(val) > 36  # validation prompts took their siblings
    sft = preference_sft_data(tmp_path / "r", tmp_path / "sft")
    first = json.loads((tmp_path / "sft" / "train.jsonl").read_text().splitlines()[0])
    assert sft.shape == "instruction" and first["output"].startswith("- ")
    assert sft.counts == {"train": len(train), "validation": len(val)}


def test_configs_name_the_bad_key():
    from kubetune.core.config import from_dict
    from kubetune.stages.dpo import DPOConfig
    from kubetune.stages.evaluate_policy import EvaluatePolicyConfig
    from kubetune.stages.ppo import PPOConfig
    from kubetune.stages.reward_model import RewardModelConfig

    with pytest.raises(ConfigError, match="'batch_size' \\(6\\) must be a multiple of 'mini_batch_size'"):
        PPOConfig(batch_size=6, mini_batch_size=4)
    with pytest.raises(ConfigError, match="'max_steps'"):
        RewardModelConfig(max_steps=0)
    with pytest.raises(ConfigError, match="'beta'"):
        DPOConfig(beta=0)
    with pytest.raises(ConfigError, match="must be one of"):
        from_dict(EvaluatePolicyConfig, {"primary_metric": "val_loss"})
    assert PPOConfig(target_modules="q_proj, v_proj").trainer_settings().lora_target_modules == ["q_proj", "v_proj"]


def test_reward_model_stage_reports_for_register_and_compares_with_champion(tiny_llama, prefs, tmp_path,
                                                                            mlflow_uri):
    from mlflow.tracking import MlflowClient

    from kubetune import tracking
    from kubetune.stages.register import RegisterConfig, register
    from kubetune.stages.reward_model import RewardModelConfig, reward_model
    from kubetune.tracking import RunContext

    ctx = RunContext("tiny-reward", "run-1", "rlhf")
    cfg = RewardModelConfig(base_model=str(tiny_llama), max_steps=5, model_name="tiny-reward", **REWARD)
    first = reward_model(cfg, prefs, tmp_path / "rm1", tmp_path / "rm1.json", ctx=ctx)
    report = json.loads((tmp_path / "rm1.json").read_text())
    assert report["candidate"]["accuracy"] >= 0.85 and report["base"]["accuracy"] <= 0.7, report
    assert report["beats_base"] and report["champion"] is None
    assert json.loads((tmp_path / "rm1" / "kubetune_method.json").read_text())["method"] == "reward_model"
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("kubetune/tiny-reward").experiment_id],
                                     filter_string="tags.`kubetune.stage` = 'reward-model'")[0]
    assert run.data.metrics["val_accuracy"] == first.metrics["accuracy"]
    assert "reward_margins.png" in [a.path for a in MlflowClient().list_artifacts(run.info.run_id)]

    registered = register(RegisterConfig(model_name="tiny-reward"), tmp_path / "rm1", tmp_path / "rm1.json", ctx)
    assert registered.promoted and str(tracking.get_alias("tiny-reward", "champion").version) == "1"

    # A one-step model is compared with the registered champion, scored on the same pairs. Its
    # learning rate is the default (0 -> 5e-5), which the Trainer logs as 5e-5: no param clash.
    weak = RewardModelConfig(base_model=str(tiny_llama), max_steps=1, model_name="tiny-reward", batch_size=4)
    second = reward_model(weak, prefs, tmp_path / "rm2", tmp_path / "rm2.json",
                          ctx=RunContext("tiny-reward", "run-2", "rlhf"))
    assert second.report.champion_version == "1"
    assert second.report.champion["accuracy"] == pytest.approx(first.metrics["accuracy"])
    assert not second.report.judge().beats_champion


def test_reward_model_halves_are_prompt_disjoint_and_cover_the_training_pairs(prefs):
    from kubetune.methods.rl.data import load_pairs, prompt_half

    _, train, _ = load_pairs(prefs)
    policy, judge = prompt_half(train, "policy"), prompt_half(train, "judge")
    assert not {p["prompt"] for p in policy} & {p["prompt"] for p in judge}
    assert len(policy) + len(judge) == len(train) and min(len(policy), len(judge)) > len(train) // 4
    # Cut by the prompt, not the position: a reversed file gives the same halves.
    assert prompt_half(train[::-1], "policy") == policy[::-1]


def test_policy_is_judged_by_the_judge_not_by_the_reward_model_it_optimised(tiny_llama, prefs, tmp_path):
    """The decision metric comes from the independent judge (or the programmatic check); the
    optimised reward model's score of the same samples is only reported, as train_reward."""
    from kubetune.methods.rl.compare import compare_policies
    from kubetune.methods.rl.data import load_pairs, unique_prompts
    from kubetune.methods.rl.reward import RewardModelScorer
    from kubetune.stages.evaluate_policy import EvaluatePolicyConfig, evaluate_policy
    from kubetune.stages.reward_model import RewardModelConfig, reward_model

    for half, steps in (("policy", 1), ("judge", 5)):
        reward_model(RewardModelConfig(base_model=str(tiny_llama), max_steps=steps, pairs=half, **REWARD), prefs,
                     tmp_path / half, tmp_path / f"{half}.json")
    cfg = EvaluatePolicyConfig(max_new_tokens=6, max_prompts=4, forgetting=False)
    report = evaluate_policy(cfg, tiny_llama, tiny_llama, tmp_path / "judge", prefs, tmp_path / "eval.json",
                             train_reward_model_dir=tmp_path / "policy").report.to_dict()
    assert report["primary_metric"] == "reward"
    prompts = unique_prompts(load_pairs(prefs)[2])[:4]
    judged = compare_policies(tiny_llama, tiny_llama, prompts, RewardModelScorer(tmp_path / "judge"),
                              max_new_tokens=6, temperature=cfg.temperature, batch_size=cfg.batch_size)
    trained = compare_policies(tiny_llama, tiny_llama, prompts, RewardModelScorer(tmp_path / "policy"),
                               max_new_tokens=6, temperature=cfg.temperature, batch_size=cfg.batch_size)
    assert judged["reward_policy"] != pytest.approx(trained["reward_policy"])  # two different judges
    assert report["candidate"]["reward"] == pytest.approx(judged["reward_policy"])
    assert report["candidate"]["train_reward"] == pytest.approx(trained["reward_policy"])
    assert report["base"]["train_reward"] == pytest.approx(trained["reward_reference"])

    # A programmatic check decides where the task has one: ".*" passes every response, and the
    # tied candidate (the reference itself) does not beat its base.
    cfg = EvaluatePolicyConfig(max_new_tokens=6, max_prompts=4, forgetting=False, judge_pattern=".*")
    report = evaluate_policy(cfg, tiny_llama, tiny_llama, tmp_path / "judge", prefs,
                             tmp_path / "eval2.json").report.to_dict()
    assert report["primary_metric"] == "pattern_rate"
    assert report["candidate"]["pattern_rate"] == 1.0 == report["base"]["pattern_rate"]
    assert not report["beats_base"]
    with pytest.raises(ConfigError, match="'judge_pattern'"):
        EvaluatePolicyConfig(judge_pattern="(unclosed")
    with pytest.raises(ConfigError, match="judge_pattern"):
        EvaluatePolicyConfig(primary_metric="pattern_rate")


def _stage_runs(experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags["kubetune.stage"]: r for r in client.search_runs([exp.experiment_id])}


def test_rlhf_pipeline_runs_and_registers_policy_and_reward_model(tiny_llama, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from kubetune import tracking
    from kubetune.ops.runner import run_local

    summary = run_local("rlhf", {
        "base_model": str(tiny_llama), "model_name": "tiny-rlhf", "reward_model_name": "tiny-rlhf-reward",
        "sft_max_steps": 3, "reward_max_steps": 5, "ppo_steps": 2, "learning_rate": 5e-3,
        "sft_learning_rate": 3e-3, "sft_settings": {"merge": True},
        "reward_settings": REWARD, "ppo_settings": PPO,
        # The programmatic judge decides; no tiny model writes three bullet lines in 6 tokens, so
        # the candidate ties its SFT base at 0 whatever PPO did, and a tie earns nothing.
        "eval_settings": {**EVAL, "judge_pattern": "(- [^\\n]+\\n?){3}"},
    }, workdir=tmp_path)
    assert summary["primary_metric"] == "pattern_rate"
    assert summary["candidate"] == 0.0 == summary["base"]
    assert summary["version"] == "1" and set(summary["aliases"]) == {"challenger"}, summary
    version = tracking.get_alias("tiny-rlhf", "challenger")
    assert version.tags["kubetune.method"] == "ppo" and "eval.win_rate" in version.tags and "eval.kl" in version.tags
    # Both rewards are reported: the independent judge's and the one PPO optimised.
    assert "eval.reward" in version.tags and "eval.train_reward" in version.tags
    assert "base.general_perplexity" in version.tags and "eval.forgetting" in version.tags
    # The reward model of the reward-modeling sub-DAG is registered too.
    rm = tracking.get_alias("tiny-rlhf-reward", "champion")
    assert rm is not None and rm.tags["kubetune.method"] == "reward_model" and float(rm.tags["eval.accuracy"]) > 0.5

    runs = _stage_runs("kubetune/tiny-rlhf")
    assert {"ingest", "train-peft", "reward-model", "ppo", "evaluate-policy", "register"} <= set(runs)
    client = MlflowClient()
    exp = client.get_experiment_by_name("kubetune/tiny-rlhf").experiment_id
    halves = {r.data.params.get("kubetune.pairs") for r in client.search_runs(
        [exp], filter_string="tags.`kubetune.stage` = 'reward-model'")}
    assert halves == {"policy", "judge"}  # PPO's reward model and the judge saw disjoint prompts
    ppo_run = runs["ppo"].info.run_id
    for key in ("reward", "kl", "entropy", "clipfrac", "value_loss", "response_length"):
        assert len(client.get_metric_history(ppo_run, key)) == 2, key  # one point per update
    assert "ppo_samples.json" in [a.path for a in client.list_artifacts(ppo_run)]
    assert "samples.json" in [a.path for a in client.list_artifacts(runs["evaluate-policy"].info.run_id)]

    # The registered policy is a plain causal LM that loads back from the registry.
    from transformers import AutoModelForCausalLM

    path = tracking.download_version("tiny-rlhf", "1", tmp_path / "dl")
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size > 0


def test_dpo_pipeline_runs_and_registers(tiny_llama, tmp_path, mlflow_uri):
    from kubetune import tracking
    from kubetune.ops.runner import run_local

    summary = run_local("dpo", {
        "base_model": str(tiny_llama), "model_name": "tiny-dpo", "max_steps": 4, "learning_rate": 5e-3,
        "judge_max_steps": 5, "judge_settings": REWARD, "train_settings": {"batch_size": 8},
        "eval_settings": {**EVAL, "primary_metric": "win_rate"},
    }, workdir=tmp_path)
    assert summary["version"] == "1" and "challenger" in summary["aliases"]
    assert summary["primary_metric"] == "win_rate" and summary["base"] == 0.5
    runs = _stage_runs("kubetune/tiny-dpo")
    dpo_metrics = runs["dpo"].data.metrics
    assert dpo_metrics["summary_margin_before"] == pytest.approx(0.0, abs=1e-4)
    assert dpo_metrics["summary_margin_after"] > 0.1, dpo_metrics  # DPO raised the implicit margin
    version = tracking.get_alias("tiny-dpo", "challenger")
    assert version.tags["kubetune.method"] == "dpo" and "eval.reward" in version.tags
    assert tracking.get_alias("tiny-dpo-reward", "champion") is None  # the judge is not registered
