from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def evaluate_head(model: dsl.Input[dsl.Model], embeddings: dsl.Input[dsl.Dataset], dataset: dsl.Input[dsl.Dataset],
                  model_name: str, pipeline: str, run_id: str, metrics: dsl.Output[dsl.Metrics],
                  report: dsl.Output[dsl.Artifact], settings: dict = {}):
    """Head vs majority-class baseline vs champion: accuracy, macro-F1 and the verdict.

    Args:
        model: Output of train_head.
        embeddings: Output of embed (validation features).
        dataset: Output of ingest (validation texts, for re-running an older champion).
        model_name: Registered model whose champion to compare with.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        metrics: KFP metrics shown in the UI.
        report: eval.json with every number and the verdict.
        settings: Further EvaluateHeadConfig settings by name (validated).
    """
    from kubetune.core.config import from_dict, with_named
    from kubetune.stages.evaluate_head import EvaluateHeadConfig
    from kubetune.stages.evaluate_head import evaluate_head as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(EvaluateHeadConfig, with_named(settings, {"model_name": model_name}, "evaluate_head settings"),
                    "evaluate_head settings")
    result = stage(cfg, model.path, embeddings.path, dataset.path, report.path,
                   ctx=RunContext(model_name, run_id, pipeline))
    for k, v in result.report.metrics().items():
        metrics.log_metric(k, v)
