from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def tokenize_data(dataset: dsl.Input[dsl.Dataset], base_model: str, max_length: int,
                  tokenized: dsl.Output[dsl.Dataset], packing: bool = True, model_policy: dict = {},
                  method: str = ""):
    """Tokenize with the chat template, labels on responses only, pack without cross-attention.

    Args:
        dataset: Output of ingest.
        base_model: Model whose tokenizer and chat template to use.
        max_length: Longest example (and packed row), in tokens.
        tokenized: Output datasets folder (train/validation) with meta.json.
        packing: Pack short examples into full rows.
        model_policy: The run's loading policy: trust_remote_code of train_settings.
        method: Training method the rows are for ('' = any); prompt and prefix tuning cannot
            train on packed rows, so packing is off for them.
    """
    from kubetune.core.models import LoadPolicy
    from kubetune.stages.tokenize_data import TokenizeConfig
    from kubetune.stages.tokenize_data import tokenize_data as stage

    policy = LoadPolicy.from_settings(model_policy)
    result = stage(TokenizeConfig(base_model=base_model, max_length=max_length, packing=packing,
                                  trust_remote_code=policy.trust_remote_code, method=method),
                   dataset.path, tokenized.path)
    tokenized.metadata.update({f"{split}_{k}": v for split, c in result.counts.items() for k, v in c.items()})
