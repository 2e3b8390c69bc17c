"""The `grpo` stage's core: Group Relative Policy Optimization for causal LMs (transformers + PEFT).

GRPO (Shao et al. 2024, DeepSeekMath) drops PPO's value head: each prompt is sampled
``G`` times and a completion's advantage is its reward relative to its own group,
``A_i = (r_i - mean(r)) / (std(r) + 1e-4)`` (or RLOO's leave-one-out baseline,
``A_i = r_i - mean_{j≠i} r_j``, Ahmadian et al. 2024). The loss is PPO's clipped surrogate
with that advantage on every completion token, plus ``β·KL(π ‖ π_ref)`` per token with the k3
estimator, as TRL's ``GRPOTrainer`` (``trl/trainer/grpo_trainer.py``, ``_compute_loss``).

Why our own loop rather than TRL's ``GRPOTrainer``: measured side by side
(bench/grpo_bench.py, docs/performance.md) its step is several times faster on one GPU, mainly
because it samples from a separate copy of the model with the LoRA merged into its weights (one
matmul per layer instead of PEFT's three, no adapter bookkeeping per generated token), refreshed
from the adapter before every rollout, decoding with a static KV cache whose decode step
transformers compiles into a CUDA graph (eager decoding of a small model is bound by kernel
launches), and computes logits only for completion positions. It also checks every reward score
(the row whose reward raised or returned NaN is named), where TRL sums around NaN.

The policy is a LoRA adapter on the starting (SFT) model; the reference is the same model
with the adapter disabled, so no second trainable copy exists (as ``ppo``).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kubetune.methods.rl import ppo_core as core
from kubetune.methods.rl.ppo import _position_ids, _response_mask, endless_batches, eos_ids, save_policy
from kubetune.methods.rl.rewards import RewardSet
from kubetune.methods.rl.settings import PolicySampling


@dataclass
class GRPOConfig(PolicySampling):
    """Settings of the GRPO trainer. Defaults follow TRL's ``GRPOConfig`` where one exists; the
    sampling and adapter fields are PPO's (``PolicySampling``), three with GRPO's own defaults."""

    steps: int = 20
    """Optimizer updates (each: one rollout of prompts_per_step x num_generations completions)."""
    prompts_per_step: int = 4
    """Distinct prompts per rollout."""
    num_generations: int = 8
    """G, completions sampled per prompt (the group); TRL: 8."""
    mini_batch_size: int = 16
    """Completions per forward/backward pass (gradients accumulate over the rollout)."""
    num_iterations: int = 1
    """μ, optimizer updates per rollout; above 1 the ratio to the rollout policy is clipped (TRL: 1)."""
    learning_rate: float = 1e-5
    """AdamW learning rate of the adapter."""
    max_new_tokens: int = 64
    """Completion length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature (TRL: 1.0)."""
    max_prompt_length: int = 512
    """Prompts are left-truncated to this many tokens."""
    beta: float = 0.04
    """β, weight of the per-token k3 KL to the reference (DeepSeekMath: 0.04; TRL now defaults to 0)."""
    epsilon: float = 0.2
    """ε of the clipped surrogate."""
    advantage: str = "grpo"
    """"grpo" (group mean baseline) or "rloo" (leave-one-out baseline)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); False = Dr. GRPO / plain RLOO."""
    loss_type: str = "grpo"
    """"grpo": mean over each completion's tokens, then over completions (the paper);
    "dapo": mean over all tokens of the rollout (TRL's default; long completions weigh more)."""
    merged_generation: bool = True
    """Sample from a copy of the model with the adapter merged in (faster); False = the PEFT model."""
    compiled_generation: bool = True
    """On CUDA, sample from the merged copy with a static KV cache, its decode step compiled into a
    CUDA graph (transformers' generate compiles it for a static cache); ignored on CPU or without
    ``merged_generation``. Eager decoding of a small model is bound by kernel launches, not the GPU."""
    prompt_pad_multiple: int = 64
    """With ``compiled_generation``, prompts are left-padded to a multiple of this many tokens, so
    rollouts share a few cache shapes and the compiled decode step is not rebuilt for each."""
    precision: str = "auto"
    """"auto": bf16 base weights under bf16 autocast on CUDA, fp32 on CPU; "fp32": fp32 everywhere
    (a GPU run then does the CPU's arithmetic); "bf16": bf16 also on CPU."""

    def __post_init__(self):
        self._check_sampling("GRPOConfig")
        for name in ("steps", "prompts_per_step", "num_generations", "mini_batch_size", "num_iterations",
                     "prompt_pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("GRPOConfig.num_generations must be >= 2: a group of one has no relative advantage")
        if self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"GRPOConfig.advantage must be 'grpo' or 'rloo', got {self.advantage!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"GRPOConfig.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.loss_type not in ("grpo", "dapo"):
            raise ValueError(f"GRPOConfig.loss_type must be 'grpo' or 'dapo', got {self.loss_type!r}")
        if self.epsilon <= 0 or self.beta < 0:
            raise ValueError("GRPOConfig: epsilon must be > 0, beta >= 0")


# ---------------------------------------------------------------------------------------
# The arithmetic, as pure functions (tests/test_grpo.py checks them against hand values)


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo",
                     scale: bool = True) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    ``rewards`` holds groups of ``group_size`` consecutive completions of one prompt.

    - grpo: ``A_i = r_i - mean(r)``;
    - rloo: ``A_i = r_i - (Σ_j r_j - r_i) / (G - 1)`` (= ``G/(G-1)·(r_i - mean(r))``);

    then, with ``scale``, divided by the group's (unbiased) std + 1e-4, as TRL's
    ``scale_rewards="group"``. A group whose rewards are all equal gets advantage 0: it
    carries no signal.

    Args:
        rewards: ``(n_prompts * group_size,)`` total rewards.
        group_size: G.
        estimator: ``"grpo"`` or ``"rloo"``.
        scale: Divide by the group std.

    Returns:
        ``(n_prompts * group_size,)`` advantages.
    """
    r = rewards.view(-1, group_size).float()
    if estimator == "grpo":
        adv = r - r.mean(1, keepdim=True)
    elif estimator == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"estimator must be 'grpo' or 'rloo', got {estimator!r}")
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def per_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                   advantages: torch.Tensor, epsilon: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-token loss: ``-min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) + β·k3(π, π_ref)``.

    ``ρ = exp(log π - log π_old)``; with one update per rollout ``π_old = π`` (detached), so
    ``ρ = 1`` and the gradient is ``-A·∇log π``, as in TRL.

    Args:
        logprobs: ``(B, T)`` log π of the completion tokens (with grad).
        old_logprobs: ``(B, T)`` log π at rollout time (no grad).
        ref_logprobs: ``(B, T)`` log π_ref, or None when ``beta`` is 0.
        advantages: ``(B,)`` one advantage per completion.
        epsilon: ε.
        beta: β.

    Returns:
        ``(loss, kl)``, both ``(B, T)`` and unmasked (kl is zeros without a reference).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]
    loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = torch.zeros_like(loss)
    if beta and ref_logprobs is not None:
        kl = core.kl_penalty(logprobs, ref_logprobs, "k3")
        loss = loss + beta * kl
    return loss, kl


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, n_sequences: int | None = None,
                   n_tokens: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    - grpo: ``(1/N)·Σ_i (Σ_t m·l / Σ_t m)``: each completion weighs the same;
    - dapo: ``Σ_i Σ_t m·l / Σ m``: each token weighs the same.

    ``n_sequences`` / ``n_tokens`` are the whole rollout's counts when ``loss`` is one
    micro-batch of it, so the micro-batch losses add up to the rollout's loss.
    """
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        per_seq = (loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return per_seq.sum() / (n_sequences or loss.shape[0])
    if loss_type == "dapo":
        return (loss * mask).sum() / (n_tokens or mask.sum().clamp(min=1.0))
    raise ValueError(f"loss_type must be 'grpo' or 'dapo', got {loss_type!r}")


def selective_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` without materialising the whole log-softmax: ``z_tok - logsumexp(z)``."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


# ---------------------------------------------------------------------------------------
# The trainer


@dataclass
class Example:
    """One training prompt: the chat messages, its reference answer (or None), where it comes from."""

    messages: list[dict]
    reference: str | None
    where: str

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class GRPOResult:
    """What `train_grpo` returns.

    Attributes:
        history: One dict of floats per step (keys listed in `GRPOTrainer.step`).
        samples: Rows ``{"step", "prompt", "completion", "reward"}`` for an MLflow table.
        metrics: Summary: ``reward_first``/``reward_last`` (mean of the first and last 3 steps),
            ``kl_last``, ``seconds``, and the time split ``generate_s``/``logprob_s``/``train_s``.
    """

    history: list[dict[str, float]]
    samples: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    trainer: GRPOTrainer | None = field(default=None, repr=False)


class GRPOTrainer:
    """Rollouts and GRPO updates for one LoRA policy; `train_grpo` is the entry point.

    Args:
        policy_path: Folder of the starting causal LM (the SFT model); also the reference.
        rewards: The weighted rewards.
        cfg: Settings.
    """

    def __init__(self, policy_path: str | Path, rewards: RewardSet, cfg: GRPOConfig):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.rewards = rewards
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # GPU: bf16 base weights with fp32 adapters under autocast (TRL's bf16=True does the same);
        # CPU: fp32 throughout (bf16 matmuls are slower there).
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)

        self.tokenizer = core.rollout_tokenizer(policy_path)

        lm = AutoModelForCausalLM.from_pretrained(policy_path, dtype=self.dtype)
        self.gen_lm = copy.deepcopy(lm).eval().requires_grad_(False).to(self.device) if cfg.merged_generation else None
        # Dropout 0: the rollout and the update must see one function.
        lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=cfg.lora_target_modules)
        self.lm = get_peft_model(lm, lora, autocast_adapter_dtype=True).to(self.device).eval()
        self.params = [p for p in self.lm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, fused=self.device.type == "cuda")
        self.eos_ids = eos_ids(self.tokenizer, lm)
        self._lora_layers = self._map_lora_layers() if self.gen_lm is not None else []
        self.compiled_generation = cfg.compiled_generation and self.gen_lm is not None and self.device.type == "cuda"

    def _map_lora_layers(self):
        """(LoRA layer of the policy, the same Linear of the generation copy) pairs."""
        from peft.tuners.lora import LoraLayer

        gen_modules = dict(self.gen_lm.named_modules())
        embeddings = self.gen_lm.get_input_embeddings().weight
        pairs = []
        for name, module in self.lm.named_modules():
            if isinstance(module, LoraLayer):
                target = gen_modules[name.removeprefix("base_model.model.")]
                if target.weight is embeddings:
                    # An adapted LM head tied to the input embeddings: merging into the shared
                    # tensor would change the embeddings too, so the copy's head gets its own.
                    target.weight = torch.nn.Parameter(embeddings.detach().clone(), requires_grad=False)
                pairs.append((module, target))
        return pairs

    @torch.no_grad()
    def _refresh_generation_weights(self):
        """W_gen = W_base + ΔW_lora for every adapted layer (the base weights themselves never change)."""
        for layer, target in self._lora_layers:
            delta = layer.get_delta_weight("default")
            target.weight.copy_(layer.base_layer.weight + delta.to(layer.base_layer.weight.dtype))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda" and self.dtype == torch.bfloat16)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- pieces ---------------------------------------------------------------------------

    def logprobs(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                 reference: bool = False) -> torch.Tensor:
        """Log-probs of the last ``n_completion`` tokens, at the sampling temperature.

        Only the logits of the completion positions are computed (``logits_to_keep``): the
        prompt's would be ``P × vocab`` floats per row for nothing.
        """
        T = n_completion
        ctx = self.lm.disable_adapter() if reference else nullcontext()
        with ctx, self._autocast():
            logits = self.lm(input_ids=query_responses, attention_mask=attention_mask,
                             position_ids=_position_ids(attention_mask), use_cache=False,
                             logits_to_keep=T + 1).logits
        # Position t predicts token t+1: the completion's T tokens come from the first T of the last T+1.
        logits = logits[:, :-1].float()
        if self.cfg.temperature != 1.0:
            logits = logits / self.cfg.temperature
        return selective_logprobs(logits, query_responses[:, -T:])

    @torch.no_grad()
    def generate(self, examples: list[Example]):
        """Sample ``num_generations`` completions per example; returns ids, masks and texts."""
        from transformers import GenerationConfig

        cfg, tok = self.cfg, self.tokenizer
        texts = [tok.apply_chat_template(e.messages, tokenize=False, add_generation_prompt=True) for e in examples]
        static = self.compiled_generation
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_prompt_length,
                  add_special_tokens=False, pad_to_multiple_of=cfg.prompt_pad_multiple if static else None,
                  ).to(self.device)
        generation_config = GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.eos_ids),
            num_return_sequences=cfg.num_generations,
            **({"cache_implementation": "static"} if static else {}),
        )
        if self.gen_lm is not None:
            self._refresh_generation_weights()
            out = self.gen_lm.generate(**enc, generation_config=generation_config)
        else:
            with self._autocast():
                out = self.lm.generate(**enc, generation_config=generation_config)
        P = enc["input_ids"].shape[1]
        prompt_ids = enc["input_ids"].repeat_interleave(cfg.num_generations, 0)
        prompt_mask = enc["attention_mask"].repeat_interleave(cfg.num_generations, 0)
        completions = out[:, P:]
        mask = _response_mask(completions, self.eos_ids)
        completions = torch.where(mask.bool(), completions, torch.full_like(completions, tok.pad_token_id))
        has_eos = torch.zeros(completions.shape[0], dtype=torch.bool, device=self.device)
        for e in self.eos_ids:
            has_eos |= (completions == e).any(1)
        decoded = [tok.decode([t for t, m in zip(row.tolist(), m_row.tolist()) if m and t not in self.eos_ids],
                              skip_special_tokens=True).strip()
                   for row, m_row in zip(completions, mask)]
        return (torch.cat([prompt_ids, completions], 1), torch.cat([prompt_mask, mask], 1), mask, decoded, has_eos)

    def step(self, examples: list[Example]) -> tuple[dict[str, float], list[dict]]:
        """One GRPO step: sample groups, score, advantages, reference log-probs, μ updates.

        Returns:
            Stats (``reward`` mean, ``reward_std``, ``reward/<name>`` per reward, ``kl`` mean per
            token, ``clipfrac``, ``loss``, ``completion_length``, ``eos_fraction``,
            ``zero_std_fraction`` (groups with no signal), ``generate_s``/``logprob_s``/``train_s``,
            ``generated_tokens``) and the step's completions with their rewards.
        """
        cfg, G = self.cfg, self.cfg.num_generations
        self._sync()
        t0 = time.perf_counter()
        ids, attn, mask, completions, has_eos = self.generate(examples)
        self._sync()
        t1 = time.perf_counter()

        rows = [e for e in examples for _ in range(G)]
        total, per = self.rewards([e.prompt for e in rows], completions, [e.reference for e in rows],
                                  lambda i: rows[i].where)
        rewards = torch.tensor(total, dtype=torch.float32, device=self.device)
        advantages = group_advantages(rewards, G, cfg.advantage, cfg.scale_rewards)

        N, T = mask.shape
        fmask = mask.float()
        n_tokens = fmask.sum().clamp(min=1.0)
        batches = [slice(i, i + cfg.mini_batch_size) for i in range(0, N, cfg.mini_batch_size)]
        with torch.no_grad():
            ref = [self.logprobs(ids[b], attn[b], T, reference=True) for b in batches] if cfg.beta else None
            # With one update per rollout the old policy is the current one: no extra pass.
            old = [self.logprobs(ids[b], attn[b], T) for b in batches] if cfg.num_iterations > 1 else None
        self._sync()
        t2 = time.perf_counter()

        # Statistics stay on the device until the end: a .item() per micro-batch would make the
        # host wait for the GPU before it can queue the next forward.
        zero = torch.zeros((), device=self.device)
        loss_sum, kl_sum, clip_sum = zero.clone(), zero.clone(), zero.clone()
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for k, b in enumerate(batches):
                lp = self.logprobs(ids[b], attn[b], T)
                lp_old = old[k] if old is not None else lp.detach()
                tok_loss, kl = per_token_loss(lp, lp_old, ref[k] if ref else None, advantages[b], cfg.epsilon,
                                              cfg.beta)
                loss = aggregate_loss(tok_loss, fmask[b], cfg.loss_type, n_sequences=N, n_tokens=n_tokens)
                loss.backward()
                with torch.no_grad():
                    loss_sum += loss.detach()
                    ratio = torch.exp(lp.detach() - lp_old)
                    a = advantages[b][:, None]
                    clipped = ((ratio < 1 - cfg.epsilon) & (a < 0)) | ((ratio > 1 + cfg.epsilon) & (a > 0))
                    kl_sum += (kl.detach() * fmask[b]).sum()
                    clip_sum += (clipped.float() * fmask[b]).sum()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
        self._sync()
        t3 = time.perf_counter()
        n_updated = fmask.sum().item() * cfg.num_iterations

        std = rewards.view(-1, G).std(1)
        stats = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            **{f"reward/{name}": sum(v) / len(v) for name, v in per.items()},
            "kl": kl_sum.item() / max(n_updated, 1.0),
            "clipfrac": clip_sum.item() / max(n_updated, 1.0),
            "loss": loss_sum.item() / cfg.num_iterations,
            "completion_length": fmask.sum(1).mean().item(),
            "eos_fraction": has_eos.float().mean().item(),
            "zero_std_fraction": (std < 1e-6).float().mean().item(),
            "generate_s": t1 - t0,
            "logprob_s": t2 - t1,
            "train_s": t3 - t2,
            "generated_tokens": float(fmask.sum().item()),
            "trained_tokens": float(attn.sum().item()) * cfg.num_iterations,
        }
        samples = [{"prompt": r.prompt, "completion": c, "reward": s}
                   for r, c, s in zip(rows, completions, total)]
        return stats, samples

    def save(self, out_dir: str | Path) -> None:
        """Write the policy as a plain causal LM (LoRA merged, fp32) and its tokenizer."""
        save_policy(self.lm, self.tokenizer, out_dir, merge=True)


def train_grpo(
    policy_path: str | Path,
    examples: list[Example],
    rewards: RewardSet,
    cfg: GRPOConfig,
    out_dir: str | Path | None = None,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
) -> GRPOResult:
    """Run GRPO from a starting policy with the given rewards.

    Args:
        policy_path: Folder of the starting (SFT) causal LM; it is also the reference.
        examples: Training prompts with their reference answers.
        rewards: The weighted rewards (references are checked before the first step).
        cfg: Settings.
        out_dir: If given, the merged policy and tokenizer are written there.
        log_fn: Called as ``log_fn(stats, step)`` after every step.

    Returns:
        Per-step history, sample completions and a summary.
    """
    if not examples:
        raise ValueError("train_grpo needs at least one prompt")
    rewards.check_references([e.reference for e in examples], lambda i: examples[i].where)
    trainer = GRPOTrainer(policy_path, rewards, cfg)
    batches = endless_batches(examples, cfg.prompts_per_step, trainer.rng)
    history, samples = [], []
    start = time.time()
    for step in range(cfg.steps):
        stats, step_samples = trainer.step(next(batches))
        stats["seconds"] = time.time() - start
        history.append(stats)
        if log_fn is not None:
            log_fn(stats, step)
        if step in {0, cfg.steps // 2, cfg.steps - 1}:
            samples += [{"step": step, **s} for s in step_samples[: cfg.num_samples_to_log]]
    k = min(3, len(history))
    metrics = {
        "reward_first": sum(h["reward"] for h in history[:k]) / k,
        "reward_last": sum(h["reward"] for h in history[-k:]) / k,
        "kl_last": history[-1]["kl"],
        "seconds": time.time() - start,
        **{key: sum(h[key] for h in history) for key in ("generate_s", "logprob_s", "train_s")},
    }
    if out_dir is not None:
        if trainer.dtype != torch.float32:
            trainer.lm.float()
        trainer.save(out_dir)
    return GRPOResult(history=history, samples=samples, metrics=metrics, trainer=trainer)
