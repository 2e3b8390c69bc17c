"""Policy vs reference on held-out prompts: reward, win rate and KL (RLHF and DPO evaluation).

- Reward: mean score of each policy's sampled responses under the reward (model or callable).
- Win rate: share of prompts where the tuned policy's response outscores the reference's
  (ties count one half), the usual head-to-head summary of RLHF papers.
- KL(π ‖ π_ref): Monte-Carlo estimate ``E_{y~π}[log π(y|x) - log π_ref(y|x)]`` over the
  tuned policy's own samples (summed over tokens, nats per response), the quantity the KL
  penalty of PPO and the β of DPO control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kubetune.methods.rl.ppo_core import logprobs_from_logits


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def _encode_prompts(tok, prompts):
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if tok.chat_template else p
        for p in prompts
    ]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def sample(model, tok, prompts: list[str], max_new_tokens: int, seed: int, greedy: bool = False,
           temperature: float = 1.0):
    """Responses of ``model`` to ``prompts``: (texts, query_response ids, attention mask, prompt length)."""
    from transformers import GenerationConfig

    enc = _encode_prompts(tok, prompts)
    torch.manual_seed(seed)
    gen = GenerationConfig(
        do_sample=not greedy, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    out = model.generate(**enc, generation_config=gen)
    P = enc["input_ids"].shape[1]
    responses = out[:, P:]
    is_eos = responses == tok.eos_token_id
    T = responses.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(responses[:, 0], T - 1))
    resp_mask = (torch.arange(T)[None, :] <= first[:, None]).long()
    responses = torch.where(resp_mask.bool(), responses, torch.full_like(responses, tok.pad_token_id))
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, resp_mask)]
    return texts, torch.cat([enc["input_ids"], responses], 1), torch.cat([enc["attention_mask"], resp_mask], 1), P


@torch.no_grad()
def sequence_logprob(model, query_responses, attention_mask, prompt_length, temperature: float = 1.0) -> torch.Tensor:
    """Summed log-probability of each response (tokens after the prompt) under ``model`` at ``temperature``."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, prompt_length - 1 : -1].float() / temperature
    lp = logprobs_from_logits(logits, query_responses[:, prompt_length:])
    return (lp * attention_mask[:, prompt_length:]).sum(1)


def compare_policies(
    policy_path: str | Path,
    reference_path: str | Path,
    prompts: list[str],
    reward_fn: Callable[[list[str], list[str]], Sequence[float]],
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    samples: int = 0,
    temperature: float = 1.0,
    also: dict[str, Callable[[list[str], list[str]], Sequence[float]]] | None = None,
) -> dict:
    """Head-to-head of a tuned policy against its reference (the SFT policy).

    Args:
        policy_path: Tuned model folder (PPO or DPO output).
        reference_path: SFT model folder.
        prompts: Held-out user prompts.
        reward_fn: ``reward_fn(prompts, responses) -> scores`` (e.g. ``RewardModelScorer``).
        max_new_tokens: Response cap.
        seed: Sampling seed (the same for both policies).
        batch_size: Prompts per generation batch.
        samples: Also return the first this many (prompt, both responses, both scores) as
            ``samples``, rows for an MLflow table.
        temperature: Sampling temperature of both policies (the KL is of the tempered
            distributions, as PPO's penalty is).
        also: Further scorers of the same samples, reported but not deciding the win rate
            (e.g. the reward model the policy was trained against, or a programmatic check).

    Returns:
        ``reward_policy``, ``reward_reference``, ``win_rate`` and ``kl`` (nats per response), and
        ``<name>_policy`` / ``<name>_reference`` (mean scores) for each scorer in ``also``.
    """
    also = also or {}
    extra_sums = {f"{name}_{who}": 0.0 for name in also for who in ("policy", "reference")}
    policy, tok = _load(policy_path)
    reference, _ = _load(reference_path)
    wins, kls, r_pol, r_ref, rows = [], [], [], [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        pol_texts, qr, am, P = sample(policy, tok, batch, max_new_tokens, seed + i, temperature=temperature)
        kls.append(sequence_logprob(policy, qr, am, P, temperature)
                   - sequence_logprob(reference, qr, am, P, temperature))
        ref_texts, *_ = sample(reference, tok, batch, max_new_tokens, seed + i, temperature=temperature)
        sp = [float(s) for s in reward_fn(batch, pol_texts)]
        sr = [float(s) for s in reward_fn(batch, ref_texts)]
        r_pol += sp
        r_ref += sr
        for name, fn in also.items():
            extra_sums[f"{name}_policy"] += sum(float(x) for x in fn(batch, pol_texts))
            extra_sums[f"{name}_reference"] += sum(float(x) for x in fn(batch, ref_texts))
        wins += [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sp, sr)]
        rows += [{"prompt": p, "policy": a, "reference": b, "policy_score": x, "reference_score": y}
                 for p, a, b, x, y in zip(batch, pol_texts, ref_texts, sp, sr)]
    n = len(wins)
    extra = {"samples": rows[:samples]} if samples else {}
    return {
        **extra,
        **{k: v / n for k, v in extra_sums.items()},
        "reward_policy": sum(r_pol) / n,
        "reward_reference": sum(r_ref) / n,
        "win_rate": sum(wins) / n,
        "kl": torch.cat(kls).mean().item(),
    }
