"""Stage `evaluate`: candidate vs base model vs current champion, on the validation split.

Measures, for each model: validation loss / perplexity on the tokenized validation rows; a
task metric where the data has reference answers (greedy generation, then exact match —
JSON-aware: two answers that parse to the same object match — field accuracy for JSON
records, and ROUGE-L F1); and forgetting: perplexity on a general text set bundled with
kubetune, relative to the base model. Writes ``eval.json`` with a verdict: does the candidate
beat the base and the champion on the primary metric by the required margin.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError, StageError
from kubetune.core.models import DEFAULT_BASE_MODEL
from kubetune.tracking import RunContext, log_metrics, maybe_stage, set_tags

GENERAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "general_text.txt"
LOWER_IS_BETTER = {"val_loss", "val_perplexity"}


@dataclass
class EvaluateConfig:
    base_model: str = setting(DEFAULT_BASE_MODEL, "The base model the candidate was trained from.")
    model_name: str = setting("", "Registered model whose 'champion' to compare with ('' = no comparison).")
    primary_metric: Literal["auto", "exact_match", "rouge_l", "val_loss"] = setting(
        "auto", "Metric that decides promotion; auto = exact_match when the data has references, else val_loss.")
    min_improvement: float = setting(0.0, "Margin the candidate must beat the champion (and base) by.")
    max_new_tokens: int = setting(64, "Longest generated answer.")
    max_examples: int = setting(64, "Validation examples used for generation metrics.")
    batch_size: int = setting(16, "Examples per generation / loss batch.")
    forgetting: bool = setting(True, "Measure perplexity on the bundled general text (forgetting).")
    reuse_base_scores: bool = setting(
        True, "Reuse the base model's scores from an earlier evaluation with the same base weights, validation "
              "rows, settings and library versions (greedy decoding is deterministic; saves a third of the step).")
    trust_remote_code: bool = setting(False, "Run code shipped with the models (the run's loading policy: the "
                                             "pipelines pass train_settings' value).")
    allow_pickle: bool = setting(False, "Load pickle (.bin) weights (the run's loading policy: the pipelines "
                                        "pass train_settings' value).")
    benchmarks: list = setting([], "lm-eval-harness tasks to score base, champion and candidate on (bundled, "
                                   "offline: kubetune_arithmetic; any lm-eval task name where its data downloads).")
    benchmark_limit: int = setting(100, "Items per benchmark task (0 = all).")
    max_benchmark_drop: float = setting(-1.0, "Refuse champion if any benchmark falls more than this (0.02 = two "
                                              "points) below the base's or champion's; negative = no gate.")

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.max_examples < 1 or self.batch_size < 1:
            raise ConfigError("'max_new_tokens', 'max_examples' and 'batch_size' must be >= 1")


# ---------------------------------------------------------------- metrics


def _parse_json(text: str):
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def exact_match(pred: str, ref: str) -> bool:
    """Equal after stripping; if the reference is JSON, equal as parsed objects."""
    ref_obj = _parse_json(ref)
    if ref_obj is not None:
        return _parse_json(pred) == ref_obj
    return " ".join(pred.split()).lower() == " ".join(ref.split()).lower()


def field_accuracy(pred: str, ref: str) -> float | None:
    """Share of the reference JSON object's fields that the prediction gets right."""
    ref_obj = _parse_json(ref)
    if not isinstance(ref_obj, dict) or not ref_obj:
        return None
    pred_obj = _parse_json(pred)
    if not isinstance(pred_obj, dict):
        return 0.0
    return sum(pred_obj.get(k) == v for k, v in ref_obj.items()) / len(ref_obj)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over whitespace tokens (the LCS recurrence of Lin, 2004).

    Ours rather than the ``rouge-score`` package: it is a dozen lines, and the package pulls
    nltk and absl into the image for this one function.
    """
    a, b = pred.lower().split(), ref.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def task_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Each task metric with its 95% interval (``<metric>_ci_low/high``) and the number of examples ``n``."""
    from kubetune.lib.stats import with_interval

    out = {"n": len(refs),
           **with_interval("exact_match", [float(exact_match(p, r)) for p, r in zip(preds, refs)], proportion=True),
           **with_interval("rouge_l", [rouge_l(p, r) for p, r in zip(preds, refs)])}
    fields = [field_accuracy(p, r) for p, r in zip(preds, refs)]
    if all(f is not None for f in fields):
        out.update(with_interval("field_accuracy", fields))
    return out


# ---------------------------------------------------------------- model passes


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
    # - prefix tuning without the cache (what evaluate did before): a trained prefix answered
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


