from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def dpo(dataset: dsl.Input[dsl.Dataset], base_model: str, max_steps: int, learning_rate: float, beta: float,
        model_name: str, pipeline: str, run_id: str, model: dsl.Output[dsl.Model], settings: dict = {}) -> dict:
    """Direct Preference Optimization (TRL DPOTrainer) on preference pairs.

    Args:
        dataset: Output of ingest on preference data (prompt/chosen/rejected).
        base_model: Starting policy, also the reference.
        max_steps: Optimizer steps.
        learning_rate: AdamW learning rate (0 = the method's default).
        beta: β of the DPO loss.
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: the tuned policy (merged), tokenizer, manifest.
        settings: Further DPOConfig settings by name (validated).
    """
    from kubetune.core.config import from_dict, with_named

    from kubetune.stages.dpo import DPOConfig
    from kubetune.stages.dpo import dpo as stage
    from kubetune.tracking import RunContext

    named = {"base_model": base_model, "max_steps": max_steps, "learning_rate": learning_rate, "beta": beta}
    cfg = from_dict(DPOConfig, with_named(settings, named, "dpo settings"), "dpo settings")
    result = stage(cfg, dataset.path, model.path, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="dpo", base_model=base_model, **result.metrics)
    return result.metrics
