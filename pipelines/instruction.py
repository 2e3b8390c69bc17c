"""Pipeline `instruction`: instruction tuning on instruction/input/output or chat data.

ingest, tokenize (the model's chat template, or ChatML when it has none; labels on the
assistant turns only, every turn of a multi-turn conversation; a hard error when no response
token is left), train with ``method`` = ``full`` or any PEFT method, evaluate (greedy answers
scored against the references: exact match, ROUGE-L; forgetting), register.

Run it locally:   kubetune run instruction [--set method=full] [--set data_uri=bundled://tickets]
Compile it:       kubetune compile instruction --out build/ [--profile profiles/h200x2.yaml]
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.ops.lifecycle import run_settings
from kubetune.ops.wiring import place, skip_if_unchanged
from kubetune.components import evaluate, ingest, register, tokenize_data, train_full, train_peft
from kubetune.components import deploy as serve
from kubetune.core.models import DEFAULT_BASE_MODEL

NAME = "instruction"
DESCRIPTION = "Instruction tuning on chat or instruction data (responses-only loss), full or any PEFT method."


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def instruction(
        base_model: str = DEFAULT_BASE_MODEL,
        data_uri: str = "bundled://chat",
        method: str = "lora",
        max_steps: int = 32,
        learning_rate: float = 0.0,
        lora_rank: int = 16,
        max_length: int = 256,
        model_name: str = "chat-instruction",
        max_forgetting: float = -1.0,
        train_settings: dict = {},
        eval_settings: dict = {"max_examples": 48, "batch_size": 48},
        register_settings: dict = {},
        force: bool = False,
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        data = ingest(data_uri=data_uri, force=force, training=run_settings(
            base_model=base_model, method=method, max_steps=max_steps, learning_rate=learning_rate, lora_rank=lora_rank,
            max_length=max_length, train_settings=train_settings), **lineage).set_display_name("ingest")

        def judge(trained, tokens):
            """evaluate then register one trained model (kfp.local cannot pass a OneOf of artifacts on)."""
            scored = evaluate(model=trained.outputs["model"], dataset=data.outputs["dataset"],
                              tokenized=tokens.outputs["tokenized"], base_model=base_model, settings=eval_settings,
                              model_policy=train_settings, **lineage)
            registered = register(model=trained.outputs["model"], report=scored.outputs["report"],
                                  max_forgetting=max_forgetting, settings=register_settings, **lineage)
            with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
                served = serve(registered=registered.output, **lineage)
            return scored, registered, served

        skipped = skip_if_unchanged(data, **lineage)
        with dsl.Elif(method == "full", name="all-weights"):
            tokens_full = tokenize_data(dataset=data.outputs["dataset"], base_model=base_model,
                                        max_length=max_length, model_policy=train_settings)
            full = train_full(tokenized=tokens_full.outputs["tokenized"], base_model=base_model,
                              max_steps=max_steps, learning_rate=learning_rate, settings=train_settings, **lineage)
            scored_full, registered_full, served_full = judge(full, tokens_full)
        with dsl.Else(name="peft-method"):
            tokens_peft = tokenize_data(dataset=data.outputs["dataset"], base_model=base_model,
                                        max_length=max_length, method=method, model_policy=train_settings)
            peft = train_peft(tokenized=tokens_peft.outputs["tokenized"], base_model=base_model, method=method,
                              max_steps=max_steps, learning_rate=learning_rate, lora_rank=lora_rank,
                              settings=train_settings, **lineage)
            scored_peft, registered_peft, served_peft = judge(peft, tokens_peft)

        place(profile, cpu=[data, skipped, tokens_full, tokens_peft, served_full, served_peft],
              gpu=[full, peft], eval=[scored_full, scored_peft], once=[registered_full, registered_peft])
        return dsl.OneOf(skipped.output, registered_full.output, registered_peft.output)

    return instruction


pipeline = build()