def score_model(model, tok, val_records, val_rows, shape, cfg: EvaluateConfig, general: list[str]) -> dict:
    from kubetune.lib.dataset import prompt_messages, reference_answer

    out = {"val_loss": validation_loss(model, val_rows, tok.pad_token_id, cfg.batch_size)}
    out["val_perplexity"] = math.exp(min(out["val_loss"], 50))
    records = val_records[: cfg.max_examples]
    refs = [reference_answer(r, shape) for r in records]
    if records and all(r is not None for r in refs) and shape in ("instruction", "chat"):
        preds = generate(model, tok, [prompt_messages(r, shape) for r in records], cfg.max_new_tokens,
                         cfg.batch_size)
        out.update(task_metrics(preds, refs))
        out["samples"] = [{"prompt": prompt_messages(r, shape)[-1]["content"], "reference": ref, "prediction": p}
                          for r, ref, p in list(zip(records, refs, preds))[:8]]
    if cfg.forgetting and general:
        sums, counts = line_losses(model, tok, general, cfg.batch_size)
        out["general_perplexity"] = math.exp(sum(sums) / max(sum(counts), 1))
        out["general_line_losses"], out["general_line_tokens"] = sums, counts
    if cfg.benchmarks:
        from kubetune.lib.benchmarks import scores

        out.update(scores(model, tok, cfg.benchmarks, cfg.benchmark_limit, cfg.batch_size))
    return out


def _base_scores(cfg: EvaluateConfig, tok, val_records, val_rows, shape, general: list[str]) -> dict:
    """The base model's scores, from the cache when an identical evaluation already ran.

    Every run of every method on the same data scores the same base model the same way; on 2 CPU
    cores that is a minute or more each time. The key covers everything the numbers depend on:
    the base weights (path, size and mtime of each file), the validation rows and records, the
    settings, the general text, the kubetune source (``run_keys.code_hash``: metric and decoding
    code change between releases), the torch/transformers versions and the device.
    """
    import hashlib

    import torch
    import transformers

    from kubetune.core import models
    from kubetune.lib.run_keys import code_hash

    device = models.pick_device()
    path = Path(models.resolve(cfg.base_model))
    files = sorted((str(f.relative_to(path)), f.stat().st_size, int(f.stat().st_mtime))
                   for f in path.rglob("*") if f.is_file()) if path.is_dir() else [str(path)]
    key_src = json.dumps({
        "base": str(path), "files": files, "rows": [r["input_ids"] for r in val_rows],
        "labels": [r.get("labels") for r in val_rows], "records": val_records[: cfg.max_examples],
        "shape": shape, "general": general, "device": device,
        "settings": [cfg.max_new_tokens, cfg.max_examples, cfg.batch_size, cfg.forgetting, cfg.benchmarks,
                     cfg.benchmark_limit],
        "versions": [code_hash(), torch.__version__, transformers.__version__],
    }, sort_keys=True, default=str)
    cache = models.kubetune_home() / "cache" / "base_scores" / f"{hashlib.sha256(key_src.encode()).hexdigest()}.json"
    if cfg.reuse_base_scores and path.is_dir() and cache.exists():
        scores = json.loads(cache.read_text())
        scores["reused"] = True
        print(f"evaluate: base model scores reused from an identical earlier evaluation ({cache})", flush=True)
        return scores
    base_model = models.load_causal_lm(cfg.base_model, device=device, trust_remote_code=cfg.trust_remote_code,
                                       allow_pickle=cfg.allow_pickle).eval()
    scores = score_model(base_model, tok, val_records, val_rows, shape, cfg, general)
    del base_model
    if path.is_dir():
        from kubetune.lib.dataset import atomic_file

        with atomic_file(cache) as tmp:  # concurrent evaluations of one base model write the same cache
            tmp.write_text(json.dumps(scores))
    return scores


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def better(a: float, b: float, metric: str, margin: float) -> bool:
    return a < b - margin if metric in LOWER_IS_BETTER else a > b + margin


# ---------------------------------------------------------------- stage


@dataclass
class EvaluateResult:
    report: dict
    output_path: str


