from kfp import dsl

from kubetune.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def ingest(data_uri: str, model_name: str, pipeline: str, run_id: str, dataset: dsl.Output[dsl.Dataset],
           validation_fraction: float = 0.1, seed: int = 0) -> str:
    """Read, validate and split the data; returns its content fingerprint.

    Args:
        data_uri: Path, file://, s3:// URI or saved datasets folder.
        model_name: Registered model name (MLflow experiment and lineage).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage; pass dsl.PIPELINE_JOB_ID_PLACEHOLDER).
        dataset: Output folder with train/validation JSONL and meta.json.
        validation_fraction: Share of rows held out.
        seed: Split seed.
    """
    from kubetune.stages.ingest import IngestConfig
    from kubetune.stages.ingest import ingest as stage
    from kubetune.tracking import RunContext

    cfg = IngestConfig(data_uri=data_uri, validation_fraction=validation_fraction, seed=seed)
    result = stage(cfg, dataset.path, ctx=RunContext(model_name, run_id, pipeline))
    dataset.metadata.update(shape=result.shape, fingerprint=result.fingerprint, **result.counts)
    return result.fingerprint
