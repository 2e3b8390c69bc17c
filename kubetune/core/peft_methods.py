"""Which weights train: full fine-tuning, the PEFT family and our bottleneck adapters.

One entry point, ``apply_method(model, method, settings)``, turns a loaded causal LM into
the model the shared training core optimises; ``save_trained`` / ``load_trained`` write and
read the result in one artifact layout for every method:

    full                 model.safetensors (+ config.json)           whole model
    lora dora qlora ia3  adapter_model.safetensors + adapter_config.json   PEFT's format
    prompt prefix        adapter_model.safetensors + adapter_config.json   PEFT's format
    adapter              bottleneck_adapters.safetensors + .json     kubetune.core.adapters
    every method         kubetune_method.json                        method, settings, counts

The training core stays one loop: methods differ only in which parameters require grad and
in the few training flags some of them cannot use (``training_flags_for``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads inside the functions that need it, so the method records import cheaply
    import torch

MANIFEST_NAME = "kubetune_method.json"

PREFIX_INITS = ("text", "random")
# What a "text"-initialised prefix is computed from: general, task-free words, so the prefix
# starts as the model's own state after reading a system prompt (repeated until long enough).
PREFIX_INIT_TEXT = ("You are a careful assistant. Read the request, then answer exactly as it asks, "
                    "in the format it asks for, and nothing else.")


@dataclass(frozen=True)
class MethodSpec:
    """What one training method is and can do: the one place the package asks.

    Attributes:
        name: The method's name (``TrainConfig.method``, the peft pipeline's ``method``).
        learning_rate: The rate the method is known to train well at. The methods differ by
            three orders of magnitude, so one shared default would leave prompt tuning flat or
            blow up full tuning.
        family: How it trains: ``"full"`` (every weight), ``"lora"`` (low-rank updates of the
            linear layers), ``"adapter"`` (bottleneck adapters, ``kubetune.core.adapters``),
            ``"ia3"`` (learned rescaling vectors) or ``"virtual-tokens"`` (a learned prompt or
            key/value prefix).
        packing: Can train on packed rows. Virtual tokens are prepended once per row, not per
            packed example, and PEFT drops ``position_ids`` for prompt tuning, so packed examples
            would attend across each other.
        gradient_checkpointing: Can train with gradient checkpointing. A prefix reaches every
            layer as its KV cache, which a checkpointed layer drops (``training_flags_for``).
        fast_path: The GPU fast path (``kubetune.core.fastpath``) trains it: the fast path packs
            rows, so not the virtual-token methods, and its matmuls are not bitsandbytes' 4-bit ones.
        mergeable: Its update folds into the base weights (the ``merge`` setting writes a plain
            model); a 4-bit base cannot take a full-precision update back.
        fsdp: Shards the weights with FSDP on several GPUs. Only full tuning: adapters are small,
            so the other methods replicate the model (DDP) and all-reduce the adapter gradients.
        needs_cuda: Needs a CUDA GPU (4-bit base weights from bitsandbytes).
    """

    name: str
    learning_rate: float
    family: str
    packing: bool = True
    gradient_checkpointing: bool = True
    fast_path: bool = True
    mergeable: bool = False
    fsdp: bool = False
    needs_cuda: bool = False


METHOD_SPECS: dict[str, MethodSpec] = {m.name: m for m in (
    # learning rate: TRL SFTConfig's default for full-weight SFT
    MethodSpec("full", 2e-5, "full", fsdp=True),
    # QLoRA paper (Dettmers et al., 2023), TRL's LoRA guide
    MethodSpec("lora", 2e-4, "lora", mergeable=True),
    # DoRA (Liu et al., 2024) reuses the LoRA recipe
    MethodSpec("dora", 2e-4, "lora", mergeable=True),
    # QLoRA paper
    MethodSpec("qlora", 2e-4, "lora", fast_path=False, needs_cuda=True),
    # AdapterHub's recommendation; Houlsby et al. swept 3e-5..3e-3
    MethodSpec("adapter", 1e-4, "adapter"),
    # PEFT's prompt-tuning examples; Lester et al. used 0.3 with Adafactor
    MethodSpec("prompt", 3e-2, "virtual-tokens", packing=False, fast_path=False),
    # From the text-initialised prefix (prefix_init="text") on SmolLM2, bundled tickets, 30 steps
    # x 2 rows: 1e-2 -> exact match 0.06, 3e-2 -> 0.23, 1e-1 -> 0.13 (docs/compare.md).
    MethodSpec("prefix", 3e-2, "virtual-tokens", packing=False, gradient_checkpointing=False, fast_path=False),
    # T-Few (Liu et al., 2022), the (IA)^3 paper
    MethodSpec("ia3", 3e-3, "ia3"),
)}
METHODS = tuple(METHOD_SPECS)


def method_spec(method: str) -> MethodSpec:
    """The record of ``method``.

    Raises:
        ValueError: naming the known methods, for any other name.
    """
    if method not in METHOD_SPECS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return METHOD_SPECS[method]


# adapter placements by name -> the blocks whose output gets an adapter (kubetune.core.adapters)
ADAPTER_PLACEMENTS = {"houlsby": ["attn", "mlp"], "pfeiffer": ["mlp"]}


@dataclass
class PeftSettings:
    """Knobs of the parameter-efficient methods (``full`` ignores them all).

    Attributes:
        rank: Width of the trainable bottleneck: the LoRA rank r for ``lora``/``dora``/
            ``qlora``, and the down-projection width of ``adapter``.
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / rank``
            (32 / 16 = 2, the ratio the QLoRA and TRL recipes use).
        dropout: Dropout on the LoRA input and inside the bottleneck adapters.
        target_modules: Which linear layers get LoRA/DoRA/QLoRA (``"all-linear"``: every
            linear layer except the output head, as the QLoRA paper recommends) or a
            comma-separated list of module names such as ``"q_proj,v_proj"``. For ``ia3``,
            ``"all-linear"`` means the paper's placement (keys, values, MLP input).
        num_virtual_tokens: Length of the learned prompt (``prompt``) or of the learned
            key/value prefix per layer (``prefix``).
        prefix_init: How the ``prefix`` keys/values start. ``"text"``: the base model's own
            keys/values over the first ``num_virtual_tokens`` tokens of ``PREFIX_INIT_TEXT``
            (a neutral system prompt in the model's chat template), the "activations of real
            words" initialisation of Li & Liang (2021), done by PEFT's
            ``initialize_kv_prefix_from_text``; needs the tokenizer. ``"random"``: PEFT's
            N(0, 1) embedding, whose keys are far from the scale of real ones and which takes
            the attention-sink position 0 away from the model's own first token.
        adapter_placement: Where ``adapter`` puts its bottleneck adapters. ``"houlsby"``: after
            the attention and the MLP block of every layer (Houlsby et al., 2019);
            ``"pfeiffer"``: after the MLP block only (Pfeiffer et al., 2020), half the adapters,
            which AdapterHub found to match Houlsby's quality at lower cost.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str = "all-linear"
    num_virtual_tokens: int = 20
    prefix_init: str = "text"
    adapter_placement: str = "houlsby"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"PeftSettings.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"PeftSettings.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PeftSettings.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules_list():
            raise ValueError(f"PeftSettings.target_modules must name at least one module, got {self.target_modules!r}")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"PeftSettings.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ValueError(f"PeftSettings.adapter_placement must be one of {', '.join(ADAPTER_PLACEMENTS)}, "
                             f"got {self.adapter_placement!r}")
        if self.prefix_init not in PREFIX_INITS:
            raise ValueError(f"PeftSettings.prefix_init must be one of {', '.join(PREFIX_INITS)}, got {self.prefix_init!r}")

    def target_modules_list(self) -> list[str]:
        """``target_modules`` split on commas (``["all-linear"]`` for the default)."""
        return [m.strip() for m in str(self.target_modules).split(",") if m.strip()]

    def peft_target_modules(self) -> str | list[str]:
        """``target_modules`` in the form PEFT configs take."""
        names = self.target_modules_list()
        return "all-linear" if names == ["all-linear"] else names


