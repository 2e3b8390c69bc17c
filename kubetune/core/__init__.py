"""The training core: one trainer (transformers Trainer, or the GPU fast path), which weights train, model references, typed configs."""
