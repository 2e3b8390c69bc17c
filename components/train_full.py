from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def train_full(tokenized: dsl.Input[dsl.Dataset], base_model: str, max_steps: int, learning_rate: float,
               model_name: str, pipeline: str, run_id: str, model: dsl.Output[dsl.Model],
               settings: dict = {}, nodes: int = 1) -> dict:
    """Train every weight with the shared training core.

    Args:
        tokenized: Output of tokenize_data.
        base_model: Base model reference.
        max_steps: Optimizer steps (0 = from the data: TrainConfig.steps_for).
        learning_rate: Peak learning rate (0 = the full-tuning default).
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: model safetensors, tokenizer, manifest.
        settings: Further TrainConfig settings by name (validated).
        nodes: Nodes to train on; above 1 this step launches a Kubeflow Trainer TrainJob.
    """
    import os

    from kubetune.core import defaults
    from kubetune.core.config import from_dict, with_named
    from kubetune.stages.train_full import train_full as stage
    from kubetune.tracking import RunContext
    from kubetune.core.train import TrainConfig

    named = {"base_model": base_model, "max_steps": max_steps, "learning_rate": learning_rate}
    cfg = from_dict(TrainConfig, with_named(settings, named, "train_full settings"), "train_full settings")
    workspace = defaults.workspace()
    os.environ["KUBETUNE_NODES"] = str(nodes)
    result = stage(cfg, tokenized.path, model.path, workspace, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="full", base_model=base_model, **result.metrics)
    return result.metrics
