"""Stage `evaluate_head`: the trained head vs a baseline vs the current champion.

Writes ``eval.json`` in the schema of ``evaluate`` (so ``register`` treats both alike). The
base model of a frozen-backbone classifier has no head, so "base" is the majority-class
baseline: what answering the most frequent training label scores. Forgetting is 0 by
construction: the backbone's weights are not changed (they are not even saved, only
referenced), so its general-text perplexity is the base model's.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.lib.report import EvalReport
from kubetune.tracking import RunContext, maybe_stage


@dataclass
class EvaluateHeadConfig:
    model_name: str = setting("", "Registered model whose 'champion' to compare with ('' = no comparison).")
    primary_metric: Literal["accuracy", "macro_f1"] = setting("macro_f1", "Metric that decides promotion.")
    min_improvement: float = setting(0.0, "Margin the candidate must beat the champion (and base) by.")


@dataclass
class EvaluateHeadResult:
    report: EvalReport
    output_path: str


def evaluate_head(cfg: EvaluateHeadConfig, model_dir: str | Path, embeddings_dir: str | Path,
                  dataset_dir: str | Path, output_path: str | Path, ctx: RunContext | None = None
                  ) -> EvaluateHeadResult:
    """Score the head on the validation embeddings; compare with the baseline and the champion.

    Args:
        cfg: Evaluation settings.
        model_dir: Output of ``train_head``.
        embeddings_dir: Output of ``embed`` (validation features).
        dataset_dir: Output of ``ingest`` (validation texts, for a champion that must be re-run).
        output_path: Where ``eval.json`` is written.
        ctx: When given, logs to an MLflow child run named ``evaluate-head``.

    Returns:
        The report (same keys as ``evaluate``'s).
    """
    from kubetune import tracking
    from kubetune.lib.dataset import load_dataset_dir
    from kubetune.methods.features import Head, artifact_dir, classification_metrics, load_features, majority_baseline

    meta, t = load_features(embeddings_dir)
    labels = meta["labels"]
    ref = [labels[i] for i in t["validation_y"].tolist()]
    metric = cfg.primary_metric
    from kubetune.lib.run_keys import eval_key

    key = eval_key(meta.get("validation_fingerprint") or meta["fingerprint"],
                   {k: v for k, v in asdict(cfg).items() if k != "model_name"})
    with maybe_stage(ctx, "evaluate-head", params=asdict(cfg)) as run:
        head = Head.load(artifact_dir(model_dir))
        candidate = classification_metrics(head.predict(t["validation_x"]), ref, labels)
        base = majority_baseline([labels[i] for i in t["train_y"].tolist()], ref, labels)
        champion, champion_version = None, None
        if cfg.model_name:
            tracking.configure()
            holder = tracking.get_alias(cfg.model_name, tracking.CHAMPION)
            if holder is not None:
                champion_version = holder.version
                if holder.tags.get("kubetune.eval_key") == key and \
                        f"eval.{metric}" in holder.tags:  # same validation rows, settings, code: its numbers hold
                    champion = {k[len("eval."):]: float(v) for k, v in holder.tags.items() if k.startswith("eval.")}
                else:  # other data (or an older version): run it on these texts
                    import mlflow.pyfunc

                    _, _, val_records = load_dataset_dir(dataset_dir)
                    with tempfile.TemporaryDirectory() as tmp:
                        path = tracking.download_version(cfg.model_name, holder.version, tmp)
                        preds = mlflow.pyfunc.load_model(str(path)).predict([r["text"] for r in val_records])
                    champion = classification_metrics(list(preds), [r["label"] for r in val_records], labels)
        report = EvalReport(
            primary_metric=metric, candidate=candidate, base=base, champion=champion,
            champion_version=champion_version, min_improvement=cfg.min_improvement,
            forgetting=0.0,  # frozen backbone: unchanged weights, unchanged general perplexity
            data_fingerprint=meta["fingerprint"], validation_fingerprint=meta.get("validation_fingerprint"),
            eval_key=key, validation_examples=len(ref), details={"base_kind": "majority-class baseline"})
        if run is not None:
            report.log(tracking)
    report.save(output_path)
    return EvaluateHeadResult(report=report, output_path=str(output_path))
