"""Pipeline `moe` (experimental): ingest, tokenize, upcycle into a Mixture of Experts and train
experts + routers, evaluate against the dense base, register.

Skips the rest when the champion was made by the same run (data and split, settings, code), unless
``force``: see docs/registry.md for the pattern.

Run it locally:   kubetune run moe [--set kind=lora --set num_experts=8]
Compile it:       kubetune compile --out build/ [--profile profiles/h200x2.yaml]
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.ops.lifecycle import run_settings
from kubetune.ops.wiring import place, unless_unchanged
from kubetune.components import evaluate, ingest, register, tokenize_data, train_moe
from kubetune.components import deploy as serve
from kubetune.core.defaults import MAIN_JOB
from kubetune.core.models import DEFAULT_BASE_MODEL

NAME = "moe"
DESCRIPTION = "Mixture of Experts by sparse upcycling: experts and router trained, the rest frozen (experimental)."


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def moe(
        base_model: str = DEFAULT_BASE_MODEL,
        data_uri: str = MAIN_JOB.data_uri,
        num_experts: int = 4,
        top_k: int = 2,
        kind: str = "experts",
        # 30 fixed steps, not the main job's data-sized default: the upcycled model's step and its
        # 2 GB checkpoints cost more on 2 CPU cores, and its length was not re-measured.
        max_steps: int = 30,
        learning_rate: float = 0.0,
        max_length: int = MAIN_JOB.max_length,
        model_name: str = "tickets-moe",
        max_forgetting: float = -1.0,
        train_settings: dict = {},
        eval_settings: dict = {},
        register_settings: dict = {},
        force: bool = False,
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        data = ingest(data_uri=data_uri, force=force, training=run_settings(
            base_model=base_model, num_experts=num_experts, top_k=top_k, kind=kind, max_steps=max_steps,
            learning_rate=learning_rate, max_length=max_length, train_settings=train_settings),
            **lineage).set_display_name("ingest")
        with unless_unchanged(data, **lineage) as run:
            tokens = tokenize_data(dataset=data.outputs["dataset"], base_model=base_model, max_length=max_length,
                                   model_policy=train_settings)
            trained = train_moe(tokenized=tokens.outputs["tokenized"], base_model=base_model,
                                num_experts=num_experts, top_k=top_k, kind=kind, max_steps=max_steps,
                                learning_rate=learning_rate, settings=train_settings, **lineage)
            scored = evaluate(model=trained.outputs["model"], dataset=data.outputs["dataset"],
                              tokenized=tokens.outputs["tokenized"], base_model=base_model,
                              settings=eval_settings, model_policy=train_settings, **lineage)
            registered = register(model=trained.outputs["model"], report=scored.outputs["report"],
                                  max_forgetting=max_forgetting, settings=register_settings, **lineage)
            with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
                served = serve(registered=registered.output, **lineage)

        place(profile, cpu=[data, tokens, run.skipped, served], gpu=[trained], eval=[scored], once=[registered])
        return dsl.OneOf(registered.output, run.skipped.output)

    return moe


pipeline = build()
