"""Peak training memory per method, estimated from the model's shape before anything is loaded.

`estimate(model, method, ...)` returns a `MemoryEstimate`: the bytes of the weights, gradients,
optimizer states, activations, the loss's logits and the transients at the peak, for one GPU
(or the CPU) in the steady state of training (the optimizer states exist from step 1 on).

    weights      every parameter in its storage dtype: bf16 on a GPU, fp32 on the CPU; QLoRA's
                 decoder linears in 4-bit NF4 (0.516 bytes/param with double quantization) and
                 every other parameter in fp32 (peft's prepare_model_for_kbit_training casts
                 them); LoRA/adapter weights in fp32 (peft and kubetune.core.adapters keep them so)
    gradients    one per trainable parameter, in its dtype
    optimizer    AdamW: two states per trainable parameter in the parameter's dtype (torch's
                 AdamW allocates them with zeros_like: bf16 weights -> bf16 states); 8-bit
                 AdamW (bitsandbytes): 2 bytes per parameter
    activations  what autograd saves for the backward pass, per layer and token (below)
    logits       the loss: full fp32 logits on the Trainer path, chunked on the GPU fast path
    overhead     transients at the peak: AdamW's foreach temporaries, the tied embedding's
                 second gradient, the chunked loss's gradient buffers

    peak = max(end of forward:  weights + optimizer + activations + loss transients,
               optimizer step:  weights + gradients + optimizer + step transients)

(gradients are freed after every step: both training paths zero them with set_to_none.)

**Activations** are counted tensor by tensor, as the model's code saves them. Which tensors
that is depends on the path the training core takes (`kubetune.core.fastpath.fast_path_blocker`):

- *Trainer path* (the CPU; on a GPU: QLoRA, prompt and prefix tuning, fast_path=off):
  eager PyTorch, SDPA attention with the block-diagonal mask transformers builds for packed rows.
  Per Llama-style layer and token, in bytes, with b the weights' dtype size (4 fp32, 2 bf16),
  d the width, q = heads x head_dim, I the MLP width, T the row length:

      2 RMSNorms          2 x (4d + 4)      input in fp32 and 1/rms (the norm computes in fp32)
                        + 2 x 2bd           normed and output, only when the weights train (full)
      attention           b x (4q) + 4H + bT   q, K and V repeated to all heads (transformers
                                               repeats them whenever a mask is passed), the
                                               output, the fp32 log-sum-exp, the mask in dtype
      SwiGLU MLP          3bI (+ bI full)   gate, silu(gate), up (and down's input)
      LoRA, per adapted   4 x in + 4r       dropout's output in the adapter's fp32 and its
      linear (dropout>0)  + mask x in       mask (1 byte on CUDA; the CPU saves a float noise);
                                            under the GPU Trainer's bf16 autocast lora_A keeps a
                                            bf16 copy of its input instead (2 x in)

  These were read off autograd's saved tensors (``torch.autograd.graph.saved_tensors_hooks``) on
  tiny Llamas of several widths, depths, lengths and vocabularies, and they match exactly
  (tests/test_memory.py checks them against the installed torch/transformers/peft). Logits
  on this path are the full B x T x V: at the start of backward the fp32 log-softmax output,
  the NLL gradient and the log-softmax gradient are alive together: 12 V bytes per token.
  QLoRA (no CPU path, so derived from the same code rather than traced): its residual stream
  is fp32 (peft casts the embeddings to fp32), so its norms and MLP tensors are fp32, while the
  attention runs in bf16 under the Trainer's autocast.
- *GPU fast path* (`kubetune.core.fastpath`: compiled decoder layers, varlen FlashAttention, chunked
  linear cross-entropy, fused AdamW): see `_fast_layer_bytes`.

Gradient checkpointing keeps each recomputed layer's input (b x d per token) and recomputes one
layer at a time in backward: one layer's activations come on top. The fast path can recompute a
chosen set of layers (``checkpoint_layers``: that many of them, the rest keep their activations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from kubetune.core.peft_methods import METHOD_SPECS
from kubetune.core.peft_methods import METHODS as TRAIN_METHODS

GiB = 2**30

# The training core's methods, then the two the estimator also knows: upcycled MoE, and feature
# extraction (inference through a frozen encoder).
METHODS = (*TRAIN_METHODS, "moe", "feature-extraction")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# bitsandbytes NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block of 64,
# one fp32 scale per 256 blocks (Dettmers et al., 2023, section 3): 0.5 + 1/64 + 4/(64*256).
QLORA_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a Llama-style decoder (or a BERT-style encoder) depends on.

    Attributes:
        name: Short name, for messages.
        layers: Decoder (or encoder) layers.
        d_model: Hidden width.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention when fewer than heads).
        head_dim: Width of one head.
        intermediate: MLP width (of one expert, for MoE models).
        vocab: Vocabulary size.
        tied: The output head shares the input embedding.
        experts: Experts per sparse MLP (0 = dense model).
        experts_per_token: Experts each token is routed to.
        sparse_every: Every k-th layer is sparse (MoE models).
        encoder: A BERT-style encoder (feature extraction backbones), not a decoder.
    """

    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    experts: int = 0
    experts_per_token: int = 0
    sparse_every: int = 1
    encoder: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer (one expert's MLP)."""
        d, i = self.d_model, self.intermediate
        return {"q_proj": (d, self.q_dim), "k_proj": (d, self.kv_dim), "v_proj": (d, self.kv_dim),
                "o_proj": (self.q_dim, d), "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    @property
    def sparse_layers(self) -> int:
        return self.layers // self.sparse_every if self.experts else 0

    def layer_linear_params(self) -> int:
        """Linear weights of all decoder layers (what 4-bit quantization stores in NF4)."""
        shapes = self.linear_shapes()
        attn = sum(a * b for n, (a, b) in shapes.items() if n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = 3 * self.d_model * self.intermediate
        if self.encoder:  # BERT: q, k, v, o all d x d; MLP up + down (no gate)
            attn, mlp = 4 * self.d_model**2, 2 * self.d_model * self.intermediate
        dense_mlp_layers = self.layers - self.sparse_layers
        return (self.layers * attn + dense_mlp_layers * mlp
                + self.sparse_layers * (self.experts * mlp + self.experts * self.d_model))

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output head when it is not tied."""
        return self.vocab * self.d_model * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.d_model
        return self.embedding_params + self.layer_linear_params() + norms

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (MoE models route to a few experts)."""
        if not self.experts:
            return self.params
        idle = self.sparse_layers * (self.experts - self.experts_per_token) * 3 * self.d_model * self.intermediate
        return self.params - idle


# Common shapes, from the models' config.json (hub ids in the comments), so that advice needs
# neither a download nor the network.
KNOWN_MODELS: dict[str, ModelShape] = {
    s.name: s for s in (
        # HuggingFaceTB/SmolLM2-135M(-Instruct): kubetune's default base model
        ModelShape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, True),
        # HuggingFaceTB/SmolLM2-360M
        ModelShape("smollm2-360m", 32, 960, 15, 5, 64, 2560, 49152, True),
        # HuggingFaceTB/SmolLM2-1.7B
        ModelShape("smollm2-1.7b", 24, 2048, 32, 32, 64, 8192, 49152, True),
        # meta-llama/Llama-3.2-1B
        ModelShape("llama-3.2-1b", 16, 2048, 32, 8, 64, 8192, 128256, True),
        # meta-llama/Llama-3.2-3B
        ModelShape("llama-3.2-3b", 28, 3072, 24, 8, 128, 8192, 128256, True),
        # meta-llama/Llama-2-7b-hf
        ModelShape("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, False),
        # meta-llama/Llama-3.1-8B
        ModelShape("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, False),
        # meta-llama/Llama-2-13b-hf
        ModelShape("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000, False),
        # meta-llama/Llama-3.1-70B
        ModelShape("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256, False),
        # sentence-transformers/all-MiniLM-L6-v2: the feature-extraction backbone kubetune ships
        ModelShape("minilm-l6-v2", 6, 384, 12, 12, 32, 1536, 30522, True, encoder=True),
    )
}
_ALIASES = {
    "smollm2-135m-instruct": "smollm2-135m", "135m": "smollm2-135m", "smollm2": "smollm2-135m",
    "360m": "smollm2-360m", "1.7b": "smollm2-1.7b",
    "1b": "llama-3.2-1b", "llama-1b": "llama-3.2-1b", "llama1b": "llama-3.2-1b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "3b": "llama-3.2-3b", "llama-3b": "llama-3.2-3b", "meta-llama/llama-3.2-3b": "llama-3.2-3b",
    "7b": "llama-2-7b", "llama-7b": "llama-2-7b", "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "8b": "llama-3.1-8b", "llama-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "13b": "llama-2-13b", "llama-13b": "llama-2-13b", "meta-llama/llama-2-13b-hf": "llama-2-13b",
    "70b": "llama-3.1-70b", "llama-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "smol135m": "smollm2-135m", "sentence-transformers/all-minilm-l6-v2": "minilm-l6-v2",
}


def known_model(name: str) -> ModelShape | None:
    """The shape of a name in the table (case-insensitive, with aliases such as '7b'), or None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return KNOWN_MODELS.get(key)


def shape_from_config(config, name: str = "") -> ModelShape:
    """A `ModelShape` from a transformers config (object or dict)."""
    c = config if isinstance(config, dict) else config.to_dict()
    d = c["hidden_size"]
    heads = c["num_attention_heads"]
    experts = c.get("num_local_experts") or c.get("num_experts") or 0
    inter = c.get("moe_intermediate_size") if experts and c.get("moe_intermediate_size") else c["intermediate_size"]
    archs = c.get("architectures") or []
    encoder = c.get("model_type") in ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet") or any(
        a.endswith(("Model", "ForMaskedLM")) and "Causal" not in a and "Bert" in a for a in archs)
    return ModelShape(
        name=name or c.get("_name_or_path") or c.get("model_type", "model"),
        layers=c["num_hidden_layers"], d_model=d, heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or d // heads,
        intermediate=inter, vocab=c["vocab_size"],
        tied=bool(c.get("tie_word_embeddings", True)),
        experts=int(experts), experts_per_token=int(c.get("num_experts_per_tok") or (2 if experts else 0)),
        sparse_every=int(c.get("decoder_sparse_step") or 1), encoder=encoder)


def model_shape(model) -> ModelShape:
    """The shape of ``model``: a `ModelShape`, a transformers config, a known name or a model reference.

    Names in `KNOWN_MODELS` (and aliases like ``7b``) need nothing else; any other reference is
    resolved as the training stages resolve it (``kubetune.core.models.resolve``: packaged names,
    folders, hub ids) and its config.json read with ``AutoConfig`` (no weights are loaded).
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict) or hasattr(model, "to_dict"):
        return shape_from_config(model)
    shape = known_model(str(model))
    if shape is not None:
        return shape
    from transformers import AutoConfig

    from kubetune.core import models

    return shape_from_config(AutoConfig.from_pretrained(models.resolve(str(model))), name=str(model))


# --------------------------------------------------------------------------- trainable parameters


def lora_targets(target_modules: str | list[str] = "all-linear") -> list[str]:
    """The linear layers LoRA adapts: 'all-linear' is every decoder linear (not the output head)."""
    names = [t.strip() for t in target_modules.split(",")] if isinstance(target_modules, str) else list(target_modules)
    return list(_LINEARS) if names == ["all-linear"] else [n for n in names if n in _LINEARS]


def trainable_params(shape: ModelShape, method: str, *, lora_rank: int = 16, target_modules="all-linear",
                     num_virtual_tokens: int = 20, num_experts: int = 4, every_k_layers: int = 2) -> int:
    """Trainable parameters of ``method`` on ``shape``, counted as peft/kubetune create them.

    lora/qlora: r x (in + out) per adapted linear; dora adds one magnitude per output feature;
    ia3: one scale per key/value output feature and per down-projection input feature (peft's
    placement for Llama-family models, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING); adapter
    (kubetune.core.adapters, bottleneck = lora_rank): two per layer, 2 x d x r + r + d each; prompt:
    virtual tokens x d; prefix: virtual tokens x layers x 2 x kv width (peft sizes the prefix to
    the KV heads under grouped-query attention); moe: the upcycled experts and routers.
    """
    shapes = shape.linear_shapes()
    L, d, r = shape.layers, shape.d_model, lora_rank
    if method == "full":
        return shape.params
    if method in ("lora", "qlora", "dora"):
        per_layer = sum(r * (shapes[n][0] + shapes[n][1]) for n in lora_targets(target_modules))
        if method == "dora":
            per_layer += sum(shapes[n][1] for n in lora_targets(target_modules))
        return L * per_layer
    if method == "ia3":
        return L * (2 * shape.kv_dim + shape.intermediate)
    if method == "adapter":
        return L * 2 * (2 * d * r + r + d)
    if method == "prompt":
        return num_virtual_tokens * d
    if method == "prefix":
        return num_virtual_tokens * L * 2 * shape.kv_dim
    if method == "moe":
        return _moe_layers(shape, every_k_layers) * num_experts * (3 * d * shape.intermediate + d)
    if method == "feature-extraction":
        return 0  # the head trains on cached embeddings, without the backbone
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


def _moe_layers(shape: ModelShape, every_k_layers: int) -> int:
    return len([i for i in range(shape.layers) if (i + 1) % every_k_layers == 0])


# --------------------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Peak memory of one training configuration, in bytes, with its parts.

    ``total`` is the peak: the larger of the end of the forward pass (weights + optimizer
    states + activations + loss buffers) and the optimizer step (weights + optimizer states +
    gradients + the step's transients, in ``overhead``); ``peak_phase`` says which.
    """

    method: str
    model: str
    path: str  # "fast" (GPU fast path), "trainer" (transformers Trainer), "inference" (feature extraction)
    dtype: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    total_params: int
    trainable_params: int
    weights: float
    gradients: float
    optimizer_states: float
    activations: float
    logits: float
    overhead: float
    total: float
    peak_phase: str
    notes: list[str] = field(default_factory=list)

    def gib(self, part: str = "total") -> float:
        return getattr(self, part) / GiB

    def breakdown(self) -> str:
        """One line: the peak and the parts it is made of, in GiB."""
        if self.peak_phase == "optimizer step":
            parts = ("weights", "optimizer_states", "gradients", "overhead")
        else:
            parts = ("weights", "optimizer_states", "activations", "logits", "overhead")
        names = {"optimizer_states": "optimizer", "logits": "loss", "overhead": "transients"}
        inner = " + ".join(f"{names.get(p, p)} {self.gib(p):.2f}" for p in parts if getattr(self, p) > 0)
        return f"{self.gib():.2f} GiB = {inner} (peak at the {self.peak_phase})"

    def to_dict(self) -> dict:
        return asdict(self)


def default_dtype(device: str) -> str:
    """What the training core picks with precision=auto: bf16 on a GPU, fp32 on the CPU."""
    return "bf16" if device == "cuda" else "fp32"


def path_for(method: str, device: str, gradient_checkpointing: bool = False, fast_path: str = "auto",
             gpus: int = 1) -> str:
    """The training path kubetune.core.train takes (mirrors ``kubetune.core.fastpath.fast_path_blocker``).

    The fast path is the GPU engine, on one GPU or several (FSDP2 for full fine-tuning, DDP for
    adapters), with or without gradient checkpointing; prompt/prefix/QLoRA take the Trainer.
    """
    if method == "feature-extraction":
        return "inference"
    if fast_path == "off" or device != "cuda" or (method in METHOD_SPECS and not METHOD_SPECS[method].fast_path):
        return "trainer"
    return "fast"


def estimate(model, method: str = "lora", *, device: str = "cuda", dtype: str | None = None, batch_size: int = 4,
             seq_len: int = 512, gradient_checkpointing: bool = False, optimizer: str = "adamw",
             lora_rank: int = 16, target_modules="all-linear", lora_dropout: float = 0.05,
             num_virtual_tokens: int = 20, fast_path: str = "auto", gpus: int = 1, num_experts: int = 4,
             top_k: int = 2, every_k_layers: int = 2, checkpoint_layers: int | None = None) -> MemoryEstimate:
    """Estimate the peak training memory of ``method`` on ``model``, per device.

    Args:
        model: A `ModelShape`, a transformers config, a name in `KNOWN_MODELS` (``7b``,
            ``smollm2-135m``, ...) or a model reference (``kubetune.core.models.resolve``).
        method: One of `METHODS`.
        device: ``cuda`` or ``cpu``.
        dtype: ``bf16`` or ``fp32``; None = what precision=auto picks (bf16 on cuda, fp32 on cpu).
        batch_size: Rows per micro-batch per device. On the fast path a step is one packed row
            of batch_size x seq_len tokens, as kubetune.core.train sizes it.
        seq_len: Tokens per row (tokenize_data's max_length; packed rows are full).
        gradient_checkpointing: Recompute activations in backward.
        optimizer: ``adamw`` (torch's AdamW: states in the parameter's dtype) or ``adamw_8bit``.
        lora_rank: LoRA/DoRA/QLoRA rank, and the bottleneck width of ``adapter``.
        target_modules: LoRA targets: ``all-linear`` or names among q_proj ... down_proj.
        lora_dropout: Dropout on LoRA/adapter inputs (> 0 keeps a mask per adapted input).
        num_virtual_tokens: Prompt/prefix length.
        fast_path: ``auto`` or ``off``, as in `kubetune.core.train.TrainConfig`.
        gpus: GPUs in the pod: full fine-tuning shards weights, gradients and optimizer states
            over them (FSDP); the other methods replicate the model (DDP).
        num_experts, top_k, every_k_layers: The ``moe`` upcycling (train_moe's defaults).
        checkpoint_layers: With gradient checkpointing on the fast path, how many decoder layers
            recompute (None = all, as TrainConfig.gradient_checkpointing does).

    Returns:
        A `MemoryEstimate` for one device.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if optimizer not in ("adamw", "adamw_8bit"):
        raise ValueError(f"optimizer must be adamw or adamw_8bit; got {optimizer!r}")
    shape = model_shape(model)
    dtype = dtype or default_dtype(device)
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32; got {dtype!r}")
    if method in METHOD_SPECS and METHOD_SPECS[method].needs_cuda and device != "cuda":
        raise ValueError(f"{method} needs a CUDA GPU (bitsandbytes has no CPU training path)")
    if method == "feature-extraction":
        return _feature_extraction(shape, batch_size, seq_len)
    if method in METHOD_SPECS and not METHOD_SPECS[method].gradient_checkpointing:
        gradient_checkpointing = False  # kubetune.core.peft_methods.training_flags_for turns it off
    b = 4 if dtype == "fp32" else 2
    gpus = max(1, gpus)
    path = path_for(method, device, gradient_checkpointing, fast_path, gpus)
    notes: list[str] = []
    work = shape
    if method == "moe":
        work = replace(shape, experts=num_experts, experts_per_token=top_k, sparse_every=every_k_layers)
        notes.append("moe: upcycled experts counted exactly; routed activations approximated as top_k dense "
                     "MLPs per sparse layer (not checked against a measurement)")
    targets = tuple(lora_targets(target_modules))
    n_trainable = trainable_params(shape, method, lora_rank=lora_rank, target_modules=target_modules,
                                   num_virtual_tokens=num_virtual_tokens, num_experts=num_experts,
                                   every_k_layers=every_k_layers)
    if method == "moe":
        n_trainable = trainable_params(work, "moe", num_experts=num_experts, every_k_layers=every_k_layers)

    # ---- weights, gradients, optimizer states
    if method == "qlora":
        other = work.params - work.layer_linear_params()  # embeddings, head, norms: fp32 after prepare
        weights = work.layer_linear_params() * QLORA_BYTES_PER_PARAM + other * 4 + n_trainable * 4
        tb = 4
    elif method == "full":
        weights, tb = work.params * b, b
    elif method == "moe":
        # train_moe loads fp32 weights (a GPU autocasts the compute to bf16): fp32 experts,
        # gradients and AdamW states
        weights, tb = work.params * 4, 4
    else:
        tb = 4  # peft keeps adapters (and prompt/prefix embeddings) in fp32; so does kubetune.core.adapters
        weights = work.params * b + n_trainable * tb
    total_params = work.params + (0 if method in ("full", "moe") else n_trainable)
    gradients = n_trainable * tb
    # torch's AdamW: exp_avg and exp_avg_sq, zeros_like(param); bitsandbytes' 8-bit AdamW: one
    # byte each plus an fp32 absmax per block of 2048
    opt = 2.0 * n_trainable * tb if optimizer == "adamw" else 2.0 * n_trainable * (1 + 4 / 2048)
    if method == "full" and gpus > 1:
        weights, gradients, opt = weights / gpus, gradients / gpus, opt / gpus
        notes.append(f"full fine-tuning shards weights, gradients and optimizer states over {gpus} GPUs (FSDP)")

    # ---- activations and the loss
    head_trains = method == "full"
    if path == "fast":
        tokens = batch_size * seq_len
        layer = _fast_layer_bytes(work, method, targets, lora_rank, lora_dropout)
        first = 0.0
        if method in ("lora", "dora") and lora_dropout > 0:
            # layer 0: no gradient flows through the dropout on q/k/v's input; its masks go
            first = -sum(work.d_model for t in targets if _input_of(t) == "norm1")
        if method == "adapter":
            # layer 0: nothing before its attention adapter needs a gradient: its input, norm
            # and attention keep nothing
            first = -(2 * (work.d_model + 4 * work.q_dim) + 4 * work.heads + 4)
        k = (work.layers if checkpoint_layers is None else min(checkpoint_layers, work.layers)) \
            if gradient_checkpointing else 0
        # recomputed layers keep their bf16 input; one of them is rebuilt at a time in backward
        kept = (work.layers - k) * layer + k * 2 * work.d_model + (layer if k else 0)
        acts = tokens * (kept + first + _fast_fixed_bytes(work, method))
        if k:
            notes.append(f"activation checkpointing: {k} of {work.layers} layers keep only their input")
        logits = _fast_loss_bytes(work, method, tokens)
    else:
        seq = seq_len + (num_virtual_tokens if method == "prompt" else 0)
        tokens = batch_size * seq
        spec = _Spec(method=method, b=4 if method == "moe" and device == "cpu" else b, cuda=device == "cuda",
                     autocast=device == "cuda" and (b == 2 or method == "moe"),
                     dropout=lora_dropout, rank=lora_rank, targets=targets, seq=seq,
                     prefix=num_virtual_tokens if method == "prefix" else 0)
        layer = _eager_layer_bytes(work, spec)
        if gradient_checkpointing:
            stream = 4 if method == "qlora" else b
            per_token = work.layers * work.d_model * stream + layer + _eager_fixed_bytes(work, spec)
            notes.append("gradient checkpointing: each layer's input is kept, one layer is recomputed at a time")
        else:
            per_token = work.layers * layer + _eager_first_layer_correction(work, spec) + _eager_fixed_bytes(work, spec)
        acts = tokens * per_token
        if method == "dora" and lora_dropout > 0 and b == 2 and not spec.autocast:
            # with dropout, peft's DoRA recomputes the base output from the dropped fp32 input
            # with an fp32 copy of the weight, which F.linear keeps for backward: per module
            acts += work.layers * sum(i * o for n, (i, o) in work.linear_shapes().items() if n in targets) * 4
            notes.append("dora with a bf16 base and dropout keeps an fp32 copy of every adapted weight")
        # at the start of backward: fp32 log-softmax output, NLL gradient, log-softmax gradient
        logits = 12.0 * work.vocab * tokens

    # ---- transients of the optimizer step
    if path == "fast":
        step_transient = 0.0  # AdamW(fused=True)
    elif device == "cuda":
        step_transient = gradients if optimizer == "adamw" else 0.0  # foreach AdamW: one state-sized temporary
    else:
        # the CPU runs AdamW's per-tensor loop: sqrt(exp_avg_sq) and its quotient, two
        # temporaries the size of the largest trainable tensor
        step_transient = 2 * (_largest_param(work) if head_trains else 0) * tb
    # a tied embedding gets two gradient contributions, summed at the end of backward
    if head_trains and work.tied:
        step_transient = max(step_transient, work.vocab * work.d_model * b / gpus)

    forward_peak = weights + opt + acts + logits
    step_peak = weights + opt + gradients + step_transient
    if forward_peak >= step_peak:
        phase, overhead, total = "end of the forward pass", 0.0, forward_peak
    else:
        phase, overhead, total = "optimizer step", step_transient, step_peak
    return MemoryEstimate(
        method=method, model=shape.name, path=path, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, total_params=int(total_params),
        trainable_params=int(n_trainable), weights=weights, gradients=gradients, optimizer_states=opt,
        activations=acts, logits=logits, overhead=overhead, total=total, peak_phase=phase, notes=notes)


def _largest_param(shape: ModelShape) -> int:
    return max(shape.vocab * shape.d_model, shape.d_model * shape.intermediate)


# --------------------------------------------------------------------------- Trainer path (eager)


@dataclass(frozen=True)
class _Spec:
    method: str
    b: int  # weights' dtype bytes
    cuda: bool
    autocast: bool  # the Trainer autocasts to bf16 on a GPU (TrainingArguments(bf16=True))
    dropout: float
    rank: int
    targets: tuple[str, ...]
    seq: int  # tokens per row the layers see (prompt tuning adds its virtual tokens)
    prefix: int  # prefix tuning's virtual keys/values per layer


def _eager_layer_bytes(s: ModelShape, p: _Spec) -> float:
    """Bytes autograd keeps per token for one decoder layer on the Trainer path (see module doc)."""
    m, b, d, I = p.method, p.b, s.d_model, s.intermediate
    qlora = m == "qlora"
    full = m in ("full", "moe")
    stream = 4 if qlora else b  # QLoRA's residual stream is fp32 (prepare_model_for_kbit_training)
    attn = 2 if (qlora or p.autocast) else b  # the attention runs in bf16 under autocast
    total = 0.0
    # two RMSNorms: the input in fp32 (saved by pow and mul) and 1/rms (fp32, one per token)
    total += 2 * (4 * d + 4)
    if full:
        total += 2 * b * d  # normed input, for the norm weight's gradient
    # attention: transformers repeats K/V to every head when a mask is passed (packed rows,
    # prefix); prompt tuning rows have no mask, and SDPA then keeps grouped K/V
    mask = m != "prompt"
    kv = s.q_dim if mask else s.kv_dim
    keys = (p.seq + p.prefix) / p.seq
    total += attn * (2 * s.q_dim + 2 * kv * keys) + 4 * s.heads + (attn * (p.seq + p.prefix) if mask else 0)
    # SwiGLU MLP: gate, silu(gate), up (the product's factors); MoE: routed to top_k experts
    mlp_share = _mlp_share(s, m)
    total += 3 * stream * I * mlp_share
    # inputs of the linear layers whose weights train (full), or that LoRA saves without a copy
    saved_inputs: set[str] = set()
    if full:
        saved_inputs |= {"norm1", "norm2", "product"}
    if m in ("lora", "dora", "qlora"):
        la = 4  # the adapters' dtype
        copy_in = 2 if (qlora or p.autocast) else la  # under autocast lora_A saves a bf16 copy
        mask_bytes = 1 if p.cuda else la  # CUDA's fused dropout keeps a bool mask; the CPU a float noise
        for name in p.targets:
            fan_in, fan_out = s.linear_shapes()[name]
            if p.dropout > 0:
                total += fan_in * ((copy_in if (qlora or p.autocast) else la) + mask_bytes)
            elif qlora or p.autocast or la != b:
                total += fan_in * copy_in  # peft casts the input to the adapter dtype: a copy per module
            else:
                saved_inputs.add(_input_of(name))
            total += p.rank * (2 if (qlora or p.autocast) else la)  # lora_A's output, saved by lora_B
            if m == "dora":
                # DoRA rescales the base output and the LoRA output by the magnitude: both kept,
                # in the adapter's dtype (bf16 under autocast)
                total += fan_out * 2 * (2 if (qlora or p.autocast) else la)
    for name in saved_inputs:
        total += {"norm1": b * d, "norm2": b * d, "product": stream * I * mlp_share, "attention": 0}[name]
    if m == "ia3":
        # k and v outputs (for their scales' gradient); the down projection's input in fp32
        total += 2 * b * s.kv_dim + 4 * I
    if m == "adapter":
        # two bottleneck adapters: their input in fp32, the bottleneck before/after the activation
        r = p.rank
        per = 4 * d + 4 * r + (4 * r + (1 if p.cuda else 4) * r if p.dropout > 0 else 4 * r)
        total += 2 * per
    return total


def _input_of(name: str) -> str:
    return {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "o_proj": "attention",
            "gate_proj": "norm2", "up_proj": "norm2", "down_proj": "product"}[name]


def _eager_first_layer_correction(s: ModelShape, p: _Spec) -> float:
    """Layer 0 of a frozen model: nothing before it needs a gradient, so its first norm keeps
    nothing, no gradient flows through the dropout on q/k/v's input (its masks are not kept),
    and with adapters (which sit after the attention) the whole attention keeps nothing."""
    if p.method in ("full", "moe", "prompt"):
        return 0.0
    saved = 4 * s.d_model + 4
    if p.method in ("lora", "dora", "qlora") and p.dropout > 0:
        saved += sum(s.d_model * (1 if p.cuda else 4) for t in p.targets if _input_of(t) == "norm1")
    if p.method == "adapter":
        saved += p.b * 4 * s.q_dim + 4 * s.heads + p.b * p.seq
    return -saved


def _eager_fixed_bytes(s: ModelShape, p: _Spec) -> float:
    """Per token, outside the layers: final norm, the head's input, RoPE tables, token ids."""
    b, d = p.b, s.d_model
    total = 4 * d + 4  # final norm input (fp32) and 1/rms
    if p.method in ("full", "moe"):
        total += 2 * b * d  # normed (for the norm weight) and the head's input (for its weight)
    total += 2 * s.head_dim * b + 3 * 8  # cos/sin, input ids, labels, positions
    return total


# --------------------------------------------------------------------------- GPU fast path


def _ce_chunk(vocab: int) -> int:
    """Rows per chunk of kubetune.core.fastpath.linear_cross_entropy (same formula)."""
    return 2 ** max(8, min(13, (2**28 // vocab).bit_length() - 1))


def _fast_layer_bytes(s: ModelShape, method: str, targets: tuple[str, ...], rank: int, dropout: float) -> float:
    """Bytes kept per token by one compiled decoder layer of the GPU fast path (bf16).

    The layer runs as two compiled graphs around the eager varlen attention. Inductor's
    partitioner recomputes cheap pointwise results in backward (the fp32 upcasts of the norms,
    silu) instead of keeping them, so a layer keeps, in bf16: its input x, the first norm's
    output, the attention's q and its K and V repeated to every head (torch 2.11's varlen
    kernel has no grouped-query option, so kubetune.core.fastpath repeats them) and its output, the
    residual h and the second norm's output, gate, up and their product; plus fp32 1/rms (two)
    and the log-sum-exp (per head). For full fine-tuning that is 8d + 8q + 6I bytes (d width, q
    = heads x head_dim, I MLP width); it reproduces the six peak memories of
    docs/performance.md (Llama-3.2-1B and SmolLM2-135M shapes, 8k-33k tokens per step) within
    1% (tests/test_memory.py).

    Frozen-base methods keep a norm output or the product only where an adapter reads it.
    LoRA layers (peft, fp32 adapters under bf16 autocast) measured one more d-wide bf16 tensor
    per layer than full fine-tuning plus each lora_A output; dropout adds its mask (one byte
    per input feature, per adapted linear: the compiled dropout keeps a bool mask).
    """
    b, d, I, q = 2, s.d_model, s.intermediate, s.q_dim
    mlp = _mlp_share(s, method)
    total = b * (2 * d + 4 * q) + 4 * s.heads + 8  # x, h; q, K, V, output; 1/rms x 2
    total += b * 2 * I * mlp  # gate, up
    if method in ("full", "moe"):
        return total + b * (2 * d + I * mlp)  # both norm outputs and the product, for weight gradients
    inputs: set[str] = set()
    if method in ("lora", "dora"):
        shapes = s.linear_shapes()
        for name in targets:
            inputs.add(_input_of(name))
            total += b * rank  # lora_A's output
            if dropout > 0:
                total += shapes[name][0]  # bool dropout mask over the input features
            if method == "dora":
                total += 2 * b * shapes[name][1]  # base and LoRA outputs, rescaled by the magnitude
        total += b * d  # measured: one more cast of an adapter input per layer (see docstring)
    elif method == "ia3":
        inputs.add("product")
        total += 2 * b * s.kv_dim  # k and v outputs, for their scales' gradient
    elif method == "adapter":
        total += 2 * (b * d + 2 * b * rank + (rank if dropout > 0 else 0))  # adapter inputs, bottlenecks
    for name in inputs:
        total += {"norm1": b * d, "norm2": b * d, "product": b * I * mlp, "attention": 0}[name]
    return total


def _mlp_share(s: ModelShape, method: str) -> float:
    """MLP activations relative to a dense layer: MoE layers run top_k experts per token."""
    if not (s.experts and method == "moe"):
        return 1.0
    return (s.sparse_layers * s.experts_per_token + (s.layers - s.sparse_layers)) / s.layers


def _fast_fixed_bytes(s: ModelShape, method: str) -> float:
    """Per token outside the layers on the fast path: final norm, the loss's hidden-state gradient, ids."""
    b, d = 2, s.d_model
    total = 4 * d + 4 + 2 * s.head_dim * b + 8  # final norm input (fp32) and 1/rms; cos/sin; ids
    if method in ("full", "moe"):
        total += b * d  # final norm's output, for its weight
    total += b * d  # linear_cross_entropy computes d(loss)/d(hidden) in forward and keeps it
    return total


def _fast_loss_bytes(s: ModelShape, method: str, tokens: int) -> float:
    """The chunked loss's buffers beyond the per-token ones, at their largest.

    In forward: three chunks of logits-sized bf16 buffers are alive at once (the new chunk's
    logits, its gradient, and the previous chunk's gradient, still bound in the loop), plus
    d(loss)/d(head weight) when the head trains. In backward the two gradients are scaled into
    new tensors (hidden's and the weight's) while the saved ones are alive.
    """
    b = 2
    head_grad = s.vocab * s.d_model * b if method == "full" else 0.0
    forward = 3 * _ce_chunk(s.vocab) * s.vocab * b
    backward = tokens * s.d_model * b + head_grad
    return head_grad + max(forward, backward)


# --------------------------------------------------------------------------- feature extraction


def _feature_extraction(shape: ModelShape, batch_size: int, seq_len: int) -> MemoryEstimate:
    """Embedding a dataset with a frozen backbone: fp32 weights and one layer's forward at a time."""
    weights = shape.params * 4
    tokens = batch_size * seq_len
    # no autograd: only the running layer's tensors are alive: hidden, q/k/v, the scores
    # (heads x len per token), MLP intermediate
    acts = tokens * 4 * (4 * shape.d_model + shape.heads * seq_len + 2 * shape.intermediate)
    return MemoryEstimate(
        method="feature-extraction", model=shape.name, path="inference", dtype="fp32", batch_size=batch_size,
        seq_len=seq_len, gradient_checkpointing=False, total_params=shape.params, trainable_params=0,
        weights=weights, gradients=0.0, optimizer_states=0.0, activations=acts, logits=0.0, overhead=0.0,
        total=weights + acts, peak_phase="embedding pass",
        notes=["the backbone only runs forward (no gradients); the head then trains on cached embeddings"])


# --------------------------------------------------------------------------- measuring on the CPU


def cpu_rss() -> tuple[int, int]:
    """(resident bytes, peak resident bytes since the last reset) of this process (Linux)."""
    import re

    text = open("/proc/self/status").read()
    rss, hwm = (int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM"))
    return rss, hwm


def reset_cpu_rss_peak() -> None:
    """Restart the peak (VmHWM) from the current resident size: Linux's /proc/self/clear_refs '5'.

    With glibc's mmap threshold fixed low (``MALLOC_MMAP_THRESHOLD_=65536`` in the environment
    of the measured process), every tensor of 64 KiB or more is its own mapping and goes back
    to the system when freed, so the peak resident size follows the live tensors.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
