"""Pipeline `rlhf`: SFT, a reward model from ranked pairs, then PPO against it.

ingest (preference data) -> its SFT view (prompt -> chosen) -> tokenize_data -> instruction
SFT (train_peft, LoRA merged) -> [reward modeling: reward_model -> register the reward model]
-> [RL: ppo -> evaluate_policy] -> register. The two bracketed parts are graph components
(``@dsl.pipeline`` functions used as sub-DAGs), so a variant (another RL algorithm, an
existing reward model) swaps one block.

The policy is judged by an independent reward model, trained on the other half of the
training prompts (``pairs=judge``) than the one PPO optimises (``pairs=policy``): judged by
its own reward model, reward hacking would be promoted. A programmatic check, where the task
has one, is stronger still: ``eval_settings={"judge_pattern": "<regex>"}`` makes it decide.

Run it locally:   kubetune run rlhf [--set ppo_steps=20]
Compile it:       kubetune compile --out build/ [--profile profiles/h200x2.yaml]
"""

from typing import NamedTuple

from kfp import dsl

from kubetune.ops import kube
from kubetune.ops.lifecycle import run_settings
from kubetune.ops.wiring import place, unless_unchanged
from kubetune.components import (evaluate_policy, ingest, ppo, preference_sft_data, register,
                                 reward_model, tokenize_data, train_peft)
from kubetune.components import deploy as serve
from kubetune.core.models import DEFAULT_BASE_MODEL

NAME = "rlhf"
DESCRIPTION = "RLHF: instruction SFT, a pairwise reward model, PPO against it (LoRA policy, KL to the SFT policy)."


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name="reward-modeling", description="Train a pairwise reward model and register it.")
    def reward_modeling(preferences: dsl.Input[dsl.Dataset], base_model: str, max_steps: int,
                        reward_model_name: str, model_name: str, pipeline: str, run_id: str,
                        settings: dict) -> dsl.Model:
        trained = reward_model(dataset=preferences, base_model=base_model, max_steps=max_steps,
                               reward_model_name=reward_model_name, settings=settings, pairs="policy",
                               model_name=model_name, pipeline=pipeline, run_id=run_id)
        registered = register(model=trained.outputs["model"], report=trained.outputs["report"],
                              model_name=reward_model_name, pipeline=pipeline, run_id=run_id)
        place(profile, gpu=[trained], once=[registered])
        return trained.outputs["model"]

    Tuned = NamedTuple("Tuned", model=dsl.Model, report=dsl.Artifact)

    @dsl.pipeline(name="rl-tuning", description="PPO of the SFT policy against the reward model, then evaluation.")
    def rl_tuning(policy: dsl.Input[dsl.Model], rewards: dsl.Input[dsl.Model], preferences: dsl.Input[dsl.Dataset],
                  base_model: str, steps: int, learning_rate: float, judge_max_steps: int, model_name: str,
                  pipeline: str, run_id: str, ppo_settings: dict, judge_settings: dict, eval_settings: dict) -> Tuned:
        tuned = ppo(policy=policy, reward_model=rewards, preferences=preferences, steps=steps,
                    learning_rate=learning_rate,
                    settings=ppo_settings, model_name=model_name, pipeline=pipeline, run_id=run_id)
        # The judge is not registered: it exists to score this run's evaluation.
        judge = reward_model(dataset=preferences, base_model=base_model, max_steps=judge_max_steps,
                             reward_model_name="", settings=judge_settings, pairs="judge",
                             model_name=model_name, pipeline=pipeline, run_id=run_id).set_display_name("judge")
        scored = evaluate_policy(model=tuned.outputs["model"], reference=policy, reward_model=judge.outputs["model"],
                                 train_reward_model=rewards, dataset=preferences, base_model=base_model,
                                 settings=eval_settings, model_name=model_name, pipeline=pipeline, run_id=run_id)
        place(profile, gpu=[tuned, judge], eval=[scored])
        return Tuned(model=tuned.outputs["model"], report=scored.outputs["report"])

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def rlhf(
        base_model: str = DEFAULT_BASE_MODEL,
        data_uri: str = "bundled://preferences",
        sft_max_steps: int = 10,
        sft_learning_rate: float = 0.0,  # 0 = LoRA's default (2e-4)
        reward_max_steps: int = 24,
        ppo_steps: int = 10,
        learning_rate: float = 1e-4,
        max_length: int = 512,
        model_name: str = "rlhf-policy",
        reward_model_name: str = "rlhf-reward",
        max_forgetting: float = -1.0,
        sft_settings: dict = {"merge": True},
        reward_settings: dict = {},
        ppo_settings: dict = {},
        eval_settings: dict = {"temperature": 0.7},  # PPO's rollout temperature
        register_settings: dict = {},
        force: bool = False,
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        prefs = ingest(data_uri=data_uri, force=force, training=run_settings(
            base_model=base_model, sft_max_steps=sft_max_steps, sft_learning_rate=sft_learning_rate,
            reward_max_steps=reward_max_steps, ppo_steps=ppo_steps, learning_rate=learning_rate, max_length=max_length, sft_settings=sft_settings,
            reward_settings=reward_settings, ppo_settings=ppo_settings), **lineage).set_display_name("ingest")
        with unless_unchanged(prefs, **lineage) as run:
            sft_data = preference_sft_data(preferences=prefs.outputs["dataset"])
            tokens = tokenize_data(dataset=sft_data.outputs["dataset"], base_model=base_model, max_length=max_length,
                                   model_policy=sft_settings)
            # merge=True (in sft_settings) writes merged/: PPO needs the SFT policy as a whole model.
            sft = train_peft(tokenized=tokens.outputs["tokenized"], base_model=base_model, method="lora",
                             max_steps=sft_max_steps, learning_rate=sft_learning_rate, lora_rank=16,
                             settings=sft_settings, **lineage).set_display_name("instruction-sft")
            rewards = reward_modeling(preferences=prefs.outputs["dataset"], base_model=base_model,
                                    max_steps=reward_max_steps, reward_model_name=reward_model_name,
                                    settings=reward_settings, **lineage)
            tuned = rl_tuning(policy=sft.outputs["model"], rewards=rewards.output, preferences=prefs.outputs["dataset"],
                              base_model=base_model, steps=ppo_steps, learning_rate=learning_rate,
                              judge_max_steps=reward_max_steps, ppo_settings=ppo_settings,
                              judge_settings=reward_settings, eval_settings=eval_settings, **lineage)
            registered = register(model=tuned.outputs["model"], report=tuned.outputs["report"],
                                  max_forgetting=max_forgetting, settings=register_settings, **lineage)
            with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
                served = serve(registered=registered.output, **lineage)

        place(profile, cpu=[prefs, sft_data, tokens, run.skipped, served], gpu=[sft], once=[registered])
        return dsl.OneOf(registered.output, run.skipped.output)

    return rlhf


pipeline = build()