def validate_method(method: str, device: str | None = None) -> None:
    """Fail early, before anything is loaded, if ``method`` cannot run on ``device``.

    Args:
        method: One of ``METHODS``.
        device: ``"cpu"``, ``"cuda"`` (optionally ``"cuda:N"``) or None for whatever this
            machine has.

    Raises:
        ValueError: Unknown method, or ``qlora`` without a CUDA GPU.
        ImportError: ``qlora`` on a GPU machine without ``bitsandbytes`` installed.
    """
    if not method_spec(method).needs_cuda:
        return
    import torch

    wants_cuda = device is None or str(device).startswith("cuda")
    if not (wants_cuda and torch.cuda.is_available()):
        where = f"device {device!r}" if device else "this machine, which has no CUDA GPU"
        raise ValueError(
            f"method 'qlora' needs a CUDA GPU: its 4-bit base weights come from bitsandbytes, "
            f"which has no CPU training path; cannot run on {where}. "
            f"Use method='lora' (same adapters, full-precision base) or run on a GPU node."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "method 'qlora' needs the `bitsandbytes` package for 4-bit base weights: pip install bitsandbytes"
        ) from err


def default_learning_rate(method: str) -> float:
    """The learning rate ``method`` trains well at (see the sources next to each record)."""
    return method_spec(method).learning_rate


