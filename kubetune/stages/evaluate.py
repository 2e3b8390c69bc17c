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
from kubetune.core.models import DEFAULT_BASE_MODEL
from kubetune.core.scoring import general_text, generate, line_losses, load_model_artifact, validation_loss
from kubetune.errors import ConfigError, StageError
from kubetune.lib.report import EvalReport, numbers
from kubetune.lib.text_metrics import per_example, task_metrics
from kubetune.tracking import RunContext, maybe_stage, set_tags


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


def score_model(model, tok, val_records, val_rows, shape, cfg: EvaluateConfig, general: list[str]) -> dict:
    from kubetune.lib.dataset import prompt_messages, reference_answer

    out = {"val_loss": validation_loss(model, val_rows, tok.pad_token_id, cfg.batch_size)}
    out["val_perplexity"] = math.exp(min(out["val_loss"], 50))
    records = val_records[: cfg.max_examples]
    refs = [reference_answer(r, shape) for r in records]
    if records and all(r is not None for r in refs) and shape in ("instruction", "chat"):
        preds = generate(model, tok, [prompt_messages(r, shape) for r in records], cfg.max_new_tokens,
                         cfg.batch_size)
        out["per_example"] = per_example(preds, refs)
        out.update(task_metrics(preds, refs, out["per_example"]))
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


# ---------------------------------------------------------------- stage


@dataclass
class EvaluateResult:
    report: EvalReport
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
    general = general_text()
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
        mine, theirs = candidate.get("per_example", {}).get(metric), base.get("per_example", {}).get(metric)
        if mine and theirs and len(mine) == len(theirs):
            from kubetune.lib.stats import paired_difference

            candidate.update(paired_difference(metric, mine, theirs))
        forgetting, forgetting_ci = None, None
        if "general_perplexity" in candidate:
            forgetting = candidate["general_perplexity"] / base["general_perplexity"] - 1.0
            if "general_line_losses" in base:
                from kubetune.lib.stats import relative_change_interval

                forgetting_ci = relative_change_interval(candidate["general_line_losses"],
                                                         base["general_line_losses"], candidate["general_line_tokens"])
        report = EvalReport(
            primary_metric=metric, candidate=candidate, base=numbers(base),
            champion=numbers(champion) if champion else None, champion_version=champion_version,
            min_improvement=cfg.min_improvement, forgetting=forgetting,
            **({"forgetting_ci_low": forgetting_ci[0], "forgetting_ci_high": forgetting_ci[1],
                "forgetting_lines": len(candidate["general_line_tokens"])} if forgetting_ci else {}),
            data_fingerprint=meta["fingerprint"], validation_fingerprint=meta.get("validation_fingerprint"),
            eval_key=key, validation_examples=len(val_records),
            benchmark_gate=benchmark_gate(candidate, base, champion, cfg.max_benchmark_drop))
        if run is not None:
            report.log(tracking)
            set_tags({"kubetune.base_scores_reused": str(bool(base.get("reused")))})
            if candidate.get("samples"):
                import mlflow

                mlflow.log_table({k: [s[k] for s in candidate["samples"]] for k in candidate["samples"][0]},
                                 "samples.json")
            _log_comparison_plot(report)
            from kubetune.lib.eval_card import render

            tracking.log_text(render(report), "evaluation_card.md")
    report.save(output_path)
    return EvaluateResult(report=report, output_path=str(output_path))


def _log_comparison_plot(report: EvalReport) -> None:
    """Bar chart of the metrics that are shares (0..1): base vs champion vs candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kubetune.tracking import log_figure

    keys = [k for k in ("exact_match", "field_accuracy", "rouge_l") if k in report.candidate]
    if not keys:
        return
    models = [("base", report.base), ("champion", report.champion), ("candidate", report.candidate)]
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
