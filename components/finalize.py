from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def finalize(run_id: str, status: dsl.PipelineTaskFinalStatus):
    """End the pipeline run's MLflow parent runs with its outcome (the exit handler's step).

    Args:
        run_id: KFP run id (dsl.PIPELINE_JOB_ID_PLACEHOLDER).
        status: The pipeline's final status, filled in by KFP.
    """
    from kubetune.tracking import TAG_PIPELINE_RUN, end_pipeline_runs

    ended = end_pipeline_runs(TAG_PIPELINE_RUN, run_id, status.state)
    print(f"pipeline run {run_id} {status.state}: ended MLflow run(s) {', '.join(ended) or '(none running)'}")
