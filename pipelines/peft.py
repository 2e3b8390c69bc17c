"""Pipeline `peft`: ingest, tokenize, train a PEFT method, evaluate, register.

Skips the rest when the champion was made by the same run (data and split, settings, code), unless
``force``: see docs/registry.md for the pattern.

Run it locally:   kubetune run peft [--set method=dora --set max_steps=100]
Compile it:       kubetune compile --out build/ [--profile profiles/h200x2.yaml]
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.components import evaluate, ingest, register, tokenize_data, train_peft
from kubetune.components import deploy as serve
from kubetune.ops.lifecycle import run_settings
from kubetune.core.defaults import MAIN_JOB
from kubetune.ops.wiring import place, unless_unchanged
from kubetune.core.models import DEFAULT_BASE_MODEL

NAME = "peft"
DESCRIPTION = "Parameter-efficient fine-tuning (LoRA by default; DoRA, QLoRA, adapters, prompt, prefix, IA3)."


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def peft(
        base_model: str = DEFAULT_BASE_MODEL,
        # The defaults are the main job (kubetune.core.defaults says why these sizes).
        data_uri: str = MAIN_JOB.data_uri,
        method: str = MAIN_JOB.method,
        max_steps: int = MAIN_JOB.max_steps,
        learning_rate: float = MAIN_JOB.learning_rate,  # 0 = the method's default
        lora_rank: int = MAIN_JOB.lora_rank,
        max_length: int = MAIN_JOB.max_length,
        model_name: str = "tickets-peft",
        max_forgetting: float = -1.0,
        train_settings: dict = MAIN_JOB.train_settings(),
        eval_settings: dict = MAIN_JOB.eval_settings(),
        register_settings: dict = {},
        force: bool = False,
        nodes: int = 1,
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        data = ingest(data_uri=data_uri, force=force, training=run_settings(
            base_model=base_model, method=method, max_steps=max_steps, learning_rate=learning_rate, lora_rank=lora_rank,
            max_length=max_length, train_settings=train_settings), **lineage).set_display_name("ingest")
        with unless_unchanged(data, **lineage) as run:
            tokens = tokenize_data(dataset=data.outputs["dataset"], base_model=base_model, max_length=max_length,
                                   method=method, model_policy=train_settings)
            trained = train_peft(tokenized=tokens.outputs["tokenized"], base_model=base_model, method=method,
                                 max_steps=max_steps, learning_rate=learning_rate, lora_rank=lora_rank,
                                 settings=train_settings, nodes=nodes, **lineage)
            scored = evaluate(model=trained.outputs["model"], dataset=data.outputs["dataset"],
                              tokenized=tokens.outputs["tokenized"], base_model=base_model,
                              settings=eval_settings, model_policy=train_settings, **lineage)
            registered = register(model=trained.outputs["model"], report=scored.outputs["report"],
                                  max_forgetting=max_forgetting, settings=register_settings, **lineage)
            with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
                served = serve(registered=registered.output, **lineage)

        place(profile, cpu=[data, tokens, run.skipped, served], gpu=[trained], eval=[scored], once=[registered])
        return dsl.OneOf(registered.output, run.skipped.output)

    return peft


pipeline = build()
