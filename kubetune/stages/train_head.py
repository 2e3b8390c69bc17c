"""Stage `train_head`: fit a classification head (linear or small MLP) on cached embeddings.

The backbone stays frozen and is not even loaded: the head trains on the ``embed`` cache in
seconds. The output is a complete model folder: an MLflow pyfunc text classifier (backbone
reference or copy + head, see ``kubetune.methods.features``) and ``kubetune_method.json``, so
``register`` registers it as it is and ``mlflow.pyfunc.load_model("models:/NAME@champion")``
predicts labels from raw text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError
from kubetune.tracking import RunContext, log_metrics, maybe_stage

METHOD = "feature-extraction"


@dataclass
class TrainHeadConfig:
    head: Literal["linear", "mlp"] = setting("linear", "linear (logistic regression) or mlp (one hidden layer).")
    hidden_size: int = setting(256, "Hidden width of the mlp head.")
    epochs: int = setting(300, "Full-batch optimizer steps (a few hundred rows fit in one batch).")
    learning_rate: float = setting(1e-2, "AdamW learning rate.")
    weight_decay: float = setting(1e-2, "AdamW weight decay (the head's only regulariser besides dropout).")
    dropout: float = setting(0.1, "Dropout inside the mlp head.")
    seed: int = setting(0, "Seed of the head's initialisation.")

    def __post_init__(self):
        for name in ("hidden_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if not 0 < self.learning_rate <= 1:
            raise ConfigError(f"'learning_rate' must be in (0, 1], got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"'dropout' must be in [0, 1), got {self.dropout}")


@dataclass
class TrainHeadResult:
    metrics: dict
    output_dir: str


def fit_head(cfg: TrainHeadConfig, x, y, n_labels: int, labels: list[str]):
    """Train the head on features ``x`` (standardised with their own mean/std) and labels ``y``.

    Returns:
        (Head, per-step losses).
    """
    import torch

    from kubetune.methods.features import Head, build_head

    torch.manual_seed(cfg.seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    net = build_head(cfg.head, x.shape[1], n_labels, cfg.hidden_size, cfg.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    xs = (x - mean) / std
    losses = []
    net.train()
    for _ in range(cfg.epochs):
        loss = torch.nn.functional.cross_entropy(net(xs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    config = {"kind": cfg.head, "dim": int(x.shape[1]), "hidden_size": cfg.hidden_size}
    return Head(net, mean, std, labels, config), losses


def train_head(cfg: TrainHeadConfig, embeddings_dir: str | Path, output_dir: str | Path,
               ctx: RunContext | None = None) -> TrainHeadResult:
    """Fit the head and save the text classifier model folder.

    Args:
        cfg: Head settings.
        embeddings_dir: Output of ``embed``.
        output_dir: The model folder (pyfunc model + ``kubetune_method.json``).
        ctx: When given, logs to an MLflow child run named ``train-head``.

    Returns:
        Losses, validation accuracy / macro-F1 and the majority-class baseline's, parameter counts.
    """
    import tempfile

    from kubetune.lib.dataset import atomic_dir
    from kubetune.methods.features import classification_metrics, load_features, majority_baseline, save_text_classifier

    meta, t = load_features(embeddings_dir)
    labels = meta["labels"]
    tags = {"kubetune.method": METHOD, "kubetune.base_model": meta["backbone"],
            "kubetune.data_fingerprint": meta["fingerprint"]}
    with maybe_stage(ctx, "train-head", params=asdict(cfg), tags=tags) as run:
        t0 = time.perf_counter()
        head, losses = fit_head(cfg, t["train_x"], t["train_y"], len(labels), labels)
        wall = time.perf_counter() - t0
        ref = [labels[i] for i in t["validation_y"].tolist()]
        val = classification_metrics(head.predict(t["validation_x"]), ref, labels)
        baseline = majority_baseline([labels[i] for i in t["train_y"].tolist()], ref, labels)
        trainable = sum(p.numel() for p in head.net.parameters())
        total = trainable + int(meta["backbone_params"])
        metrics = {"train_loss_first": losses[0], "train_loss_last": losses[-1], "train_wall_s": round(wall, 2),
                   "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                   "baseline_accuracy": baseline["accuracy"], "baseline_macro_f1": baseline["macro_f1"],
                   "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}
        manifest = {"method": METHOD, "base_model": meta["backbone"], "head": asdict(cfg), "labels": labels,
                    "pooling": meta["pooling"], "max_length": meta["max_length"],
                    "data_fingerprint": meta["fingerprint"], "shape": meta["shape"],
                    "parameters": {"trainable": trainable, "total": total, "share": trainable / total}}
        with atomic_dir(output_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
            head_dir = head.save(Path(scratch) / "head")
            save_text_classifier(tmp, head_dir, meta["backbone"], meta["pooling"], meta["max_length"])
            (tmp / "kubetune_method.json").write_text(json.dumps(manifest, indent=2))
        if run is not None:
            for step, loss in enumerate(losses):
                if step % 10 == 0 or step == len(losses) - 1:
                    log_metrics({"loss": loss}, step=step)
            log_metrics(metrics)
    return TrainHeadResult(metrics=metrics, output_dir=str(output_dir))
