from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def reward_model(dataset: dsl.Input[dsl.Dataset], base_model: str, max_steps: int, reward_model_name: str,
                 model_name: str, pipeline: str, run_id: str, model: dsl.Output[dsl.Model],
                 report: dsl.Output[dsl.Artifact], settings: dict = {}, pairs: str = "all") -> dict:
    """Train a pairwise (Bradley-Terry) reward model; held-out accuracy vs chance vs champion.

    Args:
        dataset: Output of ingest on preference data (prompt/chosen/rejected).
        base_model: Backbone model reference.
        max_steps: Optimizer steps.
        reward_model_name: Registered reward model whose champion to compare with.
        model_name: Registered policy name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: reward model (safetensors), tokenizer, manifest.
        report: eval.json (pairwise accuracy) for register.
        settings: Further RewardModelConfig settings by name (validated).
        pairs: Training pairs: all, or the prompt-disjoint half 'policy' (optimised) or 'judge' (evaluates).
    """
    from kubetune.core.config import from_dict, with_named

    from kubetune.stages.reward_model import RewardModelConfig
    from kubetune.stages.reward_model import reward_model as stage
    from kubetune.tracking import RunContext

    named = {"base_model": base_model, "max_steps": max_steps, "model_name": reward_model_name, "pairs": pairs}
    cfg = from_dict(RewardModelConfig, with_named(settings, named, "reward_model settings"), "reward_model settings")
    result = stage(cfg, dataset.path, model.path, report.path, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="reward_model", base_model=base_model, **result.metrics)
    return result.metrics