def training_flags_for(method: str, *, gradient_checkpointing: bool, packing: bool) -> dict[str, bool]:
    """The training flags ``method`` can use, turning off (with a warning) those it cannot.

    - ``prefix`` + gradient checkpointing: the learned prefix reaches every layer as its KV
      cache, and a checkpointed layer drops the cache (transformers sets ``cache=None``
      under checkpointing), so attention sees no prefix while the mask still counts it and
      the forward pass fails on a shape mismatch. PEFT refuses the combination only when
      checkpointing is on before wrapping; the Trainer turns it on after. The prefix is
      tiny, so checkpointing is turned off.
    - ``prompt``/``prefix`` + packing: the virtual tokens are prepended once per row, not per
      packed example, and PEFT drops ``position_ids`` for prompt tuning, so packed examples
      would attend across each other. Packing is turned off.

    Args:
        method: One of ``METHODS``.
        gradient_checkpointing: What the user asked for.
        packing: What the user asked for.

    Returns:
        ``{"gradient_checkpointing": bool, "packing": bool}`` to train with.
    """
    spec = method_spec(method)
    if gradient_checkpointing and not spec.gradient_checkpointing:
        warnings.warn(
            "prefix tuning does not work with gradient checkpointing (checkpointed layers drop the "
            "KV cache that carries the prefix); training without gradient checkpointing",
            UserWarning,
            stacklevel=2,
        )
        gradient_checkpointing = False
    if packing and not spec.packing:
        warnings.warn(
            f"{method} tuning prepends virtual tokens once per row, so packed examples would attend "
            f"across each other; training without packing",
            UserWarning,
            stacklevel=2,
        )
        packing = False
    return {"gradient_checkpointing": gradient_checkpointing, "packing": packing}


