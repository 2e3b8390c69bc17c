"""The one training core. `train_full`, `train_peft` (and the stages built on them) differ by
configuration only: which weights train (``kubetune.core.peft_methods.apply_method``) and a few
flags.

On a CUDA machine the loop is the GPU fast path (``kubetune.core.fastpath.fast_train``: one GPU or
several under torchrun, checkpoints and resume included). The Trainer path (transformers'
``Trainer``) runs only where the fast path cannot honour the configuration (the CPU, QLoRA,
prompt/prefix tuning, a setting it does not implement): ``fastpath.fast_path_blocker`` says
why, and the reason is printed and logged to MLflow.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError, StageError
from kubetune.core.models import DEFAULT_BASE_MODEL
from kubetune.lib.dataset import atomic_file, fsync_path, staging_dir, swap_in
from kubetune.core.peft_methods import METHODS, method_spec

IGNORE = -100
COMPLETE_MARKER = "KUBETUNE_COMPLETE"


@dataclass
class TrainConfig:
    base_model: str = setting(DEFAULT_BASE_MODEL, "Base model: packaged name, local folder or hub id.")
    method: Literal[METHODS] = setting(
        "lora", "Which weights train: all (full) or a PEFT method.")
    max_steps: int = setting(
        0, "Optimizer steps; 0 = worked out from the data: 'epochs' passes over the training rows, at least "
           "'min_steps', at most 'step_cap' (TrainConfig.steps_for shows the arithmetic).")
    epochs: float = setting(
        1.0, "Passes over the training rows when max_steps is 0, so the run scales with the data (a fraction is "
             "fine). The step count is worked out before training; warmup, schedule and time cap use it.")
    min_steps: int = setting(20, "Fewest optimizer steps 'epochs' may give (tiny data is repeated up to it).")
    step_cap: int = setting(
        60, "Most optimizer steps 'epochs' may give (0 = no cap): sized so the main job trains in about 5 of its 10 "
            "minutes on 2 CPU cores; raise it where steps are cheap (a GPU).")
    eval_steps: int = setting(
        0, "Validation loss every this many optimizer steps during training (0 = 'evaluations' spread over the run).")
    evaluations: int = setting(
        4, "Validation-loss evaluations spread evenly over the run when eval_steps is 0 (0 = none). Only where "
           "the Trainer path trains (the CPU, QLoRA, prompt/prefix tuning): the GPU fast path does not evaluate "
           "during training, so these are skipped there; an explicit eval_steps moves a GPU run to the Trainer path.")
    best_checkpoint: bool = setting(
        True, "Finish with the weights of the evaluation that had the lowest validation loss (the Trainer's "
              "load_best_model_at_end), not the last step's; needs evaluations, and checkpoints at each one.")
    early_stopping_patience: int = setting(
        2, "Stop once this many evaluations in a row brought no lower validation loss (0 = never); needs "
           "best_checkpoint, so the run ends with the best weights rather than the last.")
    learning_rate: float = setting(0.0, "Peak learning rate; 0 = the method's known-good default.")
    batch_size: int = setting(4, "Rows per device per micro-batch (a row holds several packed examples).")
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = setting(0.1, "Share of steps spent warming the learning rate up.")
    lr_scheduler: str = setting("cosine", "transformers scheduler name (cosine, linear, constant, ...).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    lora_rank: int = setting(16, "LoRA/DoRA rank (and bottleneck width of 'adapter').")
    lora_alpha: float = setting(32.0, "LoRA alpha; updates are scaled by alpha/rank.")
    lora_dropout: float = setting(0.05, "Dropout on LoRA inputs and inside adapters.")
    target_modules: str = setting("all-linear", "Layers that get LoRA: 'all-linear' or 'q_proj,v_proj,...'.")
    num_virtual_tokens: int = setting(20, "Learned tokens for prompt/prefix tuning.")
    prefix_init: Literal["text", "random"] = setting(
        "text", "Prefix tuning's start: 'text' = the base model's keys/values over a neutral system prompt "
                "(Li & Liang 2021's init from real words), 'random' = PEFT's N(0, 1) embedding.")
    adapter_placement: Literal["houlsby", "pfeiffer"] = setting(
        "houlsby", "method 'adapter' only: 'houlsby' = an adapter after the attention and the MLP block of every "
                   "layer; 'pfeiffer' = after the MLP block only (half the adapters).")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward (less memory, ~30% slower).")
    optimizer: str = setting("adamw_torch", "transformers optim name: adamw_torch, adamw_torch_fused, adamw_8bit, ...")
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed"] = setting(
        "auto", "auto = bf16 on a GPU that has it, fp32 on CPU. bf16: weights, gradients and optimizer state in bf16 "
                "(half the memory); bf16-mixed: fp32 master weights, bf16 compute (autocast), the Trainer's usual AMP. "
                "Several GPUs (FSDP) train in the same regime as one.")
    save_steps: int = setting(20, "Checkpoint every N steps (resume starts from the last complete one).")
    max_train_seconds: float = setting(
        0.0, "Stop after the step that crosses this many seconds of training (0 = no limit): the same-wall-clock "
             "budget of `kubetune compare`. The learning-rate schedule stays laid out over max_steps.")
    seed: int = setting(0, "Seed of initialisation and data order.")
    merge: bool = setting(False, "Also save the adapter merged into the base weights "
                          f"({', '.join(m for m in METHODS if method_spec(m).mergeable)}).")
    fast_path: Literal["auto", "off"] = setting("auto", "auto = use the GPU fast path when on a GPU.")
    trust_remote_code: bool = setting(False, "Run code shipped with the model (off unless you trust it).")
    allow_pickle: bool = setting(False, "Load pickle (.bin) weights (off: they can run code).")

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "save_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.epochs < 0 or (self.max_steps == 0 and self.epochs == 0):
            raise ConfigError(f"'max_steps' ({self.max_steps}) or 'epochs' ({self.epochs}) must be > 0 (neither "
                              "negative): how long to train")
        if self.min_steps < 1 or self.step_cap < 0 or (self.step_cap and self.step_cap < self.min_steps):
            raise ConfigError(f"'min_steps' ({self.min_steps}) must be >= 1 and 'step_cap' ({self.step_cap}) 0 "
                              "(no cap) or >= min_steps")
        if self.eval_steps < 0 or self.evaluations < 0 or self.early_stopping_patience < 0:
            raise ConfigError("'eval_steps', 'evaluations' and 'early_stopping_patience' must be >= 0 (0 = off)")
        if self.best_checkpoint and not (self.eval_steps or self.evaluations):
            raise ConfigError("'best_checkpoint' needs 'eval_steps' or 'evaluations' > 0: the best is chosen among "
                              "evaluations")
        if self.early_stopping_patience and not self.best_checkpoint:
            raise ConfigError("'early_stopping_patience' needs 'best_checkpoint': stopping early must keep the best "
                              "weights seen, not the last")
        if self.max_train_seconds < 0:
            raise ConfigError(f"'max_train_seconds' must be >= 0 (0 = no limit), got {self.max_train_seconds}")
        if self.learning_rate < 0 or self.learning_rate > 1:
            raise ConfigError(f"'learning_rate' must be in [0, 1], got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"'lora_dropout' must be in [0, 1), got {self.lora_dropout}")

    def steps_for(self, train_rows: int, world: int = 1) -> int:
        """Optimizer steps: ``max_steps``, or else ``epochs`` passes over ``train_rows`` rows, kept
        within [``min_steps``, ``step_cap``].

        The default is one pass, at least 20 and at most 60 steps, at batch_size x accumulation x
        world rows per step. The bundled tickets (the main job): 432 tickets, two per 256-token row =
        216 rows; at 2 rows per step one epoch is 108 steps, capped to 60 = 120 rows, 240 tickets,
        0.56 epoch. The cap is the CPU budget: 60 steps x ~5.3 s on 2 cores = ~5.3 minutes, leaving
        ingest, evaluation and registration inside the main job's 10 minutes; on that task 60 steps
        come close to the exact match of 108 and 324 and 30 do not (docs/compare.md, "Training length").
        A task of 300 short examples packed 3 to a row = 100 rows = 50 steps, one full epoch. Ten
        examples = 5 rows = 3 steps, raised to 20 (eight passes): below that LoRA has barely moved
        from its zero start. 100,000 rows = 50,000 steps, capped to 60: raise step_cap (or set
        max_steps) where steps are cheap.
        """
        if self.max_steps:
            return self.max_steps
        per_step = self.batch_size * self.gradient_accumulation_steps * world
        steps = max(self.min_steps, math.ceil(self.epochs * math.ceil(train_rows / per_step)))
        return min(steps, self.step_cap) if self.step_cap else steps

    def eval_every(self, steps: int) -> int:
        """Steps between evaluations: ``eval_steps``, or ``evaluations`` spread over ``steps``
        (60 steps / 4 = every 15; the last evaluation falls on the last step when it divides)."""
        if self.eval_steps or not self.evaluations:
            return self.eval_steps
        return max(1, math.ceil(steps / self.evaluations))

    def lr(self) -> float:
        from kubetune.core.peft_methods import default_learning_rate

        return self.learning_rate or default_learning_rate(self.method)


@dataclass
class TrainResult:
    metrics: dict
    output_dir: str
    losses: list[float] = field(default_factory=list)  # per optimizer step (rank 0's view of the global loss)


class PackedCollator:
    """Pads packed rows to the longest in the batch; passes position_ids, no attention mask.

    transformers turns position_ids that restart at 0 into a block-diagonal causal mask
    (sdpa/eager) or varlen kernels (flash attention). Padding is given its own positions
    (0, 1, ...) so it forms a separate block that no real token attends to, and label -100.

    ``use_cache=False`` is part of the batch, and it matters: transformers 5 only looks for
    packed sequences when no KV cache exists (``masking_utils._preprocess_mask_arguments``),
    and the models create one by default, even in training. With a cache, packed examples
    would silently attend to each other (tests/test_tokenize_data.py proves both ways).
    """

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids, labels, pos = [], [], []
        for r in rows:
            n = len(r["input_ids"])
            ids.append(list(r["input_ids"]) + [self.pad] * (width - n))
            labels.append(list(r["labels"]) + [IGNORE] * (width - n))
            pos.append(list(r["position_ids"]) + list(range(width - n)))
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos),
                 "use_cache": False}
        if not (batch["labels"] != IGNORE).any():
            raise StageError("a training batch has no trainable label at all (every token masked); "
                             "check the response mask of the data (tokenize_data counts)")
        return batch


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Newest checkpoint that finished writing (has our marker); half-written ones are skipped."""
    if not checkpoint_dir.exists():
        return None
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def commit_checkpoint(ckpt: Path, step: int) -> None:
    """Make a written checkpoint durable, then mark it complete atomically.

    Every file is fsynced first; the marker is written to a temporary name, fsynced and renamed,
    and the folder fsynced, so after a crash (SIGKILL, power loss) the marker exists only if all
    the files it vouches for are on disk: write, fsync, rename, at the level of the checkpoint.
    """
    for path in sorted(ckpt.rglob("*")):
        if path.is_file():
            fsync_path(path)
    with atomic_file(ckpt / COMPLETE_MARKER, durable=True) as tmp:
        tmp.write_text(str(step))
    fsync_path(ckpt.parent)


