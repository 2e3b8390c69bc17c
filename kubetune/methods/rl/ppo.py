"""The `ppo` stage's core: a compact PPO trainer for causal LMs on transformers + PEFT.

Why our own: TRL removed its PPO trainer in 1.13 and a frozen old TRL is not an option for
the project, so the ~300 lines below carry the established recipe, following TRL's
``trl/trainer/ppo_trainer.py`` (the 0.x trainer and the PPOv2 rewrite, both before 1.13):

1. Rollout: sample a response per prompt with ``generate`` (pure sampling: top-k 0, top-p 1,
   so the sampled tokens come from exactly the distribution whose log-probs we compute).
2. Score each response with the reward (a reward model or any Python callable) once, at
   its end; subtract ``β·KL`` to the reference on every token (`ppo_core.per_token_rewards`).
3. Values from a value head; advantages by GAE, whitened; returns as value targets.
4. A few PPO epochs over shuffled minibatches of the rollout with the clipped policy and
   value losses; the KL coefficient adapts toward a target (Ziegler et al.) or stays fixed.

The policy is a LoRA adapter on the SFT model; the reference is the same model with the
adapter disabled (``PeftModel.disable_adapter``), which saves a whole model copy, as TRL's
PPO did for PEFT models (``ref_model=None`` + ``null_ref_context``). The value head is a
linear layer on the policy's last hidden state (TRL 0.x ``AutoModelForCausalLMWithValueHead``),
trained jointly with a small value-loss weight. ``use_peft=False`` trains the whole policy
against a frozen deep copy instead.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kubetune.methods.rl import ppo_core as core
from kubetune.methods.rl.settings import PPOConfig

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""``reward_fn(prompts, responses) -> one score per response``."""


@dataclass
class PPOResult:
    """What `train_ppo` returns.

    Attributes:
        history: One dict of floats per update (keys listed in `PPOTrainer.step`).
        samples: Rows ``{"update", "prompt", "response", "score"}`` for an MLflow table.
        metrics: Summary: ``reward_first``/``reward_last`` (mean score of the first and of
            the last update), ``kl_last``, ``seconds``.
    """

    history: list[dict[str, float]]
    samples: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    trainer: PPOTrainer | None = field(default=None, repr=False)
    """The live trainer, for callers (tests, evaluation) that need the policy in memory."""


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value per position read off its last hidden state."""

    def __init__(self, lm: nn.Module, hidden_size: int):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(hidden_size, 1)
        # PPOv2's layer_init for the value head: small weights so early values are near 0.
        nn.init.normal_(self.v_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=True, use_cache=False,
        )
        values = self.v_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits, values


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO needs about them (no grad)."""

    query_responses: torch.Tensor  # (B, P + T) prompt (left-padded) + response
    attention_mask: torch.Tensor  # (B, P + T) 0 on prompt padding and after EOS
    response_mask: torch.Tensor  # (B, T) 1 on response tokens up to and including EOS
    logprobs: torch.Tensor  # (B, T)
    ref_logprobs: torch.Tensor  # (B, T)
    values: torch.Tensor  # (B, T)
    scores: torch.Tensor  # (B,)
    prompts: list[str]
    responses: list[str]

    @property
    def prompt_length(self) -> int:
        return self.query_responses.shape[1] - self.response_mask.shape[1]


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # generate() counts positions from the first real (non-left-pad) token; the training
    # forward must do the same or the log-probs would not match the sampling distribution.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _response_mask(responses: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row; all 1 if there is none."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= responses == e
    T = responses.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(responses[:, 0], T - 1))
    return (torch.arange(T, device=responses.device)[None, :] <= first_eos[:, None]).long()


