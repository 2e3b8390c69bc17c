"""Pipeline `moa`: ingest, proposers in parallel, aggregate, evaluate, register (Mixture of Agents).

Several distinct models answer the same prompts; an aggregator combines their answers (a
vote with weights fitted on validation data, or an LLM that synthesises them), and the
whole mixture is registered as one MLflow pyfunc model.

Run it locally:   kubetune run moa [--set mode=synthesis --set tune_aggregator=true]
Compile it:       kubetune compile --out build/ [--profile profiles/h200x2.yaml]
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.ops.wiring import place
from kubetune.components import aggregate_moa, evaluate_moa, ingest, propose, register
from kubetune.components import deploy as serve
from kubetune.core.models import DEFAULT_BASE_MODEL

NAME = "moa"
DESCRIPTION = "Mixture of Agents: proposers answer in parallel, an aggregator combines them; served as one model."

# Three distinct proposers from the one packaged model, all offline: the model as it is
# (zero-shot) and two short LoRA runs that differ in steps, rank and seed, so their quality
# differs, which is what fitted vote weights are for. A spec may instead name any model:
# {"name": "served", "model": "http://10.0.0.7:8000", "served_model": "llama"},
# {"name": "prod", "model": "models:/tickets-peft@champion"}.
# Sized for the 15-minute budget on 2 CPU cores: a LoRA step on 2 examples of ~90 tokens
# (rows of 128, so one example per row) costs ~0.15 TFLOP (~2.5 s), and the bundled answers are one
# word, so 8 new tokens suffice. 10 and 20 steps left both LoRA proposers at chance (17%, 23% on
# 5 classes: one answer for everything), too weak for a vote to combine; 30 and 60 steps reached
# 77% and 100% (docs/compare.md, the moa row).
SHORT = {"max_new_tokens": 8}
LORA = {"batch_size": 2, "learning_rate": 2e-3}
DEFAULT_PROPOSERS = [
    {"name": "zero-shot", **SHORT},
    {"name": "lora-30", "train": {**LORA, "max_steps": 30, "lora_rank": 8, "seed": 1}, "max_length": 128, **SHORT},
    {"name": "lora-60", "train": {**LORA, "max_steps": 60, "seed": 2}, "max_length": 128, **SHORT},
]


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def moa(
        base_model: str = DEFAULT_BASE_MODEL,
        data_uri: str = "bundled://moa",
        proposers: list = DEFAULT_PROPOSERS,
        mode: str = "weighted",
        aggregator: str = DEFAULT_BASE_MODEL,
        tune_aggregator: bool = False,
        model_name: str = "moa",
        moa_settings: dict = SHORT,
        eval_settings: dict = {},
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        # A fifth of the rows held out: half fits the aggregator, half scores the mixture.
        data = ingest(data_uri=data_uri, validation_fraction=0.2, **lineage).set_display_name("ingest")
        with dsl.ParallelFor(proposers) as spec:
            answered = propose(dataset=data.outputs["dataset"], spec=spec, base_model=base_model, **lineage)
        mixture = aggregate_moa(answers=dsl.Collected(answered.outputs["answers"]), dataset=data.outputs["dataset"],
                                mode=mode, aggregator=aggregator, tune_aggregator=tune_aggregator,
                                settings=moa_settings, **lineage)
        scored = evaluate_moa(model=mixture.outputs["model"], proposals=mixture.outputs["proposals"],
                              settings=eval_settings, **lineage)
        registered = register(model=mixture.outputs["model"], report=scored.outputs["report"], **lineage)
        with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
            served = serve(registered=registered.output, **lineage)

        place(profile, cpu=[data, served], gpu=[answered, mixture], eval=[scored], once=[registered])
        return registered.output

    return moa


pipeline = build()
