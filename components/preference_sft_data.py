from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def preference_sft_data(preferences: dsl.Input[dsl.Dataset], dataset: dsl.Output[dsl.Dataset]) -> str:
    """The SFT view of ingested preference data: prompt -> chosen instruction records.

    Args:
        preferences: Output of ingest on preference data.
        dataset: An ingested instruction dataset (train/validation JSONL, meta.json).

    Returns:
        Its content fingerprint.
    """
    from kubetune.stages.preference_sft_data import preference_sft_data as stage

    result = stage(preferences.path, dataset.path)
    dataset.metadata.update(shape=result.shape, fingerprint=result.fingerprint, **result.counts)
    return result.fingerprint
