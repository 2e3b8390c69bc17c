"""Stage `embed`: run a frozen backbone once over the data and cache the pooled embeddings.

The output folder is the cache the head trains on (``train_head``) and is evaluated on
(``evaluate_head``): ``features.safetensors`` with ``{split}_x`` (float32 [rows, hidden]) and
``{split}_y`` (label indices), and ``meta.json`` (labels, backbone, pooling, dimension, data
fingerprint). The backbone runs once per pipeline run, however many heads are then tried.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError, StageError
from kubetune.tracking import RunContext, log_metrics, maybe_stage



@dataclass
class EmbedConfig:
    base_model: str = setting("minilm-l6-v2", "Frozen backbone: an encoder (minilm-l6-v2) or a decoder LLM.")
    pooling: Literal["mean", "last"] = setting("mean", "mean of the real tokens, or the last token's state.")
    max_length: int = setting(128, "Texts are cut to this many tokens.")
    batch_size: int = setting(32, "Texts per forward pass.")
    trust_remote_code: bool = setting(False, "Run code shipped with the model (off unless you trust it).")

    def __post_init__(self):
        if self.max_length < 8:
            raise ConfigError(f"'max_length' must be at least 8, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"'batch_size' must be >= 1, got {self.batch_size}")


@dataclass
class EmbedResult:
    meta: dict
    output_dir: str


def embed(cfg: EmbedConfig, dataset_dir: str | Path, output_dir: str | Path,
          ctx: RunContext | None = None) -> EmbedResult:
    """Embed the train and validation texts of a classification dataset.

    Args:
        cfg: Backbone and pooling settings.
        dataset_dir: Output of ``ingest`` (shape ``classification``: text + label).
        output_dir: Where ``features.safetensors`` and ``meta.json`` are written.
        ctx: When given, logs to an MLflow child run named ``embed``.

    Returns:
        The cache's metadata (labels, dimension, counts) and its folder.
    """
    import torch
    from safetensors.torch import save_file

    from kubetune.lib.dataset import atomic_dir, load_dataset_dir
    from kubetune.methods.features import FEATURES, embed_texts, load_backbone

    meta, train, val = load_dataset_dir(dataset_dir)
    if meta["shape"] != "classification":
        raise StageError(f"embed: needs text/label records (shape 'classification'), got shape '{meta['shape']}'")
    labels = sorted({r["label"] for r in train})
    unseen = sorted({r["label"] for r in val} - set(labels))
    if unseen:
        raise StageError(f"embed: validation labels {unseen} never occur in the training split")
    if len(labels) < 2:
        raise StageError(f"embed: a classifier needs at least 2 labels, the training split has {labels}")
    tags = {"kubetune.base_model": cfg.base_model, "kubetune.data_fingerprint": meta["fingerprint"]}
    with maybe_stage(ctx, "embed", params=asdict(cfg), tags=tags) as run:
        model, tok, is_decoder = load_backbone(cfg.base_model, cfg.trust_remote_code)
        t0 = time.perf_counter()
        tensors = {}
        for split, rows in (("train", train), ("validation", val)):
            tensors[f"{split}_x"] = embed_texts(model, tok, [r["text"] for r in rows], cfg.pooling,
                                                cfg.max_length, cfg.batch_size).contiguous()
            tensors[f"{split}_y"] = torch.tensor([labels.index(r["label"]) for r in rows], dtype=torch.long)
        wall = time.perf_counter() - t0
        out_meta = {"labels": labels, "backbone": cfg.base_model, "pooling": cfg.pooling,
                    "max_length": cfg.max_length, "dim": int(tensors["train_x"].shape[1]),
                    "backbone_kind": "decoder" if is_decoder else "encoder",
                    "backbone_params": sum(p.numel() for p in model.parameters()),
                    "fingerprint": meta["fingerprint"], "shape": meta["shape"],
                    "counts": {"train": len(train), "validation": len(val)}}
        with atomic_dir(output_dir) as tmp:
            save_file(tensors, str(tmp / FEATURES))
            (tmp / "meta.json").write_text(json.dumps(out_meta, indent=2))
        if run is not None:
            log_metrics({"embed_wall_s": wall, "texts_per_s": (len(train) + len(val)) / max(wall, 1e-9),
                         "embedding_dim": out_meta["dim"], "labels": len(labels)})
    return EmbedResult(meta=out_meta, output_dir=str(output_dir))
