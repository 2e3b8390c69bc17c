"""One process per GPU: re-execute the training entry point under ``torchrun`` when needed.

A training component calls ``run_training(config_path)``. With one GPU (or none), or when
the process already is a torchrun worker, it runs the entry point in this process. With
N > 1 GPUs in the pod it starts ``torchrun --nproc_per_node N -m kubetune.launcher.train_entry
--config cfg.json`` and waits for it; each worker then runs the same entry point, and the
training core turns FSDP on from ``fsdp_training_args()`` because ``WORLD_SIZE > 1``.

Multi-node jobs (``kubetune.launcher.trainjob``) start the very same ``torchrun -m
kubetune.launcher.train_entry --config ...`` command; there the Kubeflow training operator sets the
``PET_*`` variables (nnodes, node rank, master address) that torchrun reads.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from kubetune.ops.kube import NPROC_ENV

#: The module every training process runs, single GPU, multi GPU or multi node.
ENTRY_MODULE = "kubetune.launcher.train_entry"

#: The function of ``ENTRY_MODULE`` that trains from a config file path.
ENTRY_FUNCTION = "main"

#: Nodes a training stage runs on; above 1 the stage becomes the launcher of a TrainJob
#: (``kubetune.launcher.trainjob.train_on_nodes``). Set by the training components from ``nodes``.
NODES_ENV = "KUBETUNE_NODES"


def num_nodes() -> int:
    """How many nodes the training stage should run on (``KUBETUNE_NODES``, default 1).

    Returns:
        The node count, never less than 1.
    """
    return max(1, int(os.environ.get(NODES_ENV) or 1))


def nproc_per_node() -> int:
    """How many training processes this pod should run: one per GPU it holds.

    ``KUBETUNE_NPROC_PER_NODE`` (set by ``kubetune.ops.kube.request_gpus`` from the GPU
    request) wins; otherwise the visible CUDA devices are counted. Never less than 1.

    Returns:
        The process count.
    """
    if os.environ.get(NPROC_ENV):
        return max(1, int(os.environ[NPROC_ENV]))
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def is_torchrun_worker() -> bool:
    """Whether this process was started by torchrun (or a training operator).

    Returns:
        True when ``LOCAL_RANK`` is set, which torchrun sets for every worker it starts.
    """
    return "LOCAL_RANK" in os.environ


def world_size() -> int:
    """Number of training processes in the job (1 outside torchrun).

    Returns:
        ``$WORLD_SIZE`` or 1.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def torchrun_command(
    config_path: str,
    nproc: int,
    module: str = ENTRY_MODULE,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command that runs ``module --config config_path`` once per GPU of this pod.

    ``--standalone`` gives the processes a local rendezvous on a free port, so two
    training pods on one node cannot collide on a fixed master port.

    Args:
        config_path: Training config file passed to the entry point.
        nproc: Processes (GPUs) on this node.
        module: Python module to run in each process.
        extra_args: More arguments for the entry point.

    Returns:
        The argv list.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        "--config",
        str(config_path),
        *extra_args,
    ]


def run_training(
    config_path: str,
    *,
    nproc: int | None = None,
    module: str = ENTRY_MODULE,
    function: str = ENTRY_FUNCTION,
    env: dict[str, str] | None = None,
) -> Any:
    """Run the training entry point, under torchrun when the pod has more than one GPU.

    Args:
        config_path: Training config file (JSON) for the entry point.
        nproc: Processes to start; defaults to ``nproc_per_node()``.
        module: Entry point module (``kubetune.launcher.train_entry``).
        function: Function of ``module`` called in-process: ``function(config_path)``.
        env: Extra environment for the torchrun workers.

    Returns:
        Whatever ``function`` returns when run in-process; ``None`` after a torchrun run
        (results travel through files named in the config, since N processes return N
        values).

    Raises:
        subprocess.CalledProcessError: if any torchrun worker fails.
    """
    nproc = nproc_per_node() if nproc is None else nproc
    if nproc <= 1 or is_torchrun_worker():
        return getattr(importlib.import_module(module), function)(config_path)
    # torchrun forwards a worker's non-zero exit as its own; check=True turns it into an
    # exception, which fails the KFP task (and triggers its retry policy).
    subprocess.run(
        torchrun_command(config_path, nproc, module),
        check=True,
        env={**os.environ, **(env or {})},
    )
    return None


def fsdp_training_args(n_processes: int | None = None) -> dict[str, Any]:
    """``TrainingArguments`` keywords that shard the model when training runs on several GPUs.

    FSDP2 through accelerate: parameters, gradients and optimizer state are sharded
    across ranks, each transformer block wrapped on its own (the model's
    ``_no_split_modules``). Checkpoints are written as ``SHARDED_STATE_DICT``, one file per
    rank, which is fast to save and what ``resume_from_checkpoint`` reloads when a retried
    step restarts on the same number of GPUs. With sharded checkpoints ``trainer.save_model``
    writes no consolidated model: save the final model with ``save_full_model``.

    accelerate applies FSDP only on accelerators; on CPU processes (gloo) the same
    arguments give plain DDP, so ``trainer.is_fsdp_enabled`` is what proves FSDP ran.

    Args:
        n_processes: World size; defaults to ``$WORLD_SIZE``.

    Returns:
        ``{}`` for a single process, else ``{"fsdp": True, "fsdp_config": {...}}``.
    """
    n = world_size() if n_processes is None else n_processes
    if n <= 1:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "SHARDED_STATE_DICT",
            # Each rank loads the checkpoint from disk: simpler and, on the local NVMe or
            # page cache of one node, as fast as rank 0 loading and broadcasting.
            "cpu_ram_efficient_loading": False,
        },
    }


def weights_dtype(model):
    """The dtype of the model's trainable weights (the first one's; None when nothing trains)."""
    return next((p.dtype for p in model.parameters() if p.requires_grad), None)


def fsdp_precision(trainer) -> None:
    """Make FSDP2 train in the precision regime one GPU uses, before ``trainer.train()``.

    accelerate's bf16 policy for FSDP2 upcasts the trainable weights to fp32 and then runs
    every op on bf16 copies, reducing gradients and casting outputs in bf16. One GPU does
    something else in both regimes, so the 2-GPU loss curve drifted from the 1-GPU one
    (measured: bench/fsdp_2gpu.py, docs/kubernetes.md):

    - ``precision=bf16`` (bf16 weights, no master copy): the training core passes
      ``bf16=False`` for the sharded run, so accelerate neither upcasts nor autocasts; FSDP's
      default policy then computes and reduces in the weights' bf16, as DDP does.
    - ``precision=bf16-mixed`` (fp32 master weights): compute on bf16 copies of the weights,
      as autocast does, but reduce gradients in fp32, as one GPU's fp32 gradients are, and
      leave outputs alone (the loss is computed in fp32 inside the model's forward).

    Must run after the Trainer is built (its accelerator holds the plugin) and before
    ``train()`` (which wraps the model).
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = trainer.accelerator.state.fsdp_plugin
    if trainer.args.bf16 and weights_dtype(trainer.model) == torch.float32:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def save_full_model(trainer, output_dir: str) -> None:
    """Save the trained model whole (HF safetensors), also after sharded FSDP checkpoints.

    With ``state_dict_type="SHARDED_STATE_DICT"`` Trainer's ``save_model`` skips the
    weights; switching the plugin to ``FULL_STATE_DICT`` first makes accelerate gather the
    shards on rank 0 (the recipe TRL's scripts use). Every rank must call this.

    Args:
        trainer: A ``transformers.Trainer`` (or TRL trainer) after ``train()``.
        output_dir: Where to write the model.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(output_dir)