def _disk_full(e: BaseException) -> bool:
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    # torch's and safetensors' writers wrap the OS error in their own exception types.
    text = str(e)
    return any(m in text for m in ("No space left on device", "File too large", "Disk quota exceeded"))


def _disk_full_error(where: Path, e: BaseException) -> StageError:
    return StageError(f"train: the disk is full while writing {where} ({e}); free space or point "
                      "KUBETUNE_WORKSPACE at a larger volume, checkpoint less often (raise save_steps) or "
                      "train a PEFT method (its checkpoints are megabytes, not the whole model)")


def _cpu_out_of_memory(e: BaseException) -> bool:
    # torch's CPU allocator raises a plain RuntimeError, not OutOfMemoryError
    return isinstance(e, RuntimeError) and any(m in str(e) for m in (
        "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory"))


def _out_of_memory(cfg: TrainConfig, e: BaseException) -> StageError:
    text = " ".join(str(e).split())[:300]
    return StageError(f"train: out of memory at batch_size={cfg.batch_size}; lower batch_size, raise "
                      "gradient_accumulation_steps, turn on gradient_checkpointing or use a PEFT method "
                      f"({type(e).__name__}: {text})")


def _callbacks(collator: PackedCollator, max_train_seconds: float = 0.0):
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        """Adds tokens/s and peak memory to every log; marks checkpoints complete."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is not None and "loss" in logs:
                dt = time.perf_counter() - self.t0
                seen = state.num_input_tokens_seen - self.tok0  # non-padding, summed over ranks
                logs["tokens_per_s"] = round(seen / dt, 1) if dt > 0 else 0.0
                logs["peak_memory_gb"] = round(peak_memory_gb(), 3)

        def on_step_end(self, args, state, control, **kw):
            if max_train_seconds and time.perf_counter() - self.t0 > max_train_seconds:
                control.should_training_stop = True  # the wall-clock budget is spent

        def on_save(self, args, state, control, **kw):
            # The Trainer has finished writing checkpoint-N when on_save runs (it writes into
            # that folder directly, so the folder cannot be renamed into place); commit it instead.
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its part of checkpoint-N
            # One committer: ranks racing on the same marker file would rename it from under each other.
            if state.is_world_process_zero and ckpt.exists():
                commit_checkpoint(ckpt, state.global_step)

    return [Throughput()]


def load_for_training(cfg: TrainConfig, device: str, tokenizer=None):
    """Load the base model as the method needs it and make the right weights trainable."""
    import torch

    from kubetune.core import models
    from kubetune.core.peft_methods import PeftSettings, apply_method, load_base_model, validate_method

    validate_method(cfg.method, device)
    bf16 = _use_bf16(cfg, device)
    if method_spec(cfg.method).needs_cuda:
        model = load_base_model(models.resolve(cfg.base_model), "qlora", trust_remote_code=cfg.trust_remote_code,
                                allow_pickle=cfg.allow_pickle)
    else:
        pure_bf16 = bf16 and cfg.precision != "bf16-mixed"
        model = models.load_causal_lm(cfg.base_model, dtype=torch.bfloat16 if pure_bf16 else torch.float32,
                                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    settings = PeftSettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=cfg.target_modules, num_virtual_tokens=cfg.num_virtual_tokens,
                            prefix_init=cfg.prefix_init, adapter_placement=cfg.adapter_placement)
    return apply_method(model, cfg.method, settings, tokenizer=tokenizer)


def _use_bf16(cfg: TrainConfig, device: str) -> bool:
    import torch

    if cfg.precision == "fp32":
        return False
    if cfg.precision in ("bf16", "bf16-mixed"):
        return True
    return device == "cuda" and torch.cuda.is_bf16_supported()


def train(cfg: TrainConfig, tokenized_dir: str | Path, output_dir: str | Path, checkpoint_dir: str | Path,
          report_to_mlflow: bool = True, model=None, callbacks: tuple = ()) -> TrainResult:
    """Train on a tokenized dataset and save the result (adapter or full weights).

    Args:
        cfg: Training settings (method, steps, learning rate, ...).
        tokenized_dir: Output folder of ``tokenize_data``.
        output_dir: Where the trained model is written (safetensors + tokenizer + manifest).
        checkpoint_dir: Where periodic checkpoints go; a later run with the same folder resumes
            from the last complete checkpoint there.
        report_to_mlflow: Log params, per-step loss, learning rate, tokens/s and peak memory to
            the active MLflow run.
        model: An already prepared model (e.g. upcycled to MoE, trainable parameters chosen, with
            ``kubetune_method`` set for ``save_trained``); None = load ``cfg.base_model`` and apply
            ``cfg.method``. Stages that prepare models differently still share this one loop.
        callbacks: Extra ``TrainerCallback``s (e.g. router z-loss logging).

    Returns:
        Metrics (losses, tokens/s, peak memory, trainable parameter counts) and the output path.
    """
    import datasets
    import torch
    from transformers import AutoTokenizer, set_seed

    from kubetune.core.fastpath import fast_path_blocker
    from kubetune.core.models import pick_device
    from kubetune.core.peft_methods import save_trained, trainable_summary, training_flags_for

    from kubetune.launcher import launch

    device = pick_device()
    world, rank = launch.world_size(), int(os.environ.get("RANK", "0"))
    set_seed(cfg.seed)
    tokenized_dir = Path(tokenized_dir)
    data = datasets.load_from_disk(str(tokenized_dir))
    meta = json.loads((tokenized_dir / "meta.json").read_text())
    cfg = replace(cfg, max_steps=cfg.steps_for(len(data["train"]), world))
    tokenizer = AutoTokenizer.from_pretrained(tokenized_dir / "tokenizer")
    flags = training_flags_for(cfg.method, gradient_checkpointing=cfg.gradient_checkpointing,
                               packing=meta.get("tokenize", {}).get("packing", False))
    if meta.get("tokenize", {}).get("packing") and not flags["packing"]:
        raise StageError(f"method '{cfg.method}' cannot train on packed rows (virtual tokens are added once per "
                         "row, so packed examples would see each other); tokenize with packing=false")
    if model is None:
        if world == 1:  # the estimate is per device; sharded runs are sized by the cluster profile
            from kubetune.core.memory_check import check_memory

            check_memory(cfg, meta.get("tokenize", {}).get("max_length") or 512, device)
        model = load_for_training(cfg, device, tokenizer)
    params = trainable_summary(model)
    collator = PackedCollator(meta.get("pad_token_id") or tokenizer.pad_token_id)
    checkpoint_dir = Path(checkpoint_dir)
    try:
        reason = fast_path_blocker(cfg, model, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fast = reason is None
    if not fast:
        print(f"train: Trainer path: {reason}", flush=True)
    # The fast path does not evaluate during training: the derived evaluations are dropped there
    # (and so are best checkpoint and early stopping), and the manifest records what ran.
    cfg = _with_evaluations(cfg, 0 if fast or "validation" not in data else len(data["validation"]))
    if report_to_mlflow:
        from kubetune.tracking import log_params

        log_params({"kubetune.train_path": "fast" if fast else "trainer",
                    **({} if fast else {"kubetune.train_path_reason": reason[:500]})})
    trainer = None if fast else _trainer(cfg, model, data, collator, tokenizer, device, checkpoint_dir,
                                         report_to_mlflow, callbacks, flags)
    resume = None if fast else last_complete_checkpoint(checkpoint_dir)
    t0 = time.perf_counter()
    try:
        if fast:
            out = _train_fast(cfg, model, data["train"], collator.pad, report_to_mlflow, checkpoint_dir)
            losses, tokens = out["losses"], out["tokens"]
        else:
            tokens0 = trainer.state.num_input_tokens_seen
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            tokens = trainer.state.num_input_tokens_seen - tokens0
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise _out_of_memory(cfg, e) from None
    except Exception as e:  # checkpoints are written during training
        if _disk_full(e):
            raise _disk_full_error(checkpoint_dir, e) from None
        if _cpu_out_of_memory(e):
            raise _out_of_memory(cfg, e) from None
        raise
    wall = time.perf_counter() - t0

    # Not atomic_dir: with sharded weights every rank writes into the folder, rank 0 swaps it in.
    output_dir = Path(output_dir)
    tmp = staging_dir(output_dir)
    trained = model if fast else trainer.model
    sharded = getattr(trainer, "is_fsdp_enabled", False) or (fast and world > 1 and method_spec(cfg.method).fsdp)
    if getattr(trainer, "is_fsdp_enabled", False):
        launch.save_full_model(trainer, str(tmp))  # every rank takes part in gathering the shards
    elif sharded:
        from kubetune.core.fastpath import save_sharded_model

        save_sharded_model(model, tmp)
    if rank != 0:
        return TrainResult(metrics={}, output_dir=str(output_dir))
    if not sharded:
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(trained, tmp, tokenizer=tokenizer)
    else:
        tokenizer.save_pretrained(tmp)
        (tmp / "kubetune_method.json").write_text(json.dumps({**trained.kubetune_method,
                                                             "parameters": params}))
    manifest_path = tmp / "kubetune_method.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(base_model=cfg.base_model, train=asdict(cfg), data_fingerprint=meta.get("fingerprint"),
                    shape=meta.get("shape"))
    manifest_path.write_text(json.dumps(manifest, indent=2))
    if cfg.merge and method_spec(cfg.method).mergeable:
        merged = trained.merge_and_unload()
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    swap_in(tmp, output_dir)
    metrics = {
        "train_loss_first": losses[0] if losses else float("nan"),
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]) if losses else float("nan"),
        "train_wall_s": round(wall, 1),
        # the fast path times its steps after warm-up (compilation apart, in compile_s)
        "tokens_per_s": round(out["tokens_per_s"] if fast else tokens / wall, 1) if wall > 0 else 0.0,
        "tokens": int(tokens),
        **({"compile_s": round(out["compile_s"], 1)} if fast else {}),
        "peak_memory_gb": round(peak_memory_gb(), 3),
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "trainable_share": params["share"],
        "steps": len(losses) if fast else trainer.state.global_step,
        "resumed_from_step": out["resumed_from"] if fast else int(resume.name.split("-")[-1]) if resume else 0,
        "fast_path": int(fast),
        **({} if fast else _eval_metrics(trainer.state)),
    }
    return TrainResult(metrics=metrics, output_dir=str(output_dir), losses=[float(x) for x in losses])


def _train_fast(cfg: TrainConfig, model, rows, pad_id: int, report_to_mlflow: bool, checkpoint_dir: Path) -> dict:
    import torch

    from kubetune.launcher import launch
    from kubetune.core.fastpath import fast_train

    if launch.world_size() > 1 and not torch.distributed.is_initialized():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl")

    def on_step(step, loss, lr, tokens):
        if report_to_mlflow:
            from kubetune.tracking import log_metrics

            log_metrics({"loss": loss, "learning_rate": lr}, step=step)

    model.to("cuda")
    # Rows of the tokenized dataset are re-packed into a fixed token budget per step:
    # batch_size rows x the longest row = the same number of tokens the Trainer path sees.
    width = max(len(r["input_ids"]) for r in rows.select(range(min(len(rows), 64))))
    return fast_train(model, list(rows), max_steps=cfg.max_steps, lr=cfg.lr(), tokens_per_step=cfg.batch_size * width,
                      grad_accum=cfg.gradient_accumulation_steps,
                      warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps), lr_scheduler=cfg.lr_scheduler,
                      optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, grad_clip=cfg.max_grad_norm or None,
                      seed=cfg.seed, activation_checkpointing=cfg.gradient_checkpointing,
                      checkpoint_dir=checkpoint_dir, save_steps=cfg.save_steps, pad_token_id=pad_id,
                      on_step=on_step, max_seconds=cfg.max_train_seconds)


def _trainer(cfg: TrainConfig, model, data, collator: PackedCollator, tokenizer, device: str, checkpoint_dir: Path,
             report_to_mlflow: bool, callbacks: tuple, flags: dict):
    """transformers' Trainer for the runs the fast path does not take (the CPU, QLoRA, prompt/prefix)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from kubetune.launcher import launch

    bf16 = _use_bf16(cfg, device)
    # Several GPUs in one pod (torchrun): full fine-tuning shards with FSDP; adapters are
    # small, so PEFT methods replicate the model (DDP) and all-reduce the adapter grads.
    # KUBETUNE_FSDP=off replicates with DDP instead (the escape hatch when a model's FSDP
    # wrapping misbehaves, and the baseline bench/fsdp_2gpu.py compares against).
    fsdp = (launch.fsdp_training_args() if method_spec(cfg.method).fsdp and device == "cuda"
            and os.environ.get("KUBETUNE_FSDP", "on") != "off" else {})
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.lr(),
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        # Weights already in bf16 need no AMP; under FSDP, AMP would upcast them to fp32 master
        # weights (launch.fsdp_precision), a different run from the one on one GPU.
        bf16=bf16 and not (fsdp and launch.weights_dtype(model) == torch.bfloat16),
        use_cpu=device == "cpu",
        gradient_checkpointing=flags["gradient_checkpointing"],
        logging_steps=1,
        # Choosing the best evaluation needs a checkpoint at each one (the best is kept besides the last two).
        save_steps=cfg.eval_steps if cfg.best_checkpoint else cfg.save_steps,
        save_total_limit=2,
        save_strategy="steps",
        **_eval_args(cfg),
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=["mlflow"] if report_to_mlflow else [],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Counted by the Trainer on the batches it trains on, gathered over ranks (the collator
        # would also count the batch accelerate's loader fetches ahead).
        include_num_input_tokens_seen="non_padding",
        **fsdp,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], data_collator=collator,
                      eval_dataset=data["validation"] if cfg.eval_steps else None, processing_class=tokenizer,
                      callbacks=list(callbacks) + _early_stopping(cfg))
    if getattr(trainer, "is_fsdp_enabled", False):
        launch.fsdp_precision(trainer)
    # Ours run first: the keys they add to the logs (tokens/s, peak memory) then reach the
    # MLflow callback, which transformers registers before any user callback.
    for cb in reversed(_callbacks(collator, cfg.max_train_seconds)):
        trainer.callback_handler.callbacks.insert(0, cb)
    return trainer


