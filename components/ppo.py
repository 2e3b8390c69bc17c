from kfp import dsl

from kubetune.ops.image import CPU_IMAGE, TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def ppo(policy: dsl.Input[dsl.Model], reward_model: dsl.Input[dsl.Model], steps: int, learning_rate: float,
        model_name: str, pipeline: str, run_id: str, model: dsl.Output[dsl.Model], settings: dict = {}) -> dict:
    """PPO of the SFT policy (LoRA; reference = adapter off) against the reward model.

    Args:
        policy: The SFT policy (a training stage's output; its merged/ model is used).
        reward_model: Output of reward_model.
        steps: PPO updates.
        learning_rate: AdamW learning rate of the adapter and value head.
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: the tuned policy (merged), tokenizer, value head, manifest.
        settings: Further PPOConfig settings by name (validated).
    """
    from kubetune.core.config import from_dict

    from kubetune.stages.ppo import PPOConfig
    from kubetune.stages.ppo import ppo as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(PPOConfig, {**settings, "steps": steps, "learning_rate": learning_rate}, "ppo settings")
    result = stage(cfg, policy.path, reward_model.path, model.path, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="ppo", **result.metrics)
    return result.metrics


# The SFT view of the preference data lives here, next to its only consumer's pipeline step:
# it is a data reshaping step of RLHF, not a stage of its own.
@dsl.component(base_image=CPU_IMAGE)
def preference_sft_data(preferences: dsl.Input[dsl.Dataset], dataset: dsl.Output[dsl.Dataset]) -> str:
    """The SFT view of ingested preference data: prompt -> chosen instruction records.

    Args:
        preferences: Output of ingest on preference data.
        dataset: An ingested instruction dataset (train/validation JSONL, meta.json).

    Returns:
        Its content fingerprint.
    """
    from kubetune.methods.rl.data import chosen_as_instruction

    meta = chosen_as_instruction(preferences.path, dataset.path)
    dataset.metadata.update(shape=meta["shape"], fingerprint=meta["fingerprint"], **meta["counts"])
    return meta["fingerprint"]
