"""Stage `evaluate_policy`: a preference-tuned policy (PPO, DPO) vs its reference policy.

On held-out prompts (the validation side of the preference data, whose prompts no training
stage saw), for the candidate, the reference (the SFT policy, or the base model DPO started
from) and the registered champion:

- ``reward``: mean score of sampled responses under the judge reward model, which must not be
  the reward model the policy was optimised against (a policy learns its reward model's blind
  spots: judged by it, reward hacking looks like progress); the ``rlhf`` pipeline trains the
  judge on prompts disjoint from the PPO reward model's;
- ``train_reward``: the same samples scored by the reward model the policy optimised, when
  given: reported beside the judge's score (a gap between them is a sign of reward hacking),
  never deciding anything;
- ``pattern_rate``: with ``judge_pattern`` set, the share of sampled responses that match
  it entirely: a programmatic check, the most independent judge where the task has one;
- ``win_rate``: share of prompts where the policy's response outscores the reference's
  (ties count one half; the reference's own is 0.5 by definition);
- ``kl``: KL(π ‖ π_ref) in nats per response, over the policy's own samples;
- ``preference_accuracy`` (the task metric): share of held-out pairs whose chosen answer the
  policy finds more likely (mean token log-prob) than the rejected one;
- forgetting: perplexity on kubetune's general text, relative to the reference.

Writes ``eval.json`` in the schema ``evaluate`` writes and ``register`` reads.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError
from kubetune.lib.report import EvalReport
from kubetune.tracking import RunContext, maybe_stage


@dataclass
class EvaluatePolicyConfig:
    model_name: str = setting("", "Registered model whose 'champion' to compare with ('' = no comparison).")
    primary_metric: Literal["auto", "reward", "win_rate", "pattern_rate"] = setting(
        "auto", "Metric that decides promotion (higher is better): the judge reward model's score, the win "
                "rate vs the reference, or the share of responses matching judge_pattern; auto = pattern_rate "
                "when judge_pattern is set, else reward.")
    judge_pattern: str = setting(
        "", "A regular expression a good response matches entirely (Python re.fullmatch, DOTALL): the "
            "programmatic judge, where the task has one ('' = none).")
    min_improvement: float = setting(0.0, "Margin the candidate must beat the reference and champion by.")
    max_new_tokens: int = setting(48, "Longest sampled response, in tokens.")
    temperature: float = setting(1.0, "Sampling temperature of both policies (rlhf passes PPO's rollout temperature).")
    max_prompts: int = setting(24, "Held-out prompts used (the first ones of the validation pairs).")
    batch_size: int = setting(16, "Prompts per generation batch / sequences per scoring batch.")
    forgetting: bool = setting(True, "Measure perplexity on the bundled general text (forgetting).")
    seed: int = setting(0, "Sampling seed (the same for every policy compared).")

    def __post_init__(self):
        if self.judge_pattern:
            try:
                re.compile(self.judge_pattern)
            except re.error as e:
                raise ConfigError(f"'judge_pattern' is not a regular expression: {e}") from None
        elif self.primary_metric == "pattern_rate":
            raise ConfigError("'primary_metric' pattern_rate needs 'judge_pattern' (the check to count)")
        if self.temperature <= 0:
            raise ConfigError(f"'temperature' must be > 0, got {self.temperature}")
        for name in ("max_new_tokens", "max_prompts", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}")


    def metric(self) -> str:
        """The primary metric, with auto resolved."""
        if self.primary_metric != "auto":
            return self.primary_metric
        return "pattern_rate" if self.judge_pattern else "reward"

    def pattern_score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """1 for each response that matches ``judge_pattern`` entirely, else 0."""
        rx = re.compile(self.judge_pattern, re.DOTALL)
        return [1.0 if rx.fullmatch(r.strip()) else 0.0 for r in responses]


@dataclass
class EvaluatePolicyResult:
    report: EvalReport
    output_path: str


def mean_logprobs(model, tok, prompts: list[str], responses: list[str], batch_size: int) -> list[float]:
    """Mean per-token log-probability of each response given its prompt, in the chat format."""
    import torch

    from kubetune.methods.rl.ppo_core import logprobs_from_logits

    seqs = []
    for p, r in zip(prompts, responses):
        user = [{"role": "user", "content": p}]
        prefix = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": r}], tokenize=True,
                                       return_dict=True)["input_ids"]
        seqs.append((list(full), len(prefix)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            width = max(len(s) for s, _ in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in chunk], device=device)
            attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in chunk], device=device)
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])
            for row, (s, start) in enumerate(chunk):
                # Token t is predicted at position t-1: the response's tokens start at `start`.
                span = lp[row, start - 1:len(s) - 1]
                out.append(float(span.mean()) if span.numel() else 0.0)
    return out


def preference_accuracy(model, tok, pairs: list[dict], batch_size: int) -> float:
    """Share of pairs where the chosen answer has the higher mean token log-prob."""
    prompts = [p["prompt"] for p in pairs]
    chosen = mean_logprobs(model, tok, prompts, [p["chosen"] for p in pairs], batch_size)
    rejected = mean_logprobs(model, tok, prompts, [p["rejected"] for p in pairs], batch_size)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def _model_scores(path: str, pairs: list[dict], general: list[str], cfg: EvaluatePolicyConfig) -> dict:
    from kubetune.core import models
    from kubetune.core.scoring import text_perplexity

    tok = models.load_tokenizer(path)
    model = models.load_causal_lm(path, device=models.pick_device()).eval()
    out = {"preference_accuracy": preference_accuracy(model, tok, pairs, cfg.batch_size)}
    if cfg.forgetting and general:
        out["general_perplexity"] = text_perplexity(model, tok, general, cfg.batch_size)
    return out


def evaluate_policy(cfg: EvaluatePolicyConfig, model_dir: str | Path, reference: str | Path,
                    reward_model_dir: str | Path, dataset_dir: str | Path, output_path: str | Path,
                    ctx: RunContext | None = None,
                    train_reward_model_dir: str | Path | None = None) -> EvaluatePolicyResult:
    """Evaluate a tuned policy against its reference and the current champion.

    Args:
        cfg: Evaluation settings.
        model_dir: Output of ``ppo`` or ``dpo`` (a plain causal-LM folder).
        reference: The policy it started from: a training stage's output folder (its ``merged/``
            model), a model folder or a model reference.
        reward_model_dir: Output of ``reward_model``: the judge of rewards and win rates. It must
            not be the reward model the policy was trained against (see ``train_reward_model_dir``).
        dataset_dir: Output of ``ingest`` on the preference data (held-out prompts and pairs).
        output_path: Where ``eval.json`` is written.
        ctx: When given, logs to an MLflow child run named ``evaluate-policy``.
        train_reward_model_dir: The reward model the policy was optimised against, if any: its
            scores of the same samples are reported as ``train_reward``, never used to decide.

    Returns:
        The report: per-policy metrics, forgetting, primary metric and the verdict.
    """
    from kubetune import tracking
    from kubetune.methods.rl.compare import compare_policies
    from kubetune.methods.rl.data import load_pairs, policy_folder, unique_prompts
    from kubetune.core.scoring import general_text
    from kubetune.methods.rl.reward import RewardModelScorer

    meta, _, val = load_pairs(dataset_dir)
    prompts = unique_prompts(val)[: cfg.max_prompts]
    chosen_prompts = set(prompts)
    pairs = [p for p in val if p["prompt"] in chosen_prompts]
    general = general_text()
    ref_path = policy_folder(reference)
    metric = cfg.metric()

    def head_to_head(path, samples=0):
        return compare_policies(path, ref_path, prompts, scorer, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                batch_size=cfg.batch_size, samples=samples, temperature=cfg.temperature, also=also)

    def scores(h2h: dict, who: str) -> dict:
        """Judge reward, win rate and KL of one side of a head-to-head, plus the reported-only scores."""
        own = {"reward": h2h[f"reward_{who}"], "win_rate": h2h["win_rate"] if who == "policy" else 0.5,
               "kl": h2h["kl"] if who == "policy" else 0.0}
        return {**own, **{name: h2h[f"{name}_{who}"] for name in also}}

    with maybe_stage(ctx, "evaluate-policy", params={**asdict(cfg), "reference": str(reference)}) as run:
        scorer = RewardModelScorer(reward_model_dir)
        also = {}
        if train_reward_model_dir is not None:
            also["train_reward"] = RewardModelScorer(train_reward_model_dir)
        if cfg.judge_pattern:
            also["pattern_rate"] = cfg.pattern_score
        h2h = head_to_head(str(model_dir), samples=8)
        candidate = {**scores(h2h, "policy"), **_model_scores(str(model_dir), pairs, general, cfg)}
        base = {**scores(h2h, "reference"), **_model_scores(ref_path, pairs, general, cfg)}
        champion, champion_version = None, None
        if cfg.model_name:
            tracking.configure()
            holder = tracking.get_alias(cfg.model_name, tracking.CHAMPION)
            if holder is not None:
                # Always re-scored: rewards are only comparable under the same reward model,
                # and this run's judge is not the one the champion was scored with.
                champion_version = str(holder.version)
                with tempfile.TemporaryDirectory() as tmp:
                    path = tracking.download_version(cfg.model_name, holder.version, tmp)
                    c = head_to_head(str(path))
                champion = scores(c, "policy")
        forgetting = None
        if "general_perplexity" in candidate:
            forgetting = candidate["general_perplexity"] / base["general_perplexity"] - 1.0
        report = EvalReport(
            primary_metric=metric, candidate=candidate, base=base, champion=champion,
            champion_version=champion_version, min_improvement=cfg.min_improvement, forgetting=forgetting,
            data_fingerprint=meta["fingerprint"], validation_examples=len(prompts))
        if run is not None:
            import mlflow

            report.log(tracking)
            if h2h.get("samples"):
                mlflow.log_table({k: [s[k] for s in h2h["samples"]] for k in h2h["samples"][0]}, "samples.json")
    report.save(output_path)
    return EvaluatePolicyResult(report=report, output_path=str(output_path))