def _with_evaluations(cfg: TrainConfig, validation_rows: int) -> TrainConfig:
    """``cfg`` with its evaluation schedule fixed for the Trainer path: ``evaluations`` become an
    ``eval_steps``; with no validation rows there is nothing to evaluate, so none (and no best
    checkpoint or early stopping) unless ``eval_steps`` asked for them by name."""
    if cfg.eval_steps:
        return cfg
    every = cfg.eval_every(cfg.max_steps) if validation_rows else 0
    if not every:
        return replace(cfg, evaluations=0, best_checkpoint=False, early_stopping_patience=0)
    return replace(cfg, eval_steps=every)


def _eval_args(cfg: TrainConfig) -> dict:
    """TrainingArguments for evaluation during training (none when ``eval_steps`` is 0)."""
    if not cfg.eval_steps:
        return {}
    return dict(eval_strategy="steps", eval_steps=cfg.eval_steps, per_device_eval_batch_size=cfg.batch_size,
                load_best_model_at_end=cfg.best_checkpoint, metric_for_best_model="eval_loss",
                greater_is_better=False)


def _early_stopping(cfg: TrainConfig) -> list:
    if not cfg.early_stopping_patience:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]


def _eval_metrics(state) -> dict:
    """The validation losses seen during training: the best, its step, the last, whether it stopped early."""
    evals = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]
    if not evals:
        return {}
    best_step, best = min(evals, key=lambda e: e[1])
    return {"eval_loss_best": best, "eval_loss_best_step": best_step, "eval_loss_last": evals[-1][1],
            "evaluations": len(evals), "stopped_early": int(state.global_step < state.max_steps)}


