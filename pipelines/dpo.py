"""Pipeline `dpo`: Direct Preference Optimization, the reward-model-free alternative to RLHF.

ingest (preference data) -> dpo -> evaluate_policy -> register. DPO reads prompt/chosen/rejected
pairs itself (TRL tokenizes them), so there is no tokenize_data step. The evaluation needs a
judge to compute rewards and win rates against the starting policy: a reward model trained on
the same training pairs, used only for evaluation (DPO never sees it).

Run it locally:   kubetune run dpo [--set max_steps=60 --set beta=0.2]
Compile it:       kubetune compile --out build/ [--profile profiles/h200x2.yaml]
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.ops.lifecycle import run_settings
from kubetune.ops.wiring import place, unless_unchanged
from kubetune.components import dpo, evaluate_policy, ingest, register, reward_model
from kubetune.components import deploy as serve
from kubetune.core.models import DEFAULT_BASE_MODEL

NAME = "dpo"
DESCRIPTION = "DPO on preference pairs (LoRA by default), evaluated against the starting policy by a reward model."


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def dpo_pipeline(
        base_model: str = DEFAULT_BASE_MODEL,
        data_uri: str = "bundled://preferences",
        max_steps: int = 30,
        learning_rate: float = 0.0,
        beta: float = 0.1,
        judge_max_steps: int = 24,
        model_name: str = "dpo-policy",
        max_forgetting: float = -1.0,
        train_settings: dict = {},
        judge_settings: dict = {},
        eval_settings: dict = {},
        register_settings: dict = {},
        force: bool = False,
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        prefs = ingest(data_uri=data_uri, force=force, training=run_settings(
            base_model=base_model, max_steps=max_steps, learning_rate=learning_rate, beta=beta,
            judge_max_steps=judge_max_steps, train_settings=train_settings, judge_settings=judge_settings),
            **lineage).set_display_name("ingest")
        with unless_unchanged(prefs, **lineage) as run:
            trained = dpo(dataset=prefs.outputs["dataset"], base_model=base_model, max_steps=max_steps,
                          learning_rate=learning_rate, beta=beta, settings=train_settings, **lineage)
            # The judge is not registered: it exists to score this run's evaluation.
            judge = reward_model(dataset=prefs.outputs["dataset"], base_model=base_model,
                                 max_steps=judge_max_steps, reward_model_name="", settings=judge_settings,
                                 **lineage).set_display_name("judge")
            scored = evaluate_policy(model=trained.outputs["model"], reward_model=judge.outputs["model"],
                                     dataset=prefs.outputs["dataset"], base_model=base_model,
                                     settings=eval_settings, **lineage)
            registered = register(model=trained.outputs["model"], report=scored.outputs["report"],
                                  max_forgetting=max_forgetting, settings=register_settings, **lineage)
            with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
                served = serve(registered=registered.output, **lineage)

        place(profile, cpu=[prefs, run.skipped, served], gpu=[trained, judge], eval=[scored], once=[registered])
        return dsl.OneOf(registered.output, run.skipped.output)

    return dpo_pipeline


pipeline = build()
