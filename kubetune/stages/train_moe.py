"""Stage `train_moe`: upcycle a dense model into a Mixture of Experts and train experts + router.

Experimental: its interface may still change. The model work is ``kubetune.experimental.moe`` (sparse upcycling, freezing,
router z-loss, utilisation); the loop is the one training core (``kubetune.core.train``), given the
prepared model. What this stage adds is the wiring:

- the load-balancing loss is *in the optimized loss*: transformers' MoE models add
  ``router_aux_loss_coef * aux_loss`` to ``outputs.loss`` only when
  ``config.output_router_logits`` is on, so it is on while training and off in the saved
  config (evaluate's validation loss is then the plain LM loss, comparable with the base);
- the router z-loss goes into the gradient through ``moe.RouterZLoss``;
- both are logged per step, and at the end of training (still inside the stage's MLflow run)
  the parameter counts, per-layer expert utilisation over the validation rows and its heatmap
  ``expert_utilisation.png``;
- LoRA experts are merged into plain experts before the model is saved, so every kind saves as
  a native transformers MoE that reloads with ``AutoModelForCausalLM`` and no custom code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kubetune.core.config import from_dict, setting
from kubetune.errors import ConfigError
from kubetune.core.train import TrainConfig, TrainResult, run_training
from kubetune.tracking import RunContext

# Learning rates when ``learning_rate`` is 0. Upcycled experts start as a trained MLP, so they
# take a full-fine-tuning step: 5x TRL's 2e-5 because runs here are tens of steps, not
# thousands (configs/peft-lora.yaml reasons the same way) and the routers start from scratch.
# LoRA experts take LoRA's 2e-4 (QLoRA paper).
DEFAULT_LEARNING_RATES = {"experts": 1e-4, "lora": 2e-4}

# Defaults of the training core that differ for this stage (any of them can still be set).
# Sized like configs/peft-lora.yaml for 2 CPU cores: 2 rows x 256 tokens x 30 steps = ~15k
# tokens, about a third of an epoch of the bundled tickets. save_steps: a checkpoint of an
# upcycled SmolLM2 is ~2 GB with its optimizer state and a 30-step run loses little to a crash.
TRAIN_DEFAULTS = {"max_steps": 30, "batch_size": 2, "save_steps": 100}


@dataclass
class MoEConfig:
    num_experts: int = setting(4, "Experts per upcycled MLP block (E).")
    top_k: int = setting(2, "Experts each token is routed to; at least 2 (with 1 the router gets no LM gradient).")
    every_k_layers: int = setting(
        2, "Upcycle every k-th MLP (layers k-1, 2k-1, ...): 1 = all (Mixtral for Llama), >1 = Qwen2-MoE, rest dense.")
    noise_std: float = setting(0.01, "Symmetry breaking: expert weights get noise of this times the weight's std.")
    kind: Literal["experts", "lora"] = setting(
        "experts", "experts = full experts copied from the MLP; lora = frozen MLP + one LoRA update per expert.")
    lora_rank: int = setting(8, "Rank of each LoRA expert (kind=lora).")
    router_aux_loss_coef: float = setting(
        0.01, "Weight of the load-balancing loss (Switch Transformer, Fedus et al. 2021, used 0.01).")
    router_z_loss_coef: float = setting(0.001, "Weight of the router z-loss (ST-MoE, Zoph et al. 2022, used 1e-3).")
    train_rest: bool = setting(False, "Also train attention, embeddings, norms and dense MLPs (default: frozen).")
    train: TrainConfig = setting(
        None, "Steps, learning rate, batch size, ... of the training core (method is always a whole model).")

    def __post_init__(self):
        if self.train is None:
            self.train = TrainConfig(**TRAIN_DEFAULTS)
        if self.num_experts < 2:
            raise ConfigError(f"'num_experts' must be >= 2, got {self.num_experts}")
        if not 2 <= self.top_k <= self.num_experts:
            raise ConfigError(f"'top_k' must be between 2 and num_experts={self.num_experts}, got {self.top_k} "
                              "(with top_k=1 the renormalised routing weight is always 1: no LM gradient to the router)")
        if self.every_k_layers < 1:
            raise ConfigError(f"'every_k_layers' must be >= 1, got {self.every_k_layers}")
        if self.noise_std < 0:
            raise ConfigError(f"'noise_std' must be >= 0, got {self.noise_std}")
        if self.lora_rank < 1:
            raise ConfigError(f"'lora_rank' must be >= 1, got {self.lora_rank}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"'{name}' must be >= 0, got {getattr(self, name)}")

    def moe_settings(self) -> dict[str, Any]:
        """The MoE settings alone (what ``kubetune_method.json`` records as ``settings``)."""
        return {k: v for k, v in asdict(self).items() if k != "train"}


def moe_config_from_dict(values: dict[str, Any] | None, source: str = "train_moe settings") -> MoEConfig:
    """Build a ``MoEConfig`` from one flat mapping: MoE keys and training-core keys side by side.

    ``{"num_experts": 8, "max_steps": 100}`` sets ``num_experts`` and ``train.max_steps``. Unknown
    keys and wrong types fail naming the key; ``method`` is refused (this stage decides it).
    """
    values = dict(values or {})
    moe_keys = {f.name for f in dataclasses.fields(MoEConfig)} - {"train"}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"method"}
    if "method" in values:
        raise ConfigError(f"{source}: 'method' is not a train_moe setting (the whole upcycled model is saved); "
                          "use 'kind' (experts or lora) and 'train_rest'")
    unknown = sorted(set(values) - moe_keys - train_keys)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(moe_keys | train_keys)}")
    train = from_dict(TrainConfig, {**TRAIN_DEFAULTS, **{k: v for k, v in values.items() if k in train_keys}},
                      source)
    return from_dict(MoEConfig, {**{k: v for k, v in values.items() if k in moe_keys}, "train": train}, source)


def train_moe(cfg: MoEConfig, tokenized_dir: str | Path, output_dir: str | Path, workspace: str | Path,
              ctx: RunContext | None = None) -> TrainResult:
    """Upcycle ``cfg.train.base_model`` into a Mixture of Experts and train its experts and routers.

    Args:
        cfg: MoE settings and, in ``cfg.train``, the training core's (steps, learning rate, ...).
        tokenized_dir: Output of ``tokenize_data``; its validation rows measure expert utilisation.
        output_dir: Where the whole MoE model (safetensors), tokenizer, manifest and
            ``expert_utilisation.json`` are written.
        workspace: Folder for checkpoints (a shared volume on a cluster); reruns resume there.
        ctx: When given, logs to an MLflow child run named ``train-moe``.

    Returns:
        The training core's metrics plus ``moe_total_params``/``moe_active_params`` (active = per
        token), ``load_balance_loss_first``/``_last`` and the utilisation extremes; and the folder.
    """
    import datasets
    import torch

    from kubetune.core import models

    from kubetune.experimental import moe

    # method "full": to the core the upcycled model is a whole model (flags, whole-folder save).
    # fast_path "off": the GPU fast path computes its own loss (no balance loss) and runs no callbacks.
    lr = cfg.train.learning_rate or DEFAULT_LEARNING_RATES[cfg.kind]
    train_cfg = replace(cfg.train, method="full", learning_rate=lr, fast_path="off")

    # fp32 weights; on a bf16 GPU the Trainer autocasts (precision=auto).
    dense = models.load_causal_lm(train_cfg.base_model, dtype=torch.float32,
                                  trust_remote_code=train_cfg.trust_remote_code, allow_pickle=train_cfg.allow_pickle)
    try:
        model = moe.upcycle(dense, num_experts=cfg.num_experts, top_k=cfg.top_k, every_k_layers=cfg.every_k_layers,
                            noise_std=cfg.noise_std, router_aux_loss_coef=cfg.router_aux_loss_coef, kind=cfg.kind,
                            lora_rank=cfg.lora_rank, lora_alpha=2.0 * cfg.lora_rank, seed=train_cfg.seed)
    except ValueError as e:  # unsupported family, too few layers for every_k_layers, ...
        raise ConfigError(f"train_moe: {e}") from None
    del dense
    moe.freeze_for_moe(model, train_rest=cfg.train_rest)
    # Without this the load-balancing loss is computed nowhere and the router learns only from
    # the LM loss (transformers adds router_aux_loss_coef * aux_loss to outputs.loss only then).
    model.config.output_router_logits = True
    model.kubetune_method = {"method": "moe", "settings": cfg.moe_settings()}

    val_rows = list(datasets.load_from_disk(str(tokenized_dir))["validation"])
    report = _report_callback(model, cfg, val_rows)
    # The core keys checkpoints by the training config and data; the MoE settings key the
    # workspace, so a rerun with another kind or E never resumes from an incompatible checkpoint.
    moe_key = hashlib.sha256(json.dumps(cfg.moe_settings(), sort_keys=True).encode()).hexdigest()[:12]
    try:
        result = run_training("train-moe", train_cfg, tokenized_dir, output_dir, Path(workspace) / f"moe-{moe_key}",
                              ctx, model=model, callbacks=(report,))
    finally:
        report.remove_hooks()
    (Path(output_dir) / "expert_utilisation.json").write_text(
        json.dumps({"utilisation": {str(k): v for k, v in report.utilisation.items()}, **report.summary}, indent=2))
    result.metrics.update(report.summary)
    return result


# ---------------------------------------------------------------- logging and reports


def _report_callback(model, cfg: MoEConfig, val_rows: list[dict]):
    """Per-step router losses to MLflow; at the end of training: merge, then count and measure.

    ``on_log`` logs straight to the active MLflow run (the stage's child run): keys a callback
    adds to ``logs`` are not seen by the Trainer's MLflow callback, which runs before ours.
    ``on_train_end`` runs before the training core saves the model, so merging LoRA experts and
    turning ``output_router_logits`` off there is what gets saved.
    """
    from transformers import TrainerCallback

    from kubetune.experimental import moe

    from kubetune import tracking

    class MoEReport(TrainerCallback):
        def __init__(self):
            self.z_loss = moe.router_losses(model, cfg.router_aux_loss_coef, cfg.router_z_loss_coef,
                                            cfg.train.gradient_accumulation_steps)
            self.aux: list[float] = []  # load-balancing loss of every training forward
            self.load_balance_history: list[float] = []  # its mean per logged step
            self._aux_seen = self._z_seen = 0
            self._aux_handle = model.register_forward_hook(self._record_aux)
            self.utilisation: dict[int, list[float]] = {}
            self.summary: dict[str, float] = {}

        def _record_aux(self, module, args, output):
            aux = getattr(output, "aux_loss", None)
            if module.training and aux is not None:
                self.aux.append(float(aux.detach()))

        def remove_hooks(self) -> None:
            self.z_loss.remove()
            self._aux_handle.remove()

        def on_train_begin(self, args, state, control, **kwargs):
            if "mlflow" in (args.report_to or []):
                tracking.set_tags({"kubetune.method": "moe", "kubetune.moe_kind": cfg.kind})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs:
                return
            out = {}
            new_aux, self._aux_seen = self.aux[self._aux_seen:], len(self.aux)
            if new_aux:
                out["load_balance_loss"] = sum(new_aux) / len(new_aux)
                self.load_balance_history.append(out["load_balance_loss"])
            new_z, self._z_seen = self.z_loss.values[self._z_seen:], len(self.z_loss.values)
            if new_z:
                out["router_z_loss"] = sum(new_z) / len(new_z)
            if out and "mlflow" in (args.report_to or []):
                tracking.log_metrics(out, step=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.remove_hooks()
            model.router_aux_loss_coef = cfg.router_aux_loss_coef
            moe.merge_lora_experts(model)
            model.config.output_router_logits = False
            counts = moe.param_counts(model)
            self.utilisation = moe.expert_utilisation(model, val_rows)
            shares = [s for layer in self.utilisation.values() for s in layer]
            self.summary = {
                "moe_total_params": counts.total,
                "moe_active_params": counts.active,
                "moe_active_share": round(counts.active / counts.total, 4),
                "moe_layers": len(self.utilisation),
                # Uniform routing gives 1/E everywhere; a layer collapsed onto k experts gives 1/k.
                "utilisation_max_share": max(shares, default=0.0),
                "utilisation_min_share": min(shares, default=0.0),
            }
            if self.load_balance_history:
                self.summary["load_balance_loss_first"] = self.load_balance_history[0]
                self.summary["load_balance_loss_last"] = self.load_balance_history[-1]
            if "mlflow" in (args.report_to or []):
                tracking.log_metrics(self.summary)
                tracking.log_metrics({f"expert_share.layer_{layer}.expert_{e}": s
                                      for layer, row in self.utilisation.items() for e, s in enumerate(row)})
                if self.utilisation:
                    title = f"Expert utilisation, validation set ({cfg.kind}, top-{cfg.top_k})"
                    tracking.log_figure(moe.plot_utilisation(self.utilisation, title=title), "expert_utilisation.png")

    return MoEReport()
