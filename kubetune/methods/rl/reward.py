"""The `reward_model` stage's core: a pairwise (Bradley-Terry) reward model with TRL.

A sequence-classification head (one logit) on a pretrained backbone learns
``P(chosen ≻ rejected) = σ(r(x, y_c) - r(x, y_r))`` with TRL's ``RewardTrainer``. Full or
LoRA; a LoRA model is merged before saving so every consumer (PPO, evaluation, the
registry) loads one plain ``AutoModelForSequenceClassification`` checkpoint.

Formatting is the contract between this module, TRL and PPO: when the tokenizer has a chat
template, a pair is scored as the conversation ``[user: prompt, assistant: response]``
rendered by that template (exactly what TRL does with conversational data), so the reward
model sees responses the way the policy's chat-formatted rollouts produce them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kubetune.methods.rl.settings import RewardModelConfig


@dataclass
class RewardModelResult:
    """What `train_reward_model` returns.

    Attributes:
        metrics: Flat floats for MLflow: held-out ``accuracy`` (share of pairs where
            r(chosen) > r(rejected)), ``accuracy_before`` (same with the untrained head,
            the chance baseline), ``margin_mean``/``margin_median`` of r(chosen) - r(rejected),
            ``train_loss``, ``n_train``, ``n_val``.
        margins: Per held-out pair r(chosen) - r(rejected), after training.
        figure: Matplotlib histogram of the margins before vs after training.
    """

    metrics: dict[str, float]
    margins: list[float]
    figure: Any = field(repr=False)


def _conversation(tokenizer, prompt: str, response: str) -> list[dict] | str:
    if tokenizer.chat_template:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    # TRL's non-conversational path: prompt + response + EOS.
    return prompt + response + tokenizer.eos_token


def _to_trl_rows(tokenizer, pairs: list[dict]) -> list[dict]:
    """Foundation preference rows (strings) -> TRL conversational rows when a template exists."""
    if not tokenizer.chat_template:
        return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    return [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in pairs
    ]


def encode_pair(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of one (prompt, response) the way the reward model was trained on them."""
    conv = _conversation(tokenizer, prompt, response)
    if isinstance(conv, list):
        return list(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(conv, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
    """Reward of each (prompt, response): the score head's logit at the last real token.

    Args:
        model: An ``AutoModelForSequenceClassification`` with one label.
        tokenizer: Its tokenizer (pad token set).
        prompts: User prompts.
        responses: Assistant responses, same length as ``prompts``.
        batch_size: Sequences per forward pass.

    Returns:
        One float per pair.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The classification model finds the last non-pad token through config.pad_token_id.
    model.config.pad_token_id = pad_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        ids = [encode_pair(tokenizer, p, r) for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])]
        width = max(len(x) for x in ids)
        # Right padding: the head reads the rightmost non-pad token.
        input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device)
        attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        out.extend(logits[:, 0].float().tolist())
    model.train(was_training)
    return out


def load_reward_model(path: str | Path, device: str | None = None):
    """Load a saved reward model and its tokenizer, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if device:
        model.to(device)
    return model.eval(), tokenizer


class RewardModelScorer:
    """A reward model as the ``reward_fn(prompts, responses) -> scores`` that PPO takes."""

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 16):
        self.model, self.tokenizer = load_reward_model(path, device)
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return score(self.model, self.tokenizer, prompts, responses, self.batch_size)


def pairwise_margins(model, tokenizer, pairs: list[dict]) -> list[float]:
    """r(prompt, chosen) - r(prompt, rejected) for each pair."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = score(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return [c - r for c, r in zip(chosen, rejected)]


def margin_figure(before: list[float], after: list[float]):
    """Histogram of held-out reward margins before and after training."""
    import matplotlib

    matplotlib.use("Agg")  # headless: stages run in containers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo, hi = min(before + after + [0.0]), max(before + after + [0.0])
    bins = torch.linspace(lo, hi + 1e-6, 31).tolist()
    ax.hist(before, bins=bins, alpha=0.5, label="before training")
    ax.hist(after, bins=bins, alpha=0.5, label="after training")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("r(chosen) - r(rejected) on held-out pairs")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    return fig


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def train_reward_model(
    base_path: str | Path,
    train_pairs: list[dict],
    val_pairs: list[dict],
    cfg: RewardModelConfig,
    out_dir: str | Path,
    report_to: str | list[str] = "none",
) -> RewardModelResult:
    """Train a Bradley-Terry reward model on preference pairs and save it.

    Args:
        base_path: Folder of a pretrained causal LM (the backbone; its LM head is dropped
            and a fresh one-logit score head is added).
        train_pairs: ``{"prompt", "chosen", "rejected"}`` rows (strings).
        val_pairs: Held-out rows of the same shape, for accuracy and margins.
        cfg: Stage settings.
        out_dir: Where the model (safetensors, merged if LoRA) and tokenizer are written.
        report_to: Trainer integrations, ``"mlflow"`` inside a pipeline run.

    Returns:
        Metrics, per-pair margins and a margin histogram.
    """
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    if not train_pairs or not val_pairs:
        raise ValueError("train_reward_model needs non-empty train_pairs and val_pairs")
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)  # the score head is initialised at load time
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id

    margins_before = pairwise_margins(model, tokenizer, val_pairs)

    peft_config = None
    if cfg.use_peft:
        from peft import LoraConfig

        # task_type SEQ_CLS makes PEFT train (and save) the new score head in full.
        peft_config = LoraConfig(
            task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
            target_modules=cfg.lora_target_modules,
        )

    with tempfile.TemporaryDirectory() as scratch:
        args = RewardConfig(
            output_dir=scratch,
            per_device_train_batch_size=cfg.batch_size,
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
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(_to_trl_rows(tokenizer, train_pairs)),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        train_output = trainer.train()
        model = trainer.model

    if cfg.use_peft:
        model = model.merge_and_unload()
    model = model.float().eval()
    margins = pairwise_margins(model, tokenizer, val_pairs)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "reward_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    n = len(margins)
    metrics = {
        "accuracy": sum(m > 0 for m in margins) / n,
        "accuracy_before": sum(m > 0 for m in margins_before) / n,
        "margin_mean": sum(margins) / n,
        "margin_median": float(torch.tensor(margins).median()),
        "train_loss": float(train_output.training_loss),
        "n_train": float(len(train_pairs)),
        "n_val": float(n),
    }
    return RewardModelResult(metrics=metrics, margins=margins, figure=margin_figure(margins_before, margins))