class PPOTrainer:
    """Rollouts and PPO updates for one policy; `train_ppo` is the stage entry point.

    Args:
        policy_path: Folder of the SFT (instruction-tuned) causal LM.
        reward_fn: ``reward_fn(prompts, responses) -> scores``.
        cfg: Settings.
    """

    def __init__(self, policy_path: str | Path, reward_fn: RewardFn, cfg: PPOConfig):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.reward_fn = reward_fn
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)

        self.tokenizer = core.rollout_tokenizer(policy_path)

        lm = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        self.ref_lm = None
        if cfg.use_peft:
            from peft import LoraConfig, get_peft_model

            # Dropout 0: the first PPO epoch must reproduce the rollout's log-probs (ratio 1).
            lora = LoraConfig(
                task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                target_modules=cfg.lora_target_modules,
            )
            lm = get_peft_model(lm, lora)
        else:
            self.ref_lm = copy.deepcopy(lm).eval().requires_grad_(False).to(self.device)
        self.policy = PolicyWithValueHead(lm, lm.config.get_text_config().hidden_size).to(self.device)
        # Eval mode throughout: no dropout anywhere, so rollout and update see one function.
        self.policy.eval()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad], lr=cfg.learning_rate, eps=1e-5
        )
        self.kl_ctl = (
            core.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.adaptive_kl
            else core.FixedKLController(cfg.kl_coef)
        )
        self.eos_ids = eos_ids(self.tokenizer, lm)


    # -- pieces ---------------------------------------------------------------------------

    def format_prompt(self, prompt: str) -> str:
        """The policy's input for a user prompt: its chat template with the assistant turn open."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def _reference(self):
        """Context in which ``self.policy.lm`` computes the reference distribution."""
        return self.policy.lm.disable_adapter() if self.ref_lm is None else nullcontext()

    def _logprobs_values(self, lm_forward, query_responses, attention_mask, prompt_length):
        """Log-probs of the response tokens (at the sampling temperature), logits and values."""
        logits, values = lm_forward(query_responses, attention_mask, _position_ids(attention_mask))
        # Position t predicts token t+1: the response's T tokens are predicted by P-1 .. P+T-2.
        logits = logits[:, prompt_length - 1 : -1].float() / self.cfg.temperature
        responses = query_responses[:, prompt_length:]
        return core.logprobs_from_logits(logits, responses), logits, values[:, prompt_length - 1 : -1]

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Rollout:
        """Sample, score and evaluate one batch of responses under policy, reference and value head."""
        from transformers import GenerationConfig

        cfg, tok = self.cfg, self.tokenizer
        enc = tok(
            [self.format_prompt(p) for p in prompts], return_tensors="pt", padding=True, truncation=True,
            max_length=cfg.max_prompt_length, add_special_tokens=False,
        ).to(self.device)
        generation_config = GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.eos_ids),
        )
        query_responses = self.policy.lm.generate(**enc, generation_config=generation_config)
        P = enc["input_ids"].shape[1]
        responses = query_responses[:, P:]
        response_mask = _response_mask(responses, self.eos_ids)
        # Tokens after EOS are padding: pad them so they are neither attended nor decoded.
        responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, tok.pad_token_id))
        query_responses = torch.cat([enc["input_ids"], responses], 1)
        attention_mask = torch.cat([enc["attention_mask"], response_mask], 1)

        logprobs, _, values = self._logprobs_values(self.policy, query_responses, attention_mask, P)
        with self._reference():
            ref_lm = self.policy.lm if self.ref_lm is None else self.ref_lm
            ref_logits = ref_lm(
                input_ids=query_responses, attention_mask=attention_mask,
                position_ids=_position_ids(attention_mask), use_cache=False,
            ).logits
        ref_logprobs = core.logprobs_from_logits(ref_logits[:, P - 1 : -1].float() / cfg.temperature, responses)

        texts = [
            tok.decode([t for t, m in zip(row.tolist(), mask.tolist()) if m and t not in self.eos_ids],
                       skip_special_tokens=True)
            for row, mask in zip(responses, response_mask)
        ]
        scores = torch.tensor([float(s) for s in self.reward_fn(prompts, texts)], device=self.device)
        if cfg.missing_eos_penalty is not None:
            has_eos = torch.zeros_like(scores, dtype=torch.bool)
            for e in self.eos_ids:
                has_eos |= (responses == e).any(1)
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        mask = response_mask.float()
        return Rollout(query_responses, attention_mask, response_mask, logprobs * mask, ref_logprobs * mask,
                       values * mask, scores, list(prompts), texts)

    def step(self, prompts: list[str]) -> tuple[dict[str, float], Rollout]:
        """One PPO update: rollout, rewards, GAE, then ``ppo_epochs`` passes of minibatch steps.

        Returns:
            Stats (``reward`` mean score, ``reward_std``, ``kl`` mean summed KL per response,
            ``kl_coef``, ``non_score_reward``, ``entropy`` mean per-token entropy,
            ``clipfrac``, ``value_clipfrac``, ``policy_loss``, ``value_loss``, ``approx_kl``
            (old vs new policy), ``response_length``, ``eos_fraction``) and the rollout.
        """
        cfg = self.cfg
        ro = self.rollout(prompts)
        mask = ro.response_mask.float()
        P = ro.prompt_length

        with torch.no_grad():
            kl = core.kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * mask
            rewards, non_score = core.per_token_rewards(ro.scores, kl, mask, self.kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = core.masked_whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = core.compute_gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
            advantages = core.masked_whiten(advantages, mask) * mask

        keys = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "entropy", "approx_kl")
        stats: dict[str, list[float]] = {k: [] for k in keys}
        B = ro.scores.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B)
            for start in range(0, B, cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size]
                mb_mask = mask[idx]
                new_logprobs, logits, vpred = self._logprobs_values(
                    self.policy, ro.query_responses[idx], ro.attention_mask[idx], P
                )
                pg_loss, clipfrac = core.clipped_policy_loss(
                    new_logprobs, ro.logprobs[idx], advantages[idx], mb_mask, cfg.cliprange
                )
                vf_loss, vf_clipfrac = core.clipped_value_loss(
                    vpred, ro.values[idx], returns[idx], mb_mask, cfg.cliprange_value
                )
                loss = pg_loss + cfg.vf_coef * vf_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad], cfg.max_grad_norm
                )
                self.optimizer.step()
                with torch.no_grad():
                    stats["policy_loss"].append(pg_loss.item())
                    stats["value_loss"].append(vf_loss.item())
                    stats["clipfrac"].append(clipfrac.item())
                    stats["value_clipfrac"].append(vf_clipfrac.item())
                    stats["entropy"].append(core.masked_mean(core.entropy_from_logits(logits), mb_mask).item())
                    diff = new_logprobs - ro.logprobs[idx]
                    stats["approx_kl"].append(core.masked_mean(0.5 * diff**2, mb_mask).item())

        mean_kl = kl.sum(1).mean().item()
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        has_eos = torch.zeros_like(ro.scores, dtype=torch.bool)
        for e in self.eos_ids:
            has_eos |= (ro.query_responses[:, P:] == e).any(1)
        out.update(
            reward=ro.scores.mean().item(),
            reward_std=ro.scores.std().item() if B > 1 else 0.0,
            kl=mean_kl,
            kl_coef=self.kl_ctl.value,
            non_score_reward=non_score.sum(1).mean().item(),
            response_length=mask.sum(1).mean().item(),
            eos_fraction=has_eos.float().mean().item(),
        )
        self.kl_ctl.update(mean_kl, B)
        return out, ro

    def prompt_batches(self, prompts: list[str]):
        """Endless batches of ``batch_size`` prompts, reshuffled every pass."""
        return endless_batches(prompts, self.cfg.batch_size, self.rng)

    def save(self, out_dir: str | Path) -> None:
        """Write the policy as a plain causal LM (LoRA merged), tokenizer and value head."""
        from safetensors.torch import save_file

        save_policy(self.policy.lm, self.tokenizer, out_dir, merge=self.ref_lm is None)
        save_file({k: v.contiguous() for k, v in self.policy.v_head.state_dict().items()},
                  str(Path(out_dir) / "value_head.safetensors"))


def eos_ids(tokenizer, lm) -> set[int]:
    """Token ids that end a response: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = lm.generation_config.eos_token_id
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return {i for i in ids if i is not None}


