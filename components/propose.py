from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def propose(dataset: dsl.Input[dsl.Dataset], spec: dict, base_model: str, model_name: str, pipeline: str,
            run_id: str, answers: dsl.Output[dsl.Artifact]) -> dict:
    """One proposer of a Mixture of Agents (optionally fine-tuned first) answers the validation split.

    Args:
        dataset: Output of ingest.
        spec: ProposeConfig settings by name: name, model ('' or absent = base_model), train, ...
        base_model: The pipeline's base model (the default 'model').
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        answers: Output folder: answers.jsonl, proposer.json, model/ when trained.

    Returns:
        Answer metrics (tokens and latency per answer) and training metrics when trained.
    """
    from kubetune.core import defaults
    from kubetune.core.config import from_dict
    from kubetune.stages.propose import ProposeConfig
    from kubetune.stages.propose import propose as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(ProposeConfig, {**spec, "model": spec.get("model") or base_model},
                    "proposer spec")
    workspace = defaults.workspace()
    result = stage(cfg, dataset.path, answers.path, workspace, ctx=RunContext(model_name, run_id, pipeline))
    answers.metadata.update(name=cfg.name, kind=result.spec["kind"])
    return result.metrics