def evaluate(cfg: EvaluateConfig, model_dir: str | Path, dataset_dir: str | Path, tokenized_dir: str | Path,
             output_path: str | Path, ctx: RunContext | None = None) -> EvaluateResult:
    """Evaluate the candidate against the base model and the current champion.

    Args:
        cfg: Evaluation settings.
        model_dir: Output of a training stage.
        dataset_dir: Output of ``ingest`` (validation records with reference answers).
        tokenized_dir: Output of ``tokenize_data`` (validation rows for the loss).
        output_path: Where ``eval.json`` (the report and verdict) is written.
        ctx: When given, logs to an MLflow child run named ``evaluate``.

    Returns:
        The report: per-model metrics, forgetting, primary metric and the verdict.
    """
    import datasets
    from transformers import AutoTokenizer

    from kubetune.core import models

    from kubetune import tracking
    from kubetune.lib.benchmarks import gate as benchmark_gate
    from kubetune.lib.dataset import load_dataset_dir

    meta, _, val_records = load_dataset_dir(dataset_dir)
    val_rows = list(datasets.load_from_disk(str(tokenized_dir))["validation"])
    tok = AutoTokenizer.from_pretrained(Path(tokenized_dir) / "tokenizer")
    general = [line.strip() for line in GENERAL_TEXT.read_text().splitlines() if line.strip()]
    shape = meta["shape"]
    has_refs = shape in ("instruction", "chat")
    metric = cfg.primary_metric if cfg.primary_metric != "auto" else ("exact_match" if has_refs else "val_loss")
    if metric in ("exact_match", "rouge_l") and not has_refs:
        raise ConfigError(f"primary_metric '{metric}' needs reference answers; the data shape '{shape}' has none")

    policy = models.LoadPolicy(trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    # The champion's recorded scores are reused only for the same validation rows, evaluate
    # settings and code; anything else and it is scored again.
    from kubetune.lib.run_keys import eval_key

    key = eval_key(meta.get("validation_fingerprint") or meta["fingerprint"],
                   {k: v for k, v in asdict(cfg).items() if k not in ("model_name", "reuse_base_scores")})
    with maybe_stage(ctx, "evaluate", params=asdict(cfg)) as run:
        candidate = score_model(load_model_artifact(model_dir, policy), tok, val_records, val_rows, shape, cfg,
                                general)
        base = _base_scores(cfg, tok, val_records, val_rows, shape, general)
        champion, champion_version = None, None
        if cfg.model_name:
            tracking.configure()
            holder = tracking.get_alias(cfg.model_name, tracking.CHAMPION)
            if holder is not None:
                champion_version = holder.version
                recorded = holder.tags.get("kubetune.eval_key") == key and f"eval.{metric}" in holder.tags
                if recorded:  # same validation rows, settings and code; greedy eval: reuse its numbers
                    champion = {k[len("eval."):]: float(v) for k, v in holder.tags.items() if k.startswith("eval.")}
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        path = tracking.download_version(cfg.model_name, holder.version, tmp)
                        champion = score_model(load_model_artifact(path, policy), tok, val_records, val_rows,
                                               shape, cfg, general)
        if metric not in candidate:
            raise StageError(f"evaluate: primary metric '{metric}' could not be computed for this data")
        forgetting, forgetting_ci = None, None
        if "general_perplexity" in candidate:
            forgetting = candidate["general_perplexity"] / base["general_perplexity"] - 1.0
            if "general_line_losses" in base:
                from kubetune.lib.stats import relative_change_interval

                forgetting_ci = relative_change_interval(candidate["general_line_losses"],
                                                         base["general_line_losses"], candidate["general_line_tokens"])
        report = {
            "evaluated": True,
            "primary_metric": metric,
            "higher_is_better": metric not in LOWER_IS_BETTER,
            "min_improvement": cfg.min_improvement,
            "candidate": candidate,
            "base": _numbers(base),
            "champion": _numbers(champion) if champion else None,
            "champion_version": champion_version,
            "forgetting": forgetting,
            **({"forgetting_ci_low": forgetting_ci[0], "forgetting_ci_high": forgetting_ci[1],
                "forgetting_lines": len(candidate["general_line_tokens"])} if forgetting_ci else {}),
            "beats_base": better(candidate[metric], base[metric], metric, cfg.min_improvement),
            "beats_champion": champion is None or better(candidate[metric], champion[metric], metric,
                                                         cfg.min_improvement),
            "data_fingerprint": meta["fingerprint"],
            "validation_fingerprint": meta.get("validation_fingerprint"),
            "eval_key": key,
            "validation_examples": len(val_records),
            "benchmark_gate": benchmark_gate(candidate, base, champion, cfg.max_benchmark_drop),
        }
        if run is not None:
            set_tags({"kubetune.primary_metric": metric, "kubetune.base_scores_reused": str(bool(base.get("reused")))})
            log_metrics({f"candidate_{k}": v for k, v in _numbers(candidate).items()})
            log_metrics({f"base_{k}": v for k, v in _numbers(base).items()})
            if champion:
                log_metrics({f"champion_{k}": v for k, v in _numbers(champion).items()})
            if forgetting is not None:
                log_metrics({"forgetting": forgetting, **{k: report[k] for k in ("forgetting_ci_low",
                             "forgetting_ci_high", "forgetting_lines") if k in report}})
            if candidate.get("samples"):
                import mlflow

                mlflow.log_table({k: [s[k] for s in candidate["samples"]] for k in candidate["samples"][0]},
                                 "samples.json")
            _log_comparison_plot(report)
            from kubetune.lib.eval_card import render

            tracking.log_text(render(report), "evaluation_card.md")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, output_path)
    return EvaluateResult(report=report, output_path=str(output_path))


def _log_comparison_plot(report: dict) -> None:
    """Bar chart of the metrics that are shares (0..1): base vs champion vs candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kubetune.tracking import log_figure

    keys = [k for k in ("exact_match", "field_accuracy", "rouge_l") if k in report["candidate"]]
    if not keys:
        return
    models = [("base", report["base"]), ("champion", report["champion"]), ("candidate", report["candidate"])]
    models = [(n, m) for n, m in models if m]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models):
        ax.bar([j + i * width for j in range(len(keys))], [m.get(k, 0) for k in keys], width, label=name)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("validation metrics")
    fig.tight_layout()
    log_figure(fig, "eval_comparison.png")
