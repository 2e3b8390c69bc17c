from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def grpo(dataset: dsl.Input[dsl.Dataset], base_model: str, steps: int, learning_rate: float, rewards: str,
         model_name: str, pipeline: str, run_id: str, model: dsl.Output[dsl.Model], settings: dict = {},
         policy: dsl.Input[dsl.Model] = None) -> dict:
    """GRPO of a policy (LoRA; reference = adapter off) with verifiable rewards and/or a reward model.

    Args:
        dataset: Output of ingest: training prompts and their reference answers.
        base_model: The starting policy when ``policy`` is not given.
        steps: GRPO steps.
        learning_rate: AdamW learning rate of the adapter.
        rewards: Weighted rewards, e.g. "json_fields:1.0,format:0.2".
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: the tuned policy (merged), tokenizer, manifest.
        settings: Further GRPOConfig settings by name (validated).
        policy: The SFT policy to start from (a training stage's output; its merged/ model is used).
    """
    from kubetune.core.config import from_dict, with_named

    from kubetune.stages.grpo import GRPOConfig
    from kubetune.stages.grpo import grpo as stage
    from kubetune.tracking import RunContext

    named = {"steps": steps, "learning_rate": learning_rate, "rewards": rewards}
    cfg = from_dict(GRPOConfig, with_named(settings, named, "grpo settings"),
                    "grpo settings")
    start = policy.path if policy is not None else base_model
    result = stage(cfg, start, dataset.path, model.path, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="grpo", **result.metrics)
    return result.metrics