def endless_batches(items: list, n: int, rng: random.Random):
    """Endless batches of ``n`` items, reshuffled every pass."""
    pool: list = []
    while True:
        if len(pool) < n:
            fresh = list(items)
            rng.shuffle(fresh)
            pool.extend(fresh)
        batch, pool = pool[:n], pool[n:]
        yield batch


def save_policy(lm, tokenizer, out_dir: str | Path, merge: bool) -> None:
    """Write a policy as a plain causal LM (a LoRA merged into a copy) and its tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge:
        # Merge into a copy so the trainer's adapter stays usable after saving.
        lm = copy.deepcopy(lm)
        head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
        if hasattr(head, "base_layer") and head.base_layer.weight is emb.weight:
            # An adapter on a tied LM head would be merged into the input embeddings too:
            # give the head its own weight first and save the model untied.
            head.base_layer.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
            lm.get_base_model().config.get_text_config().tie_word_embeddings = False
            lm.get_base_model().config.tie_word_embeddings = False
        lm = lm.merge_and_unload()
    lm.save_pretrained(out_dir, safe_serialization=True)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # the saved tokenizer keeps the family's default
    tokenizer.save_pretrained(out_dir)
    tokenizer.padding_side = padding_side

def train_ppo(
    policy_path: str | Path,
    prompts: list[str],
    reward: str | Path | RewardFn,
    cfg: PPOConfig,
    out_dir: str | Path | None = None,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
) -> PPOResult:
    """Run PPO from an SFT policy against a reward model or a reward function.

    Args:
        policy_path: Folder of the instruction-tuned (SFT) causal LM; it is also the reference.
        prompts: User prompts to roll out on (plain strings, chat-formatted here).
        reward: A reward-model folder written by `reward.train_reward_model`, or any
            ``reward_fn(prompts, responses) -> scores`` callable.
        cfg: Settings.
        out_dir: If given, the merged policy, tokenizer, value head and ``ppo_history.json``
            are written there.
        log_fn: Called as ``log_fn(stats, update_index)`` after every update (e.g. a thin
            wrapper over ``mlflow.log_metrics``).

    Returns:
        Per-update history, sample generations and a summary.
    """
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt")
    if isinstance(reward, (str, Path)):
        from kubetune.methods.rl.reward import RewardModelScorer

        reward_fn: RewardFn = RewardModelScorer(reward, device="cuda" if torch.cuda.is_available() else None)
    else:
        reward_fn = reward
    trainer = PPOTrainer(policy_path, reward_fn, cfg)
    batches = trainer.prompt_batches(prompts)
    history, samples = [], []
    start = time.time()
    for update in range(cfg.steps):
        stats, ro = trainer.step(next(batches))
        stats["seconds"] = time.time() - start
        history.append(stats)
        if log_fn is not None:
            log_fn(stats, update)
        # Keep generations of the first, middle and last update for the table.
        if update in {0, cfg.steps // 2, cfg.steps - 1}:
            for p, r, s in list(zip(ro.prompts, ro.responses, ro.scores.tolist()))[: cfg.num_samples_to_log]:
                samples.append({"update": update, "prompt": p, "response": r, "score": s})
    metrics = {
        "reward_first": history[0]["reward"],
        "reward_last": history[-1]["reward"],
        "kl_last": history[-1]["kl"],
        "seconds": time.time() - start,
    }
    if out_dir is not None:
        trainer.save(out_dir)
        (Path(out_dir) / "ppo_history.json").write_text(json.dumps({"config": asdict(cfg), "history": history}))
    return PPOResult(history=history, samples=samples, metrics=metrics, trainer=trainer)
