"""The training core: one trainer (transformers Trainer, or the GPU fast path), which weights train (one record per method), model references, typed configs, defaults, tokenization and scoring."""