def load_base_model(model_path: str | Path, method: str = "full", *, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, allow_pickle: bool = False):
    """Load the base causal LM the way ``method`` needs it (4-bit for ``qlora``).

    Args:
        model_path: A local model folder (or hub id where the network is allowed).
        method: One of ``METHODS``.
        dtype: Weight dtype; None keeps float32 on CPU and bfloat16 under ``qlora``.
        trust_remote_code: Run code shipped with the model (``kubetune.core.models.LoadPolicy``).
        allow_pickle: Load pickle weights (``kubetune.core.models.LoadPolicy``).

    Returns:
        A ``transformers`` causal LM, not yet adapted (call ``apply_method``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.core import models

    validate_method(method)
    models.check_remote_code(str(model_path), trust_remote_code)
    models.check_weights(str(model_path), allow_pickle)
    policy = dict(trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
    if not method_spec(method).needs_cuda:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype or torch.float32, **policy)

    from accelerate import PartialState
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    # The QLoRA paper's recipe: NF4 weights, double quantization of the scales, bf16 compute.
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        quantization_config=quantization,
        dtype=dtype or torch.bfloat16,
        # Under DDP each process holds a whole 4-bit copy on its own GPU, not one model split across GPUs.
        device_map={"": PartialState().local_process_index},
        **policy,
    )
    # Casts norms to float32 and freezes the base. Checkpointing is left to the trainer's
    # flag (transformers 5 checkpoints with use_reentrant=False, which needs no input hook).
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def apply_method(model, method: str, settings: PeftSettings | None = None, tokenizer=None):
    """Make exactly ``method``'s parameters trainable on a loaded causal LM.

    Args:
        model: A ``transformers`` causal LM (for ``qlora``, loaded by
            ``load_base_model(path, "qlora")``).
        method: One of ``METHODS``.
        settings: PEFT knobs; None for the defaults.
        tokenizer: The model's tokenizer; needed by ``prefix`` with ``prefix_init="text"``.

    Returns:
        The model to train: the same model for ``full``/``adapter``, a ``PeftModel``
        otherwise. It carries ``kubetune_method`` (method and settings) for ``save_trained``.

    Raises:
        ValueError: Unknown method, ``qlora`` without a GPU or without a 4-bit base, or a
            layout ``adapter`` does not support.
    """
    settings = settings or PeftSettings()
    device = next(model.parameters()).device
    validate_method(method, device.type)

    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        adapted = model
    elif method == "adapter":
        from kubetune.core.adapters import AdapterConfig, add_adapters

        adapted = add_adapters(model, AdapterConfig(bottleneck_size=settings.rank, dropout=settings.dropout,
                                                    placement=ADAPTER_PLACEMENTS[settings.adapter_placement]))
    else:
        from peft import get_peft_model

        if method == "qlora" and not getattr(model, "is_loaded_in_4bit", False):
            raise ValueError("method 'qlora' needs a base loaded in 4-bit: load it with load_base_model(path, 'qlora')")
        if not method_spec(method).gradient_checkpointing and getattr(model, "is_activation_checkpointing", False):
            # PEFT raises here; we turn it off instead (see training_flags_for).
            training_flags_for(method, gradient_checkpointing=True, packing=False)
            model.activation_checkpointing_disable()
        text_init = method == "prefix" and settings.prefix_init == "text"
        if text_init and tokenizer is None:
            raise ValueError("prefix tuning with prefix_init='text' starts from the base model's keys/values over "
                             "a system prompt and needs the tokenizer: apply_method(..., tokenizer=tok), "
                             "or PeftSettings(prefix_init='random')")
        adapted = get_peft_model(model, _peft_config(method, settings, model))
        if text_init:
            init_prefix_from_text(adapted, tokenizer, settings.num_virtual_tokens)

    adapted.kubetune_method = {"method": method, "settings": asdict(settings)}
    return adapted


def init_prefix_from_text(model, tokenizer, num_virtual_tokens: int, text: str = PREFIX_INIT_TEXT) -> None:
    """Start a prefix-tuning adapter from the base model's keys/values over real text.

    PEFT's ``initialize_kv_prefix_from_text`` does the prefill and the repacking (the text is
    wrapped as a system turn of the chat template, so position 0 holds the model's usual first
    token, the attention sink); the text is repeated until it covers ``num_virtual_tokens``.
    """
    from peft import initialize_kv_prefix_from_text

    n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) or 1
    reps = -(-num_virtual_tokens // n)  # ceil: the chat template only adds tokens
    initialize_kv_prefix_from_text(model, tokenizer, text=" ".join([text] * reps),
                                   num_virtual_tokens=num_virtual_tokens)


def _peft_config(method: str, settings: PeftSettings, model):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if method_spec(method).family == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.peft_target_modules(),
            use_dora=method == "dora",
        )
    if method == "ia3":
        targets = settings.peft_target_modules()
        if targets == "all-linear":
            # PEFT's per-architecture defaults are the paper's placement: rescale keys,
            # values and the MLP's inner activations (k_proj, v_proj, down_proj's input).
            return IA3Config(task_type=TaskType.CAUSAL_LM)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

        known_ff = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model.config.model_type, [])
        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=targets,
            feedforward_modules=[t for t in targets if t in known_ff],
        )
    if method == "prompt":
        # Start from the embeddings of random vocabulary tokens rather than N(0, 1) noise,
        # whose scale is far from real embeddings' (Lester et al., 2021, section 3.2).
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=settings.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
    if method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)
    raise AssertionError(method)  # apply_method handles full and adapter itself


def trainable_summary(model) -> dict:
    """Count trainable and total parameters (tied weights once, 4-bit weights at full count).

    Returns:
        ``{"trainable": int, "total": int, "share": float}``, share = trainable / total.
    """
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            # bitsandbytes packs two 4-bit weights per byte of storage.
            count = count * 2 * param.element_size()
        total += count
        if param.requires_grad:
            trainable += count
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}


def save_trained(model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a model made by ``apply_method`` (and trained) to ``out_dir``.

    Adapters-only methods write only their own weights (safetensors); ``full`` writes the
    whole model. Every method writes ``kubetune_method.json``.

    Args:
        model: The model ``apply_method`` returned.
        out_dir: Folder to write (created if missing).
        tokenizer: Saved alongside when given, so the folder is self-contained.

    Returns:
        ``out_dir`` as a Path.
    """
    info = getattr(model, "kubetune_method", None)
    if info is None:
        raise ValueError("model was not made by apply_method: no kubetune_method to save")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if info["method"] == "adapter":
        from kubetune.core.adapters import save_adapters

        save_adapters(model, out_dir)
    else:
        # full: the whole model; PEFT methods: PeftModel saves only its adapter weights.
        model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    if hasattr(model, "get_base_model"):
        base = model.get_base_model().config._name_or_path
    manifest = {**info, "base_model": base, "parameters": trainable_summary(model)}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def read_manifest(artifact_dir: str | Path) -> dict:
    """The ``kubetune_method.json`` of a trained-model folder."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {artifact_dir} was not written by save_trained")
    return json.loads(path.read_text())


def load_trained(base_model_path: str | Path, artifact_dir: str | Path, *, dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False):
    """Load a model written by ``save_trained``, ready for inference (eval mode).

    Args:
        base_model_path: The base model the artifact was trained from (ignored for ``full``,
            whose artifact is the whole model).
        artifact_dir: The folder ``save_trained`` wrote.
        dtype: Weight dtype, as in ``load_base_model``.
        trust_remote_code: As in ``load_base_model``.
        allow_pickle: As in ``load_base_model``.

    Returns:
        The trained model: a ``transformers`` model for ``full``/``adapter``, a ``PeftModel``
        otherwise, with ``kubetune_method`` set from the manifest.
    """
    manifest = read_manifest(artifact_dir)
    method = manifest["method"]
    known = {f.name for f in fields(PeftSettings)}
    settings = {k: v for k, v in manifest["settings"].items() if k in known}

    policy = dict(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if method == "full":
        model = load_base_model(artifact_dir, "full", dtype=dtype, **policy)
    else:
        model = load_base_model(base_model_path, method, dtype=dtype, **policy)
        if method == "adapter":
            from kubetune.core.adapters import load_adapters

            model = load_adapters(model, artifact_dir)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, artifact_dir)
    model.kubetune_method = {"method": method, "settings": settings}
    return model.eval()
