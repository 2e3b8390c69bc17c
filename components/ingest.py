from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def ingest(data_uri: str, model_name: str, pipeline: str, run_id: str, dataset: dsl.Output[dsl.Dataset],
           unchanged: dsl.OutputPath(bool), validation_fraction: float = 0.1, seed: int = 0,
           group_by: str = "auto", force: bool = False, training: str = "") -> str:
    """Read, validate and split the data; returns its content fingerprint.

    Args:
        data_uri: Path, file://, s3:// URI or saved datasets folder.
        model_name: Registered model name (MLflow experiment and lineage).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage; pass dsl.PIPELINE_JOB_ID_PLACEHOLDER).
        dataset: Output folder with train/validation JSONL and meta.json.
        unchanged: True when the current champion was made by exactly this run: the same data
            and split, training settings and code (and not forced): the pipeline skips the rest
            (see docs/registry.md).
        validation_fraction: Share of rows held out.
        seed: Split seed.
        group_by: Field whose equal values stay on one side of the split ('auto': the records'
            'group' field when they all have one, as the bundled datasets do; '' = row by row).
        force: Retrain even when nothing changed.
        training: The pipeline's model-shaping parameters as text (kubetune.ops.lifecycle.run_settings).
    """
    from kubetune.tracking.registry_ops import skip_decision
    from kubetune.stages.ingest import IngestConfig
    from kubetune.stages.ingest import ingest as stage
    from kubetune.tracking import RunContext

    cfg = IngestConfig(data_uri=data_uri, validation_fraction=validation_fraction, seed=seed,
                       group_by=group_by)
    ctx = RunContext(model_name, run_id, pipeline)
    result = stage(cfg, dataset.path, ctx=ctx)
    same, why = skip_decision(model_name, result.fingerprint, training, force, ctx)
    dataset.metadata.update(shape=result.shape, fingerprint=result.fingerprint, unchanged=same, why=why,
                            **result.counts)
    with open(unchanged, "w") as f:
        f.write("true" if same else "false")
    return result.fingerprint
