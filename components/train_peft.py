from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def train_peft(tokenized: dsl.Input[dsl.Dataset], base_model: str, method: str, max_steps: int,
               learning_rate: float, lora_rank: int, model_name: str, pipeline: str, run_id: str,
               model: dsl.Output[dsl.Model], settings: dict = {}, nodes: int = 1) -> dict:
    """Train a PEFT method (LoRA by default) with the shared training core.

    Args:
        tokenized: Output of tokenize_data.
        base_model: Base model reference.
        method: lora, dora, qlora, adapter, prompt, prefix or ia3.
        max_steps: Optimizer steps (0 = from the data: TrainConfig.steps_for).
        learning_rate: Peak learning rate (0 = the method's default).
        lora_rank: LoRA rank / adapter bottleneck width.
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: adapter safetensors, tokenizer, manifest.
        settings: Further TrainConfig settings by name (validated).
        nodes: Nodes to train on; above 1 this step launches a Kubeflow Trainer TrainJob.
    """
    import os

    from kubetune.core import defaults
    from kubetune.core.config import from_dict, with_named
    from kubetune.stages.train_peft import train_peft as stage
    from kubetune.tracking import RunContext
    from kubetune.core.train import TrainConfig

    named = {"base_model": base_model, "method": method, "max_steps": max_steps, "learning_rate": learning_rate,
             "lora_rank": lora_rank}
    cfg = from_dict(TrainConfig, with_named(settings, named, "train_peft settings"), "train_peft settings")
    workspace = defaults.workspace()
    os.environ["KUBETUNE_NODES"] = str(nodes)
    result = stage(cfg, tokenized.path, model.path, workspace, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method=method, base_model=base_model, **result.metrics)
    return result.metrics