def checkpoint_dir_for(workspace: str | Path, cfg: TrainConfig, meta: dict) -> Path:
    """Checkpoints of one job: a rerun of the same job resumes, another starts fresh.

    The same job = the same training config, the same tokenized rows (data fingerprint with its
    split, and the tokenize settings, from the tokenized folder's ``meta``) and the same code.
    """
    from kubetune.lib.run_keys import code_hash, digest

    key = digest(asdict(cfg), meta.get("fingerprint", ""), meta.get("tokenize"), code_hash())[:12]
    return Path(workspace) / "checkpoints" / key


def run_training(stage: str, cfg: TrainConfig, tokenized_dir: str | Path, output_dir: str | Path,
                 workspace: str | Path, ctx=None, model=None, callbacks: tuple = ()) -> TrainResult:
    """What every training stage does: pick the checkpoint folder, track, train, clean up.

    With several GPUs in the pod (``kubetune.launcher.launch.nproc_per_node() > 1``) and no prepared
    model, the same stage re-runs itself under torchrun (``kubetune.launcher.train_entry``); rank 0
    tracks and saves, and its result comes back through a JSON file.
    """
    from kubetune.launcher import launch
    from kubetune.tracking import log_metrics, log_params, maybe_stage

    if model is None and not launch.is_torchrun_worker() and (launch.num_nodes() > 1 or launch.nproc_per_node() > 1):
        return _run_under_torchrun(stage, cfg, tokenized_dir, output_dir, workspace, ctx)
    if int(os.environ.get("RANK", "0")) != 0:
        ctx = None  # one MLflow run per stage, owned by rank 0
    meta = json.loads((Path(tokenized_dir) / "meta.json").read_text())
    ckpt = checkpoint_dir_for(workspace, cfg, meta)
    tags = {"kubetune.method": cfg.method, "kubetune.base_model": cfg.base_model,
            "kubetune.data_fingerprint": meta.get("fingerprint", ""), "kubetune.checkpoint": ckpt.name}
    with maybe_stage(ctx, stage, tags=tags) as run:
        if run is not None:
            log_params({f"kubetune.{k}": v for k, v in asdict(cfg).items()})
            if last_complete_checkpoint(ckpt) is not None:  # resuming: the run that wrote it was killed
                from kubetune.tracking import end_orphans

                end_orphans("kubetune.checkpoint", ckpt.name, keep=run.info.run_id)
        result = train(cfg, tokenized_dir, output_dir, ckpt, report_to_mlflow=run is not None, model=model,
                       callbacks=callbacks)
        if run is not None:
            log_metrics(result.metrics)
    # The model is saved: the checkpoints were only there to survive a crash.
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _run_under_torchrun(stage, cfg, tokenized_dir, output_dir, workspace, ctx) -> TrainResult:
    from kubetune.launcher import launch

    job = Path(workspace) / "jobs" / f"{stage}-{os.getpid()}-{int(time.time())}"
    job.mkdir(parents=True, exist_ok=True)
    spec = {"stage": stage, "cfg": asdict(cfg), "tokenized_dir": str(tokenized_dir),
            "output_dir": str(output_dir), "workspace": str(workspace),
            "ctx": asdict(ctx) if ctx is not None else None, "result": str(job / "result.json")}
    if launch.num_nodes() > 1:
        from kubetune.launcher.trainjob import train_on_nodes

        spec = train_on_nodes(job, spec, launch.num_nodes())
    else:
        (job / "config.json").write_text(json.dumps(spec))
        launch.run_training(str(job / "config.json"))
    result = json.loads((job / "result.json").read_text())
    return TrainResult(metrics=result["metrics"], output_dir=result["output_dir"], losses=result.get("losses", []))
