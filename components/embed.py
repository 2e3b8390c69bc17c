from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def embed(dataset: dsl.Input[dsl.Dataset], base_model: str, pooling: str, model_name: str, pipeline: str,
          run_id: str, embeddings: dsl.Output[dsl.Dataset], settings: dict = {}):
    """Run the frozen backbone once over the data; cache the pooled embeddings.

    Args:
        dataset: Output of ingest (text/label records).
        base_model: Backbone: an encoder (minilm-l6-v2) or a decoder LLM.
        pooling: mean or last (token).
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        embeddings: Output folder: features.safetensors and meta.json.
        settings: Further EmbedConfig settings by name (validated).
    """
    from kubetune.core.config import from_dict, with_named
    from kubetune.stages.embed import EmbedConfig
    from kubetune.stages.embed import embed as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(EmbedConfig, with_named(settings, {"base_model": base_model, "pooling": pooling}, "embed settings"),
                    "embed settings")
    result = stage(cfg, dataset.path, embeddings.path, ctx=RunContext(model_name, run_id, pipeline))
    embeddings.metadata.update(dim=result.meta["dim"], labels=result.meta["labels"], **result.meta["counts"])
