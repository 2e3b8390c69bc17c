from kfp import dsl

from kubetune.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def tokenize_data(dataset: dsl.Input[dsl.Dataset], base_model: str, max_length: int,
                  tokenized: dsl.Output[dsl.Dataset], packing: bool = True):
    """Tokenize with the chat template, labels on responses only, pack without cross-attention.

    Args:
        dataset: Output of ingest.
        base_model: Model whose tokenizer and chat template to use.
        max_length: Longest example (and packed row), in tokens.
        tokenized: Output datasets folder (train/validation) with meta.json.
        packing: Pack short examples into full rows.
    """
    from kubetune.stages.tokenize_data import TokenizeConfig
    from kubetune.stages.tokenize_data import tokenize_data as stage

    result = stage(TokenizeConfig(base_model=base_model, max_length=max_length, packing=packing), dataset.path,
                   tokenized.path)
    tokenized.metadata.update({f"{split}_{k}": v for split, c in result.counts.items() for k, v in c.items()})
