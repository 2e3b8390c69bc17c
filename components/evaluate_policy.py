from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def evaluate_policy(model: dsl.Input[dsl.Model], reward_model: dsl.Input[dsl.Model], dataset: dsl.Input[dsl.Dataset],
                    base_model: str, model_name: str, pipeline: str, run_id: str, metrics: dsl.Output[dsl.Metrics],
                    report: dsl.Output[dsl.Artifact], settings: dict = {}, reference: dsl.Input[dsl.Model] = None,
                    train_reward_model: dsl.Input[dsl.Model] = None):
    """Tuned policy vs reference vs champion: reward, win rate, KL, task metric, forgetting.

    Args:
        model: Output of ppo or dpo.
        reward_model: Output of reward_model: the judge, never the reward model the policy optimised.
        dataset: Output of ingest on the preference data (held-out prompts and pairs).
        base_model: The reference policy when ``reference`` is not given (DPO starts from it).
        model_name: Registered model whose champion to compare with.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        metrics: KFP metrics shown in the UI.
        report: eval.json with every number and the verdict.
        settings: Further EvaluatePolicyConfig settings by name (validated).
        reference: The SFT policy the candidate started from (RLHF), if any.
        train_reward_model: The reward model the policy optimised (RLHF), if any: reported, never deciding.
    """
    from kubetune.core.config import from_dict, with_named

    from kubetune.stages.evaluate_policy import EvaluatePolicyConfig
    from kubetune.stages.evaluate_policy import evaluate_policy as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(EvaluatePolicyConfig, with_named(settings, {"model_name": model_name}, "evaluate_policy settings"),
                    "evaluate_policy settings")
    result = stage(cfg, model.path, reference.path if reference is not None else base_model, reward_model.path,
                   dataset.path, report.path, ctx=RunContext(model_name, run_id, pipeline),
                   train_reward_model_dir=train_reward_model.path if train_reward_model is not None else None)
    for k, v in result.report.metrics().items():
        metrics.log_metric(k, v)
