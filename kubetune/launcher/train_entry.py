"""The training entry point every training process runs: one GPU, several (torchrun) or
several nodes (a Kubeflow Trainer TrainJob). ``python -m kubetune.launcher.train_entry --config JOB.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path


def main(config_path: str) -> dict:
    """Run the training stage described by ``config_path``; rank 0 writes the result file."""
    from kubetune.core.config import from_dict
    from kubetune.tracking import RunContext
    from kubetune.core.train import TrainConfig, run_training

    spec = json.loads(Path(config_path).read_text())
    cfg = from_dict(TrainConfig, spec["cfg"], config_path)
    ctx = RunContext(**spec["ctx"]) if spec.get("ctx") else None
    result = run_training(spec["stage"], cfg, spec["tokenized_dir"], spec["output_dir"], spec["workspace"], ctx)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # the fast path's process group (the Trainer's is its own)
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0 and spec.get("result"):
        Path(spec["result"]).write_text(json.dumps(asdict(result)))
    return asdict(result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    main(parser.parse_args().config)
