from kfp import dsl

from kubetune.ops.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def train_moe(tokenized: dsl.Input[dsl.Dataset], base_model: str, num_experts: int, top_k: int, kind: str,
              max_steps: int, learning_rate: float, model_name: str, pipeline: str, run_id: str,
              model: dsl.Output[dsl.Model], settings: dict = {}) -> dict:
    """Upcycle the base model into a Mixture of Experts and train its experts and routers (experimental).

    Args:
        tokenized: Output of tokenize_data.
        base_model: Base model reference (a Llama, Mistral, Qwen2 or Qwen3 decoder).
        num_experts: Experts per upcycled MLP block.
        top_k: Experts each token is routed to (at least 2).
        kind: experts (full experts) or lora (LoRA experts on the frozen MLP).
        max_steps: Optimizer steps.
        learning_rate: Peak learning rate (0 = the kind's default).
        model_name: Registered model name (MLflow experiment).
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        model: Output folder: the whole MoE model (safetensors), tokenizer, manifest, utilisation.
        settings: Further MoEConfig and TrainConfig settings by name (validated).
    """
    from kubetune.core.config import with_named
    from kubetune.core import defaults
    from kubetune.stages.train_moe import moe_config_from_dict
    from kubetune.stages.train_moe import train_moe as stage
    from kubetune.tracking import RunContext

    named = {"base_model": base_model, "num_experts": num_experts, "top_k": top_k, "kind": kind,
             "max_steps": max_steps, "learning_rate": learning_rate}
    cfg = moe_config_from_dict(with_named(settings, named, "train_moe settings"))
    workspace = defaults.workspace()
    result = stage(cfg, tokenized.path, model.path, workspace, ctx=RunContext(model_name, run_id, pipeline))
    model.metadata.update(method="moe", kind=kind, base_model=base_model, **result.metrics)
    return result.metrics
