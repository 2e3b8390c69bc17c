from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def evaluate(model: dsl.Input[dsl.Model], dataset: dsl.Input[dsl.Dataset], tokenized: dsl.Input[dsl.Dataset],
             base_model: str, model_name: str, pipeline: str, run_id: str, metrics: dsl.Output[dsl.Metrics],
             report: dsl.Output[dsl.Artifact], card: dsl.Output[dsl.Markdown], settings: dict = {},
             model_policy: dict = {}, reference: dsl.Input[dsl.Model] = None):
    """Candidate vs base vs champion: loss, task metric, forgetting, and the verdict.

    Args:
        model: Output of a training stage.
        dataset: Output of ingest (references).
        tokenized: Output of tokenize_data (validation rows).
        base_model: Base model reference.
        model_name: Registered model whose champion to compare with.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        metrics: KFP metrics shown in the UI.
        report: eval.json with every number and the verdict.
        card: The evaluation card (candidate vs base vs champion, samples, verdict) the KFP UI shows.
        settings: Further EvaluateConfig settings by name (validated).
        model_policy: The run's loading policy: trust_remote_code and allow_pickle of train_settings.
        reference: The model the candidate started from (an SFT policy before RL), compared in place
            of base_model when given.
    """
    from dataclasses import asdict
    from pathlib import Path

    from kubetune.core.config import from_dict
    from kubetune.lib.eval_card import render
    from kubetune.core.models import LoadPolicy
    from kubetune.stages.evaluate import EvaluateConfig
    from kubetune.stages.evaluate import evaluate as stage
    from kubetune.tracking import RunContext

    if reference is not None:
        from kubetune.methods.rl.data import policy_folder

        base_model = policy_folder(reference.path)
    cfg = from_dict(EvaluateConfig, {**settings, **asdict(LoadPolicy.from_settings(model_policy)),
                                     "base_model": base_model, "model_name": model_name}, "evaluate settings")
    result = stage(cfg, model.path, dataset.path, tokenized.path, report.path,
                   ctx=RunContext(model_name, run_id, pipeline))
    Path(card.path).write_text(render(result.report))
    for k, v in result.report.metrics().items():
        metrics.log_metric(k, v)
