"""Stage `evaluate_head`: the trained head vs a baseline vs the current champion.

Writes ``eval.json`` in the schema of ``evaluate`` (so ``register`` treats both alike). The
base model of a frozen-backbone classifier has no head, so "base" is the majority-class
baseline: what answering the most frequent training label scores. Forgetting is 0 by
construction: the backbone's weights are not changed (they are not even saved, only
referenced), so its general-text perplexity is the base model's.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.tracking import RunContext, log_metrics, maybe_stage, set_tags


@dataclass
class EvaluateHeadConfig:
    model_name: str = setting("", "Registered model whose 'champion' to compare with ('' = no comparison).")
    primary_metric: Literal["accuracy", "macro_f1"] = setting("macro_f1", "Metric that decides promotion.")
    min_improvement: float = setting(0.0, "Margin the candidate must beat the champion (and base) by.")


@dataclass
class EvaluateHeadResult:
    report: dict
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
        higher = lambda a, b: a > b + cfg.min_improvement  # noqa: E731 - both metrics: higher is better
        report = {
            "evaluated": True,
            "primary_metric": metric,
            "higher_is_better": True,
            "min_improvement": cfg.min_improvement,
            "candidate": candidate,
            "base": base,
            "base_kind": "majority-class baseline",
            "champion": champion,
            "champion_version": champion_version,
            "forgetting": 0.0,  # frozen backbone: unchanged weights, unchanged general perplexity
            "beats_base": higher(candidate[metric], base[metric]),
            "beats_champion": champion is None or higher(candidate[metric], champion[metric]),
            "data_fingerprint": meta["fingerprint"],
            "validation_fingerprint": meta.get("validation_fingerprint"),
            "eval_key": key,
            "validation_examples": len(ref),
        }
        if run is not None:
            set_tags({"kubetune.primary_metric": metric})
            log_metrics({f"candidate_{k}": v for k, v in candidate.items()})
            log_metrics({f"base_{k}": v for k, v in base.items()})
            if champion:
                log_metrics({f"champion_{k}": v for k, v in champion.items()})
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, output_path)
    return EvaluateHeadResult(report=report, output_path=str(output_path))
