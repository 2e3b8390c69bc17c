"""Model passes that score a trained model: load it, generate answers, measure loss and perplexity.

Shared by the evaluation stages, the served pyfunc (a served model answers exactly as the
evaluated one did) and the Mixture-of-Agents proposers. In ``core`` rather than ``lib``: loading
and collating need the training core (``core.models``, ``core.peft_methods``, ``core.train``).
"""

from __future__ import annotations

import math
from pathlib import Path

from kubetune.core.models import DEFAULT_BASE_MODEL

# Forgetting is measured as perplexity on this text, bundled with kubetune (one passage a line).
GENERAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "general_text.txt"


def general_text() -> list[str]:
    """The bundled general text, one non-empty line each."""
    return [line.strip() for line in GENERAL_TEXT.read_text().splitlines() if line.strip()]


def validation_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean next-token loss over all label tokens of the (packed) validation rows."""
    import torch

    from kubetune.core.train import PackedCollator

    collate = PackedCollator(pad_id)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(rows[i:i + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = model(**batch)
            total += float(out.loss) * n
            count += n
    return total / max(count, 1)


def line_losses(model, tok, texts: list[str], batch_size: int) -> tuple[list[float], list[int]]:
    """Summed next-token loss and predicted-token count of each text (their pooled ratio is the
    log-perplexity); per line, so two models can be compared line by line (``kubetune.lib.stats``)."""
    import torch
    import torch.nn.functional as F

    from kubetune.core.train import PackedCollator

    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))})
    collate = PackedCollator(tok.pad_token_id)
    device = next(model.parameters()).device
    sums, counts = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(rows[i:i + batch_size]).items()}
            labels = batch.pop("labels")
            # Prompt tuning returns logits for its virtual tokens too, in front: keep the text's.
            logits = model(**batch).logits[:, -labels.shape[1]:-1].float()
            target = labels[:, 1:]
            loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
            sums += loss.sum(1).tolist()
            counts += (target != -100).sum(1).tolist()
    return sums, counts


def text_perplexity(model, tok, texts: list[str], batch_size: int) -> float:
    """Perplexity over all ``texts`` pooled: exp of the mean next-token loss of every token."""
    sums, counts = line_losses(model, tok, texts, batch_size)
    return math.exp(sum(sums) / max(sum(counts), 1))


def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to chat prompts (left-padded batches)."""
    import torch

    from kubetune.lib.progress import progress

    tok.padding_side = "left"
    device = next(model.parameters()).device
    # PEFT's own generate is wrong for both prompt-learning methods under transformers 5, so both
    # decode through the base model, whose own cached generate is right (each checked against
    # greedy decoding by full forward passes, tests/test_peft_methods.py):
    # - prompt tuning with the cache: a prompt-tuned SmolLM2 answered '{"productProduct,' where
    #   full forward passes give '{"product": "printer", ...}'. Here the virtual tokens go in as
    #   the base model's input embeddings.
    # - prefix tuning without the cache: a trained prefix answered
    #   '{"product:' on every left-padded batch row, and other tokens than its own forward passes
    #   even alone. Here the prefix is the base model's KV cache, behind n placeholder ids that
    #   the attention mask counts (so generate starts after the cache and positions follow it).
    peft_type = getattr(getattr(getattr(model, "active_peft_config", None), "peft_type", None), "value", "")
    outs = []
    for i in progress(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in prompts[i:i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
        n = enc["input_ids"].shape[0]
        if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
            # both put k virtual positions in front of the prompt, which the mask must count
            k = model.active_peft_config.num_virtual_tokens
            mask = torch.cat([torch.ones(n, k, dtype=enc["attention_mask"].dtype, device=device),
                              enc["attention_mask"]], 1)
        with torch.no_grad():
            if peft_type == "PROMPT_TUNING":
                virtual = model.get_prompt(batch_size=n).to(model.get_input_embeddings().weight.dtype)
                embeds = torch.cat([virtual, model.get_input_embeddings()(enc["input_ids"])], 1)
                # With inputs_embeds only, generate returns just the new tokens.
                gen = model.get_base_model().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            elif peft_type == "PREFIX_TUNING":
                ids = torch.cat([torch.full((n, k), tok.pad_token_id, dtype=enc["input_ids"].dtype, device=device),
                                 enc["input_ids"]], 1)
                gen = model.get_base_model().generate(input_ids=ids, attention_mask=mask,
                                                      past_key_values=model.get_prompt(batch_size=n), **kwargs)
                gen = gen[:, ids.shape[1]:]
            else:
                gen = model.generate(**enc, **kwargs)
                gen = gen[:, enc["input_ids"].shape[1]:]
        outs += tok.batch_decode(gen, skip_special_tokens=True)
    return [o.strip() for o in outs]


def load_model_artifact(model_dir: str | Path, policy: "models.LoadPolicy | None" = None):
    """Load a trained model folder (any method) onto its base model, in eval mode.

    Args:
        model_dir: A folder a training stage wrote.
        policy: The run's loading policy (default: no remote code, no pickles).
    """
    from kubetune.core import models
    from kubetune.core.peft_methods import load_trained, read_manifest

    policy = policy or models.LoadPolicy()
    manifest = read_manifest(model_dir)
    models.check_weights(str(model_dir), allow_pickle=policy.allow_pickle)
    if (Path(model_dir) / "config.json").exists():
        # A whole model (full fine-tuning, an upcycled MoE, a merged policy): load it as it is.
        return models.load_causal_lm(str(model_dir), device=models.pick_device(), **policy.kwargs()).eval()
    base = manifest.get("base_model") or DEFAULT_BASE_MODEL
    return load_trained(models.resolve(base), model_dir, **policy.kwargs()).to(models.pick_device()).eval()
