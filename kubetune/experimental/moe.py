"""Mixture of Experts by sparse upcycling: turn a dense decoder into a transformers MoE model.

Experimental (its interface may still change): the library code of the ``train_moe`` stage. Everything here
works on a model object; the stage loads, trains through the shared core and saves.

Sparse upcycling (Komatsuzaki et al., 2022, https://arxiv.org/abs/2212.05055) copies each
chosen MLP block into ``num_experts`` experts and adds a top-``k`` router. The result is a
*native* transformers MoE architecture, so the trained model reloads with plain
``AutoModelForCausalLM`` and no custom code:

====================  ============================  ==========================================
dense family          every MLP upcycled            every k-th MLP upcycled (``every_k_layers``)
====================  ============================  ==========================================
llama (SmolLM2, ...)  ``MixtralForCausalLM``        ``Qwen2MoeForCausalLM`` (q/k/v bias off)
mistral               ``MixtralForCausalLM``        ``Qwen2MoeForCausalLM`` (no sliding window)
qwen2                 ``Qwen2MoeForCausalLM``       ``Qwen2MoeForCausalLM``
qwen3                 ``Qwen3MoeForCausalLM``       ``Qwen3MoeForCausalLM``
====================  ============================  ==========================================

Mixtral makes every layer sparse, so mixed dense/sparse stacks go to Qwen2-MoE, whose
``mlp_only_layers`` keeps chosen layers dense. Its always-on shared expert is given zero width
(an empty ``Linear``), which makes it contribute exactly nothing.

Why the upcycled model computes the dense function: every expert is the same MLP and the
router's top-k weights are renormalised to sum to 1 (Mixtral always does; Qwen MoE configs get
``norm_topk_prob=True``), so ``sum_k w_k * MLP(x) = MLP(x)`` whatever the router picks: exactly
so at ``noise_std=0``; at the default noise (1% of each weight's std) approximately, close enough
that the predictions are the dense model's (tests/test_moe.py). The flip side: while experts
are identical the router gets **no gradient from the LM loss**
(``d/dw sum_k w_k MLP(x) = 0`` under ``sum_k w_k = 1``), hence ``noise_std`` to break symmetry
and ``top_k >= 2`` (with ``top_k = 1`` the renormalised weight is always 1 and the router can
only ever learn from the balance loss).

The second kind, ``kind="lora"``, is a Mixture of LoRA experts: each expert is the frozen
dense MLP plus its own low-rank update, with a learned top-k gate. Only the LoRA factors and
the gate train (a few percent of the parameters). :func:`merge_lora_experts` folds the factors
into ordinary expert weights before saving, so this kind also saves as a plain MoE checkpoint.
PEFT's X-LoRA was not used: it mixes *pre-trained* adapters with a dense classifier that needs a
second "scaling pass" forward, which is neither top-k routing nor loadable without PEFT.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# --------------------------------------------------------------------------------------------
# Upcycling
# --------------------------------------------------------------------------------------------


def upcycle(
    model_or_path,
    *,
    num_experts: int = 4,
    top_k: int = 2,
    every_k_layers: int = 1,
    noise_std: float = 0.01,
    router_init_std: float | None = None,
    router_aux_loss_coef: float = 0.001,
    kind: str = "experts",
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    seed: int = 0,
):
    """Upcycle a dense decoder into a native transformers Mixture-of-Experts model.

    Args:
        model_or_path: A dense ``*ForCausalLM`` model, or a local path ``from_pretrained`` loads.
        num_experts: Experts per upcycled MLP block (``E``).
        top_k: Experts each token is routed to; at least 2 (see the module docstring).
        every_k_layers: Upcycle layers ``k-1, 2k-1, ...`` (transformers' ``decoder_sparse_step``
            convention); the others stay dense. 1 upcycles every layer.
        noise_std: Symmetry breaking for ``kind="experts"``: each expert weight gets Gaussian
            noise of ``noise_std`` times that weight's standard deviation. 0 gives experts that
            are exact copies (the model then equals the dense one, and the router learns only
            from the balance loss until the experts drift apart). Ignored for ``kind="lora"``,
            whose experts differ through their random LoRA ``A`` factors.
        router_init_std: Standard deviation of the router's initial weights; ``None`` uses the
            model's ``initializer_range``. Small and random so that different tokens pick
            different experts from the first step.
        router_aux_loss_coef: Weight of the Switch-Transformer load-balancing loss, stored in
            the config (``output_router_logits`` turns it on; TRL's SFTTrainer reads both).
        kind: ``"experts"`` (full experts copied from the MLP) or ``"lora"`` (shared frozen MLP
            plus one LoRA update per expert).
        lora_rank: LoRA rank of each expert for ``kind="lora"``.
        lora_alpha: LoRA scaling numerator for ``kind="lora"``; the update is scaled by
            ``lora_alpha / lora_rank`` as in PEFT.
        seed: Seed of the router initialisation, the expert noise and the LoRA factors.

    Returns:
        The MoE model (``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` or ``Qwen3MoeForCausalLM``)
        in the dense model's dtype, with ``model.config.output_router_logits`` off (the trainer
        turns it on) and generation settings copied from the dense model.

    Raises:
        ValueError: For an unsupported family or an impossible setting, naming it.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if kind not in ("experts", "lora"):
        raise ValueError(f"kind must be 'experts' or 'lora', got {kind!r}")
    if num_experts < 2:
        raise ValueError(f"num_experts must be at least 2, got {num_experts}")
    if not 2 <= top_k <= num_experts:
        raise ValueError(
            f"top_k must be between 2 and num_experts={num_experts}, got {top_k}: with top_k=1 the "
            "renormalised routing weight is always 1, so the router gets no gradient from the LM loss"
        )
    if every_k_layers < 1:
        raise ValueError(f"every_k_layers must be at least 1, got {every_k_layers}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")

    dense = model_or_path
    if isinstance(model_or_path, (str, Path)):
        dense = AutoModelForCausalLM.from_pretrained(model_or_path)
    src = dense.config
    n_layers = src.num_hidden_layers
    sparse_layers = [i for i in range(n_layers) if (i + 1) % every_k_layers == 0]
    if not sparse_layers:
        raise ValueError(f"every_k_layers={every_k_layers} leaves no layer to upcycle ({n_layers} layers)")

    config = _moe_config(src, num_experts, top_k, sparse_layers, router_aux_loss_coef)
    with warnings.catch_warnings():
        # Qwen2-MoE's zero-width shared expert: "Initializing zero-element tensors is a no-op".
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        # Skip random init: every weight is overwritten below (SmolLM2: 36 s -> a few s).
        with no_init_weights():
            moe = AutoModelForCausalLM.from_config(config, dtype=dense.dtype)
        moe.tie_weights()  # no_init_weights also skips the tying that init_weights does
    if not torch.cuda.is_available():
        # transformers defaults to the "grouped_mm" experts kernel, which on CPU measured ~8x
        # slower than the per-expert "eager" loop (tiny Llama, 2 cores: 2.8 s vs 0.37 s per
        # forward+backward). Not saved: reload with experts_implementation="eager" on CPU too.
        moe.set_experts_implementation("eager")

    generator = torch.Generator().manual_seed(seed)
    router_std = src.initializer_range if router_init_std is None else router_init_std
    state = _upcycled_state_dict(
        dense.state_dict(),
        moe.state_dict(),
        sparse_layers=sparse_layers,
        num_experts=num_experts,
        noise_std=noise_std if kind == "experts" else 0.0,
        router_std=router_std,
        generator=generator,
    )
    moe.load_state_dict(state, strict=True)
    moe.generation_config = copy.deepcopy(dense.generation_config)
    moe.config.output_router_logits = False

    if kind == "lora":
        for _, block in moe_blocks(moe):
            block.experts = LoraExperts(block.experts, rank=lora_rank, alpha=lora_alpha, generator=generator)
    return moe


def _moe_config(src, num_experts: int, top_k: int, sparse_layers: list[int], aux_coef: float):
    """Build the target MoE config from the dense one, field by field (no silent extras)."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    family = src.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"cannot upcycle model_type={family!r}: supported families are {', '.join(SUPPORTED_FAMILIES)}"
        )
    if getattr(src, "mlp_bias", False) or (family != "qwen2" and getattr(src, "attention_bias", False)):
        # The MoE targets have bias-free experts (and, except Qwen2, bias-free attention).
        raise ValueError(f"cannot upcycle {family} with attention_bias/mlp_bias: the MoE targets have none")
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    all_sparse = len(sparse_layers) == src.num_hidden_layers
    common = dict(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=src.initializer_range,
        rms_norm_eps=src.rms_norm_eps,
        use_cache=src.use_cache,
        tie_word_embeddings=src.tie_word_embeddings,
        rope_parameters=dict(src.rope_parameters) if src.rope_parameters else None,
        attention_dropout=src.attention_dropout,
        pad_token_id=src.pad_token_id,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=aux_coef,
        output_router_logits=False,
    )
    if family in ("llama", "mistral") and all_sparse:
        return MixtralConfig(
            **common,
            head_dim=head_dim,
            sliding_window=getattr(src, "sliding_window", None),
            num_local_experts=num_experts,
            router_jitter_noise=0.0,
        )

    # Qwen MoE models: dense layers via mlp_only_layers; renormalised top-k keeps the function.
    dense_layers = [i for i in range(src.num_hidden_layers) if i not in sparse_layers]
    if getattr(src, "use_sliding_window", False) or (family == "mistral" and src.sliding_window is not None):
        raise ValueError(f"cannot upcycle {family} with a sliding window into a partly dense MoE")
    moe_fields = dict(
        moe_intermediate_size=src.intermediate_size,
        num_experts=num_experts,
        norm_topk_prob=True,
        mlp_only_layers=dense_layers,
        decoder_sparse_step=1,
        use_sliding_window=False,
    )
    if family == "qwen3":
        return Qwen3MoeConfig(**common, **moe_fields, head_dim=head_dim, attention_bias=src.attention_bias)
    if head_dim != src.hidden_size // src.num_attention_heads:
        # Qwen2-MoE derives head_dim from hidden_size / heads.
        raise ValueError(f"cannot upcycle {family} with head_dim={head_dim} != hidden_size / num_attention_heads")
    return Qwen2MoeConfig(
        **common, **moe_fields, qkv_bias=family == "qwen2", shared_expert_intermediate_size=0
    )


def _upcycled_state_dict(dense_sd, moe_sd, *, sparse_layers, num_experts, noise_std, router_std, generator):
    """Map dense weights onto the MoE's parameter names; every MoE key must be filled."""
    out = {}
    for name, value in dense_sd.items():
        layer = _layer_index(name)
        if layer in sparse_layers and ".mlp." in name:
            continue  # expanded below
        out[name] = value
    for layer in sparse_layers:
        prefix = f"model.layers.{layer}.mlp."
        gate = dense_sd[prefix + "gate_proj.weight"]
        up = dense_sd[prefix + "up_proj.weight"]
        down = dense_sd[prefix + "down_proj.weight"]
        # Fused layout of transformers v5 experts: gate_up_proj[e] = [gate; up] (2I x H), and
        # the SwiGLU forward does act(gate x) * (up x), exactly what the dense MLP computes.
        gate_up = torch.cat([gate, up], dim=0)
        out[prefix + "experts.gate_up_proj"] = _copies(gate_up, num_experts, noise_std, generator)
        out[prefix + "experts.down_proj"] = _copies(down, num_experts, noise_std, generator)
        router = moe_sd[prefix + "gate.weight"]
        out[prefix + "gate.weight"] = torch.randn(router.shape, generator=generator).mul_(router_std).to(router.dtype)
        for name, value in moe_sd.items():
            # Qwen2-MoE's shared expert has zero width; its gate is then irrelevant (x * 0).
            if name.startswith(prefix + "shared_expert"):
                out[name] = torch.zeros_like(value)
    missing = set(moe_sd) - set(out)
    extra = set(out) - set(moe_sd)
    if missing or extra:
        raise RuntimeError(f"upcycled state dict mismatch: missing {sorted(missing)}, extra {sorted(extra)}")
    return out


def _copies(weight: torch.Tensor, n: int, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    stacked = weight.unsqueeze(0).repeat(n, 1, 1)
    if noise_std > 0:
        scale = noise_std * weight.float().std().item()
        stacked += (torch.randn(stacked.shape, generator=generator) * scale).to(stacked.dtype)
    return stacked


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def moe_blocks(model) -> list[tuple[int, nn.Module]]:
    """The sparse MoE blocks of a model as ``(layer index, block)``; dense layers are skipped."""
    return [
        (i, layer.mlp)
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")
    ]


# --------------------------------------------------------------------------------------------
# Mixture of LoRA experts
# --------------------------------------------------------------------------------------------


class LoraExperts(nn.Module):
    """``E`` experts that share one frozen MLP and each add their own LoRA update.

    Drop-in for transformers' fused experts (same ``forward(hidden, top_k_index, top_k_weights)``):
    expert ``e`` computes the SwiGLU MLP with weights ``W + (alpha / r) * B_e @ A_e``. ``B`` starts
    at zero (as in LoRA), so at initialisation every expert is the dense MLP exactly; the ``A``
    factors are random and distinct, so the experts' gradients, and then the experts, differ.
    """

    def __init__(self, experts: nn.Module, *, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        intermediate = experts.down_proj.shape[-1]
        dtype = experts.gate_up_proj.dtype
        self.num_experts = num_experts
        self.act_fn = experts.act_fn
        self.native_class = type(experts)  # what merge_lora_experts turns this back into
        self.scaling = alpha / rank
        # All experts are identical copies after upcycling with noise 0: keep one, frozen.
        self.base_gate_up = nn.Parameter(experts.gate_up_proj[0].detach().clone(), requires_grad=False)
        self.base_down = nn.Parameter(experts.down_proj[0].detach().clone(), requires_grad=False)
        # PEFT's default LoRA init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.lora_A_gate_up = nn.Parameter(_uniform((num_experts, rank, hidden), hidden, generator, dtype))
        self.lora_B_gate_up = nn.Parameter(torch.zeros(num_experts, two_i, rank, dtype=dtype))
        self.lora_A_down = nn.Parameter(_uniform((num_experts, rank, intermediate), intermediate, generator, dtype))
        self.lora_B_down = nn.Parameter(torch.zeros(num_experts, hidden, rank, dtype=dtype))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            gate_up = x @ self.base_gate_up.T + self.scaling * (x @ self.lora_A_gate_up[e].T) @ self.lora_B_gate_up[e].T
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            y = h @ self.base_down.T + self.scaling * (h @ self.lora_A_down[e].T) @ self.lora_B_down[e].T
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense per-expert weights ``(gate_up_proj, down_proj)`` in the fused 3D layout."""
        gate_up = self.base_gate_up + self.scaling * self.lora_B_gate_up @ self.lora_A_gate_up
        down = self.base_down + self.scaling * self.lora_B_down @ self.lora_A_down
        return gate_up.detach(), down.detach()


def _uniform(shape, fan_in: int, generator: torch.Generator, dtype) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 * bound - bound).to(dtype)


def merge_lora_experts(model):
    """Fold every :class:`LoraExperts` into the architecture's own experts module, in place.

    Call before ``save_pretrained``: afterwards the model is a plain transformers MoE whose
    checkpoint reloads with ``AutoModelForCausalLM`` and computes the same function.

    Args:
        model: A model returned by ``upcycle(..., kind="lora")`` (other models pass unchanged).

    Returns:
        The same model object.
    """
    for layer, block in moe_blocks(model):
        if not isinstance(block.experts, LoraExperts):
            continue
        gate_up, down = block.experts.merged()
        experts = block.experts.native_class(model.config)
        experts.gate_up_proj = nn.Parameter(gate_up.clone())
        experts.down_proj = nn.Parameter(down.clone())
        block.experts = experts
    return model


# --------------------------------------------------------------------------------------------
# What trains
# --------------------------------------------------------------------------------------------


def freeze_for_moe(model, train_rest: bool = False) -> list[str]:
    """Make the experts and routers trainable and, unless ``train_rest``, freeze everything else.

    For the LoRA kind the shared base MLP always stays frozen (only LoRA factors and gates
    train); the zero-width shared expert of Qwen2-MoE targets has nothing to train.

    Args:
        model: An upcycled model.
        train_rest: Also train attention, embeddings, norms and any dense MLP layers.

    Returns:
        Names of the trainable parameters.
    """
    moe_prefixes = [f"model.layers.{i}.mlp." for i, _ in moe_blocks(model)]
    trainable = []
    for name, param in model.named_parameters():
        in_moe = any(name.startswith(p) for p in moe_prefixes)
        is_router_or_expert = in_moe and (".mlp.gate." in name or ".mlp.experts." in name)
        frozen_base = ".mlp.experts.base_" in name
        param.requires_grad = (is_router_or_expert or train_rest) and not frozen_base
        if param.requires_grad:
            trainable.append(name)
    return trainable


# --------------------------------------------------------------------------------------------
# Router z-loss
# --------------------------------------------------------------------------------------------


class _ZLossGrad(torch.autograd.Function):
    """Identity on the routing weights whose backward adds ``coef * d z_loss / d router_logits``.

    This puts the z-loss into the gradient without touching the trainer's loss, so it works
    with any trainer (TRL's SFTTrainer computes its own loss and ignores ``outputs.loss``).
    """

    @staticmethod
    def forward(ctx, scores, logits, coef):
        ctx.save_for_backward(logits)
        ctx.coef = coef
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad_scores):
        (logits,) = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().float().requires_grad_(True)
            z = torch.logsumexp(x, dim=-1).square().mean()
            (grad_logits,) = torch.autograd.grad(z, x)
        return grad_scores, (ctx.coef * grad_logits).to(logits.dtype), None


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss of one layer: mean over tokens of ``logsumexp(logits)^2``.

    Zoph et al., 2022 (https://arxiv.org/abs/2202.08906), eq. 5: it keeps router logits small,
    which stabilises training; the paper's coefficient is 1e-3.
    """
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


class RouterZLoss:
    """Adds ``coef * router_z_loss`` of every MoE layer to the gradient while training.

    Hooks each router; the values seen (summed over layers, one entry per training forward)
    accumulate in ``values`` for logging. Call :meth:`remove` to detach the hooks. With
    gradient checkpointing the routers run again in the backward pass, so ``values`` then gets
    two entries per step (the gradient is still added once, on the recomputed graph).
    """

    def __init__(self, model, coef: float):
        self.coef = coef
        self.values: list[float] = []
        self._pending: list[float] = []
        self._handles = [block.gate.register_forward_hook(self._hook) for _, block in moe_blocks(model)]
        self._n_layers = len(self._handles)

    def _hook(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()) or self.coef == 0:
            return output
        logits, scores, indices = output
        self._pending.append(router_z_loss(logits.detach()).item())
        if len(self._pending) == self._n_layers:
            self.values.append(sum(self._pending))
            self._pending = []
        return logits, _ZLossGrad.apply(scores, logits, self.coef), indices

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def router_losses(model, aux_coef: float, z_coef: float, accumulation_steps: int) -> RouterZLoss:
    """Weight the load-balancing and z-losses per micro-batch so an optimizer step sees ``coef × loss``.

    The Trainer normalises the LM loss of an accumulation window over all its tokens
    (``num_items_in_batch``, passed to models that accept loss kwargs, as the MoE families here
    do), so the LM losses of the k micro-batches sum to one mean. The balance loss is a
    per-micro-batch mean that the model adds to that loss as it is, and the z-loss enters every
    micro-batch's backward directly: at their nominal weights both would count k times. Each gets
    ``coef / k`` (the balance weight on the model, not its config, so the saved config keeps the
    nominal one); returns the z-loss hooks (:class:`RouterZLoss`).
    """
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is None:  # how the Trainer decides whether it divides the loss by k itself
        params = inspect.signature(model.forward).parameters.values()
        accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    model.router_aux_loss_coef = aux_coef / accumulation_steps if accepts else aux_coef
    return RouterZLoss(model, z_coef / accumulation_steps)


def make_router_loss_callback(z_loss: RouterZLoss):
    """A ``TrainerCallback`` that adds the mean ``router_z_loss`` since the last log to the logs.

    The load-balancing loss is logged by TRL's SFTTrainer itself (as ``aux_loss``). Callbacks
    see ``on_log`` in order, and the reporting ones (MLflow) come first, so insert this one at
    the front: ``trainer.callback_handler.callbacks.insert(0, cb)``.
    """
    from transformers import TrainerCallback

    class RouterLossCallback(TrainerCallback):
        def __init__(self):
            self._seen = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            new = z_loss.values[self._seen :]
            self._seen = len(z_loss.values)
            if logs is not None and new and not any(k.startswith("eval_") for k in logs):
                logs["router_z_loss"] = sum(new) / len(new)

    return RouterLossCallback()


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


class ParamCounts(NamedTuple):
    total: int
    active: int
    """Parameters one token runs through: everything except the ``E - k`` experts it skips."""


def param_counts(model) -> ParamCounts:
    """Total parameters and active parameters per token (tied weights counted once).

    In each MoE block, a parameter whose first dimension is the number of experts holds one
    slice per expert; a token uses ``top_k`` of those slices. Everything else (attention,
    embeddings, routers, LoRA experts' shared base MLP) is always active.
    """
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    top_k = model.config.num_experts_per_tok
    for _, block in moe_blocks(model):
        n = block.experts.num_experts
        for p in block.experts.parameters():
            if p.dim() and p.shape[0] == n:
                skipped += p.numel() // n * (n - top_k)
    return ParamCounts(total=total, active=total - skipped)


@torch.no_grad()
def expert_utilisation(model, batches: Iterable[dict], *, top1: bool = False) -> dict[int, list[float]]:
    """Per-layer share of routing assignments each expert receives.

    Args:
        model: An upcycled model.
        batches: Dicts with ``input_ids`` and optionally ``attention_mask`` (padding is not
            counted) and ``position_ids`` (packed rows), as tensors or nested lists.
        top1: Count only each token's highest-weighted expert instead of all ``top_k``.

    Returns:
        ``{layer index: [share of expert 0, ..., share of expert E-1]}``, each list summing to 1;
        a uniform router gives ``1 / E`` everywhere. With ``top1=False`` a layer whose tokens
        all go to the same pair of experts shows ``[0.5, 0.5, 0, 0]``.
    """
    blocks = moe_blocks(model)
    counts = {i: torch.zeros(block.experts.num_experts, dtype=torch.float64) for i, block in blocks}
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(layer):
        def hook(module, args, output):
            indices = output[2][:, :1] if top1 else output[2]
            mask = mask_holder["mask"]
            weights = torch.ones_like(indices, dtype=torch.float64)
            if mask is not None:
                weights = weights * mask.reshape(-1, 1).to(torch.float64)
            counts[layer].scatter_add_(0, indices.reshape(-1).cpu(), weights.reshape(-1).cpu())

        return hook

    handles = [block.gate.register_forward_hook(hook_for(i)) for i, block in blocks]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            inputs = {
                k: torch.as_tensor(batch[k]).to(device)
                for k in ("input_ids", "attention_mask", "position_ids")
                if k in batch and batch[k] is not None
            }
            if inputs["input_ids"].dim() == 1:
                inputs = {k: v.unsqueeze(0) for k, v in inputs.items()}
            mask_holder["mask"] = inputs.get("attention_mask")
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: (c / c.sum().clamp(min=1)).tolist() for i, c in counts.items()}


def plot_utilisation(utilisation: dict[int, list[float]], title: str = "Expert utilisation"):
    """A heatmap figure (layers x experts) of :func:`expert_utilisation`'s shares, annotated.

    Returns:
        A ``matplotlib.figure.Figure`` (built without pyplot, so no display backend is needed),
        ready for ``mlflow.log_figure(fig, "expert_utilisation.png")``.
    """
    from matplotlib.figure import Figure

    layers = sorted(utilisation)
    shares = [utilisation[layer] for layer in layers]
    n_experts = len(shares[0])
    fig = Figure(figsize=(1.2 + 0.7 * n_experts, 1.0 + 0.35 * len(layers)))
    ax = fig.add_subplot()
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(max(r) for r in shares))
    ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (uniform = {1 / n_experts:.2f})")
    if len(layers) * n_experts <= 400:  # numbers stay legible up to ~30 layers x 8 experts
        for row, values in enumerate(shares):
            for col, value in enumerate(values):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    return fig
