from typing import List

from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def aggregate_moa(answers: dsl.Input[List[dsl.Artifact]], dataset: dsl.Input[dsl.Dataset], mode: str,
                  aggregator: str, tune_aggregator: bool, model_name: str, pipeline: str, run_id: str,
                  model: dsl.Output[dsl.Model], proposals: dsl.Output[dsl.Artifact], settings: dict = {}) -> dict:
    """Fit the mixture (vote weights, optionally a tuned aggregator) and save it as one pyfunc model.

    Args:
        answers: The propose tasks' outputs (dsl.Collected over the proposers).
        dataset: Output of ingest (references).
        mode: majority, weighted or synthesis.
        aggregator: Synthesis model reference ('' = none).
        tune_aggregator: LoRA-tune the aggregator on (prompt + proposals -> reference).
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output model folder: the MLflow pyfunc, moa.json, kubetune_method.json.
        proposals: Output proposals.json (every proposer's answers, with the references).
        settings: Further MoAConfig settings by name (validated).

    Returns:
        The fitted weights.
    """
    from kubetune.core import defaults
    from kubetune.core.config import from_dict, with_named
    from kubetune.stages.aggregate_moa import MoAConfig
    from kubetune.stages.aggregate_moa import aggregate_moa as stage
    from kubetune.tracking import RunContext

    named = {"mode": mode, "aggregator": aggregator, "tune_aggregator": tune_aggregator}
    cfg = from_dict(MoAConfig, with_named(settings, named, "aggregate_moa settings"),
                    "moa settings")
    workspace = defaults.workspace()
    result = stage(cfg, [a.path for a in answers], dataset.path, model.path, proposals.path, workspace,
                   ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="moa", mode=mode)
    return result.weights
