"""Pipeline `feature-extraction`: transfer learning with a frozen backbone.

ingest (text/label rows), embed (the backbone runs once; pooled embeddings cached as an
artifact), train_head (linear or small MLP head on the cached features), evaluate_head
(accuracy / macro-F1 vs the majority-class baseline and the champion), register (an MLflow
pyfunc model: raw text in, labels out). The backbone is an encoder (``minilm-l6-v2``, the
default) or a decoder LLM (``smollm2-135m-instruct``, with ``pooling=last`` or ``mean``).

Run it locally:   kubetune run feature-extraction [--set base_model=smollm2-135m-instruct --set head=mlp]
Compile it:       kubetune compile feature-extraction --out build/ [--profile profiles/h200x2.yaml]
Use the model:    mlflow.pyfunc.load_model("models:/reviews-head@champion").predict(["Great blender!"])
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.ops.lifecycle import run_settings
from kubetune.ops.wiring import place, unless_unchanged
from kubetune.components import embed, evaluate_head, ingest, register, train_head
from kubetune.components import deploy as serve

NAME = "feature-extraction"
DESCRIPTION = "Frozen backbone (encoder or LLM) + trained classification head; registers a text-to-label model."


def build(profile: "kube.Profile | None" = None):
    """The pipeline, with the cluster profile's resources applied to its tasks (None = none)."""

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def feature_extraction(
        base_model: str = "minilm-l6-v2",
        data_uri: str = "bundled://reviews",
        pooling: str = "mean",
        head: str = "linear",
        model_name: str = "reviews-head",
        embed_settings: dict = {},
        train_settings: dict = {},
        eval_settings: dict = {},
        register_settings: dict = {},
        force: bool = False,
        deploy: bool = False,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        lineage = dict(model_name=model_name, pipeline=NAME, run_id=run_id)

        data = ingest(data_uri=data_uri, force=force, training=run_settings(
            base_model=base_model, pooling=pooling, head=head, embed_settings=embed_settings,
            train_settings=train_settings), **lineage).set_display_name("ingest")
        with unless_unchanged(data, **lineage) as run:
            features = embed(dataset=data.outputs["dataset"], base_model=base_model, pooling=pooling,
                             settings=embed_settings, **lineage)
            trained = train_head(embeddings=features.outputs["embeddings"], head=head, settings=train_settings,
                                 **lineage)
            scored = evaluate_head(model=trained.outputs["model"], embeddings=features.outputs["embeddings"],
                                   dataset=data.outputs["dataset"], settings=eval_settings, **lineage)
            registered = register(model=trained.outputs["model"], report=scored.outputs["report"],
                                  settings=register_settings, **lineage)
            with dsl.If(deploy == True, name="deploy"):  # noqa: E712 - a KFP condition
                served = serve(registered=registered.output, **lineage)

        # The head trains in seconds on the CPU; only the backbone pass wants an accelerator.
        place(profile, cpu=[data, trained, scored, run.skipped, served], eval=[features], once=[registered])
        return dsl.OneOf(registered.output, run.skipped.output)

    return feature_extraction


pipeline = build()
