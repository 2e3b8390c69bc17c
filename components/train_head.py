from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def train_head(embeddings: dsl.Input[dsl.Dataset], head: str, model_name: str, pipeline: str, run_id: str,
               model: dsl.Output[dsl.Model], settings: dict = {}) -> dict:
    """Fit a classification head on the cached embeddings; save the text-classifier model.

    Args:
        embeddings: Output of embed.
        head: linear or mlp.
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: MLflow pyfunc model (raw text -> label) and manifest.
        settings: Further TrainHeadConfig settings by name (validated).
    """
    from kubetune.core.config import from_dict, with_named
    from kubetune.stages.train_head import TrainHeadConfig
    from kubetune.stages.train_head import train_head as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(TrainHeadConfig, with_named(settings, {"head": head}, "train_head settings"), "train_head settings")
    result = stage(cfg, embeddings.path, model.path, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="feature-extraction", head=head, **result.metrics)
    return result.metrics
