"""Pipeline `grpo`: RL with verifiable rewards (and/or a reward model) after an optional SFT step.

ingest -> tokenize_data -> [instruction SFT (train_peft, LoRA merged) when sft_max_steps > 0] ->
grpo -> evaluate -> register. The rewards are checks against the dataset's reference answers
(on the bundled tickets: the share of JSON fields right, plus a small bonus for a JSON-shaped
answer); evaluate judges the candidate independently of them, by greedy exact match of the whole
record on held-out tickets, against the model GRPO started from (the SFT policy) and the champion.

Run it locally:   kubetune run grpo [--set steps=40 --set rewards=exact_match:1.0]
Compile it:       kubetune compile grpo --out build/ [--profile profiles/h200x2.yaml]
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.components import deploy as serve
from kubetune.components import evaluate, grpo, ingest, register, tokenize_data, train_peft
from kubetune.ops.lifecycle import run_settings
from kubetune.core.defaults import MAIN_JOB
from kubetune.ops.wiring import place, skip_if_unchanged
from kubetune.core.models import DEFAULT_BASE_MODEL

NAME = "grpo"
DESCRIPTION = "GRPO with verifiable rewards or a reward model (LoRA policy, KL to the start), after optional SFT."


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def grpo_pipeline(
        base_model: str = DEFAULT_BASE_MODEL,
        data_uri: str = MAIN_JOB.data_uri,
        # A short SFT first (40 steps x 2 rows of 256 tokens at 1e-3), so GRPO starts from a policy that
        # answers in the task format and gets most fields right: from 30 steps (exact match ~0.3) GRPO's
        # updates went either way across seeds, from 40 (~0.7) they raised it in 7 of 9 seeds
        # (docs/compare.md). 0 = GRPO from base_model.
        sft_max_steps: int = 40,
        # LoRA's 1e-3 of the main job (tens of steps, not thousands); 0 = LoRA's default 2e-4.
        sft_learning_rate: float = MAIN_JOB.learning_rate,
        # A step samples 8 prompts x 4 answers: with fewer prompts a step (2) each update pulls
        # every answer toward the few field values those prompts rewarded, and held-out exact
        # match fell; 8 prompts over 12 steps raised it (docs/compare.md). 5e-5, not more: at
        # 2e-4 the updates moved a field's class prior.
        steps: int = 12,
        learning_rate: float = 5e-5,
        rewards: str = "json_fields:1.0,format:0.2",
        max_length: int = MAIN_JOB.max_length,
        model_name: str = "tickets-grpo",
        max_forgetting: float = -1.0,
        sft_settings: dict = {"merge": True, "batch_size": MAIN_JOB.batch_size},
        grpo_settings: dict = {"prompts_per_step": 8, "num_generations": 4},
        eval_settings: dict = MAIN_JOB.eval_settings(),
        register_settings: dict = {},
        force: bool = False,
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        data = ingest(data_uri=data_uri, force=force, training=run_settings(
            base_model=base_model, sft_max_steps=sft_max_steps, sft_learning_rate=sft_learning_rate, steps=steps,
            learning_rate=learning_rate, rewards=rewards, max_length=max_length, sft_settings=sft_settings,
            grpo_settings=grpo_settings),
            **lineage).set_display_name("ingest")

        def tune(tokens, policy=None):
            """grpo, evaluate against the starting policy, register, deploy (kfp.local cannot pass a OneOf of
            artifacts)."""
            start = {"policy": policy.outputs["model"]} if policy is not None else {}
            tuned = grpo(dataset=data.outputs["dataset"], base_model=base_model, steps=steps,
                         learning_rate=learning_rate, rewards=rewards, settings=grpo_settings, **start, **lineage)
            reference = {"reference": policy.outputs["model"]} if policy is not None else {}
            scored = evaluate(model=tuned.outputs["model"], dataset=data.outputs["dataset"],
                              tokenized=tokens.outputs["tokenized"], base_model=base_model, settings=eval_settings,
                              **reference, **lineage)
            registered = register(model=tuned.outputs["model"], report=scored.outputs["report"],
                                  max_forgetting=max_forgetting, settings=register_settings, **lineage)
            with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
                served = serve(registered=registered.output, **lineage)
            return tuned, scored, registered, served

        skipped = skip_if_unchanged(data, **lineage)
        with dsl.Elif(sft_max_steps > 0, name="from-sft"):
            tokens_sft = tokenize_data(dataset=data.outputs["dataset"], base_model=base_model, max_length=max_length)
            # merge=True (in sft_settings) writes merged/: GRPO starts from the SFT policy as a whole model.
            sft = train_peft(tokenized=tokens_sft.outputs["tokenized"], base_model=base_model, method="lora",
                             max_steps=sft_max_steps, learning_rate=sft_learning_rate, lora_rank=16,
                             settings=sft_settings, **lineage).set_display_name("instruction-sft")
            tuned_sft, scored_sft, registered_sft, served_sft = tune(tokens_sft, sft)
        with dsl.Else(name="from-base"):
            tokens_base = tokenize_data(dataset=data.outputs["dataset"], base_model=base_model,
                                        max_length=max_length)
            tuned_base, scored_base, registered_base, served_base = tune(tokens_base)

        place(profile, cpu=[data, skipped, tokens_sft, tokens_base, served_sft, served_base],
              gpu=[sft, tuned_sft, tuned_base], eval=[scored_sft, scored_base], once=[registered_sft, registered_base])
        return dsl.OneOf(skipped.output, registered_sft.output, registered_base.output)

    return grpo_pipeline


pipeline = build()
