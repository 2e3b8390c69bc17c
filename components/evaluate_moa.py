from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def evaluate_moa(model: dsl.Input[dsl.Model], proposals: dsl.Input[dsl.Artifact], model_name: str, pipeline: str,
                 run_id: str, metrics: dsl.Output[dsl.Metrics], report: dsl.Output[dsl.Artifact],
                 settings: dict = {}):
    """Each proposer alone vs the mixture per mode (accuracy, tokens and latency), and the verdict.

    Args:
        model: Output of aggregate_moa (the mixture).
        proposals: proposals.json from aggregate_moa.
        model_name: Registered model whose champion to compare with.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        metrics: KFP metrics shown in the UI.
        report: eval.json with every row and the verdict.
        settings: Further EvaluateMoAConfig settings by name (validated).
    """
    from kubetune.core.config import from_dict, with_named
    from kubetune.stages.evaluate_moa import EvaluateMoAConfig
    from kubetune.stages.evaluate_moa import evaluate_moa as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(EvaluateMoAConfig, with_named(settings, {"model_name": model_name}, "evaluate_moa settings"),
                    "evaluate_moa settings")
    result = stage(cfg, model.path, proposals.path, report.path, ctx=RunContext(model_name, run_id, pipeline))
    for row in result.report.details["rows"]:
        for k, v in row.items():
            if k != "name" and v is not None:
                metrics.log_metric(f"{row['name'].replace('/', '_')}_{k}", v)
    print(result.report.details["table"], flush=True)  # the comparison, in the task's log
