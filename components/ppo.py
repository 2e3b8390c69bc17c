from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def ppo(policy: dsl.Input[dsl.Model], reward_model: dsl.Input[dsl.Model], preferences: dsl.Input[dsl.Dataset],
        steps: int, learning_rate: float,
        model_name: str, pipeline: str, run_id: str, model: dsl.Output[dsl.Model], settings: dict = {}) -> dict:
    """PPO of the SFT policy (LoRA; reference = adapter off) against the reward model.

    Args:
        policy: The SFT policy (a training stage's output; its merged/ model is used).
        reward_model: Output of reward_model.
        preferences: The ingested preference data: rollouts leave out its held-out prompts and topics.
        steps: PPO updates.
        learning_rate: AdamW learning rate of the adapter and value head.
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: the tuned policy (merged), tokenizer, value head, manifest.
        settings: Further PPOConfig settings by name (validated).
    """
    from kubetune.core.config import from_dict, with_named

    from kubetune.stages.ppo import PPOConfig
    from kubetune.stages.ppo import ppo as stage
    from kubetune.tracking import RunContext

    named = {"steps": steps, "learning_rate": learning_rate}
    cfg = from_dict(PPOConfig, with_named(settings, named, "ppo settings"), "ppo settings")
    result = stage(cfg, policy.path, reward_model.path, model.path, ctx=RunContext(model_name, run_id, pipeline),
                   preferences_dir=preferences.path)
    model.metadata.update(method="ppo", **result.metrics)
    return result.metrics

