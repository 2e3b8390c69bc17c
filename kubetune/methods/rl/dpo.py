"""The `dpo` stage's core: Direct Preference Optimization with TRL's ``DPOTrainer``.

The reward-model-free alternative to reward model + PPO on the same preference pairs
(Rafailov et al. 2023). The policy's implicit reward is
``r(x, y) = β·(log π(y|x) - log π_ref(y|x))``, and DPO raises its margin
``r(x, y_chosen) - r(x, y_rejected)``; we report that margin on held-out pairs before
training (0 by construction: π = π_ref) and after. Full or LoRA; with LoRA the reference
is the adapter-disabled model (no copy), and the adapter is merged before saving so the
output is a plain causal LM like every other training stage's.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from kubetune.methods.rl.reward import _on_cpu, _to_trl_rows
from kubetune.methods.rl.settings import DPOConfig


def train_dpo(
    base_path: str | Path,
    train_pairs: list[dict],
    val_pairs: list[dict],
    cfg: DPOConfig,
    out_dir: str | Path,
    report_to: str | list[str] = "none",
) -> dict[str, float]:
    """Train a policy with DPO on preference pairs and save it (merged) with its tokenizer.

    Args:
        base_path: Folder of the starting causal LM (an instruction-tuned model); it is also
            the reference.
        train_pairs: ``{"prompt", "chosen", "rejected"}`` rows (strings).
        val_pairs: Held-out rows of the same shape.
        cfg: Stage settings.
        out_dir: Where the trained model (safetensors) and tokenizer are written.
        report_to: Trainer integrations, ``"mlflow"`` inside a pipeline run.

    Returns:
        ``margin_before``/``margin_after`` (mean implicit reward margin on held-out pairs),
        ``accuracy_before``/``accuracy_after`` (share of held-out pairs with a positive
        margin), ``chosen_reward_after``, ``rejected_reward_after``, ``train_loss``.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    if not train_pairs or not val_pairs:
        raise ValueError("train_dpo needs non-empty train_pairs and val_pairs")
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    peft_config = None
    ref_model = None
    if cfg.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
            target_modules=cfg.lora_target_modules,
        )
    else:
        # An explicit frozen reference; TRL would otherwise reload it from the hub id in the config.
        ref_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    train_ds = Dataset.from_list(_to_trl_rows(tokenizer, train_pairs))
    val_ds = Dataset.from_list(_to_trl_rows(tokenizer, val_pairs))
    # The NLL term is what moves sampled answers toward the chosen style when DPO starts from a
    # model that was never fine-tuned on them: DPO alone mostly pushes the rejected ones down.
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.sft_weight]} if cfg.sft_weight else {}
    with tempfile.TemporaryDirectory() as scratch:
        args = TRLDPOConfig(
            output_dir=scratch,
            beta=cfg.beta,
            **losses,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            learning_rate=cfg.lr(),
            max_length=cfg.max_length,
            seed=cfg.seed,
            logging_steps=5,
            save_strategy="no",
            eval_strategy="no",
            report_to=report_to,
            # TRL defaults to bf16 + gradient checkpointing; neither helps (or works well) on CPU.
            use_cpu=_on_cpu(),
            bf16=not _on_cpu(),
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=val_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        before = trainer.evaluate()
        train_output = trainer.train()
        after = trainer.evaluate()
        model = trainer.model

    if cfg.use_peft:
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "dpo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return {
        "margin_before": before["eval_rewards/margins"],
        "margin_after": after["eval_rewards/margins"],
        "accuracy_before": before["eval_rewards/accuracies"],
        "accuracy_after": after["eval_rewards/accuracies"],
        "chosen_reward_after": after["eval_rewards/chosen"],
        "rejected_reward_after": after["eval_rewards/rejected"],
        "train_loss": float(train_output.training_loss),
    }
