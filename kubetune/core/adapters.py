"""Bottleneck adapters (Houlsby et al., 2019) for frozen decoder-only transformers.

Why this module exists: PEFT has no bottleneck-adapter config (its "adapter" methods are
LoRA-like reparametrisations or prompt methods), and the ``adapters`` library (AdapterHub)
pins transformers < 5, so it cannot be installed next to the transformers we run. The
method itself is small, so it is ours: about a hundred lines, tested in
``tests/test_adapters.py``.

Layout. Each decoder layer gets two adapters, one on the output of the attention block and
one on the output of the MLP block, *before* the block's residual add (Houlsby's placement):

    h = x + Adapter(Attention(norm(x)))      Adapter(z) = z + up(dropout(act(down(z))))
    y = h + Adapter(MLP(norm(h)))

``up`` starts at zero, so before training ``Adapter(z) == z`` exactly and the adapted model
computes the same logits as the base model, bit for bit. The adapters are attached as
forward hooks on ``self_attn`` / ``mlp`` (the adapter modules themselves live on the layer
as ``attn_adapter`` / ``mlp_adapter``) rather than by wrapping the blocks: wrapping would
rename every base weight (``self_attn.q_proj`` -> ``self_attn.inner.q_proj``) and break
loading base checkpoints; hooks leave the base state dict untouched.

Saved form: ``bottleneck_adapters.safetensors`` (adapter weights only) and
``bottleneck_adapters.json`` (the shape and placement they need). Names differ from PEFT's
``adapter_model.safetensors`` / ``adapter_config.json`` on purpose, so no PEFT loader
mistakes one for the other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

WEIGHTS_NAME = "bottleneck_adapters.safetensors"
CONFIG_NAME = "bottleneck_adapters.json"
FORMAT = "kubetune-bottleneck-adapters/1"

# Attribute names of the adapter modules on each decoder layer, keyed by the block they follow.
_SLOTS = {"attn": ("self_attn", "attn_adapter"), "mlp": ("mlp", "mlp_adapter")}


@dataclass
class AdapterConfig:
    """Shape and placement of the bottleneck adapters.

    Attributes:
        bottleneck_size: Width of the down-projection. Houlsby et al. found 8-256 enough;
            64 on a 768-wide model (12x reduction) matched full fine-tuning on GLUE.
        activation: Name of the nonlinearity, as in ``transformers.activations.ACT2FN``.
        dropout: Dropout on the bottleneck activations during training.
        placement: Which blocks get an adapter on their output: any of ``"attn"``, ``"mlp"``.
    """

    bottleneck_size: int = 64
    activation: str = "gelu"
    dropout: float = 0.0
    placement: list[str] = field(default_factory=lambda: ["attn", "mlp"])

    def __post_init__(self):
        from transformers.activations import ACT2FN

        if self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {self.bottleneck_size}")
        if self.activation not in ACT2FN:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACT2FN)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.placement = list(self.placement)
        unknown = set(self.placement) - set(_SLOTS)
        if unknown or not self.placement:
            raise ValueError(f"placement must be a non-empty subset of {sorted(_SLOTS)}, got {self.placement}")


class BottleneckAdapter(nn.Module):
    """``z + up(dropout(act(down(z))))`` with ``up`` zero-initialised (identity at start)."""

    def __init__(self, hidden_size: int, config: AdapterConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        from transformers.activations import ACT2FN

        self.down = nn.Linear(hidden_size, config.bottleneck_size, dtype=dtype, device=device)
        self.act = ACT2FN[config.activation]
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(config.bottleneck_size, hidden_size, dtype=dtype, device=device)
        # Zero up-projection: the adapter is the identity until the first optimizer step,
        # which is what makes "adapted model == base model before training" exact.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Adapter weights may be kept in float32 under a bf16 base (as PEFT does for LoRA):
        # compute in the adapter's dtype, add back in the stream's dtype.
        delta = self.up(self.dropout(self.act(self.down(hidden.to(self.down.weight.dtype)))))
        return hidden + delta.to(hidden.dtype)

    def apply_to_output(self, module: nn.Module, args, output):
        """Forward hook: run the adapter on a block's output (a tensor or a tuple led by one).

        A bound method rather than a closure so ``copy.deepcopy(model)`` rebinds the hook to
        the copied adapter instead of the original one.
        """
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder layer stack: the first ``ModuleList`` whose layers all have ``self_attn`` and ``mlp``.

    Raises:
        ValueError: The model has no such stack (e.g. GPT-2 names its blocks ``attn``/``mlp``
            inside ``h``; encoder-decoder models have two stacks). The message says so
            instead of silently adapting nothing.
    """
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in module)
        ):
            return name, module
    raise ValueError(
        f"bottleneck adapters need a stack of decoder layers with `self_attn` and `mlp` blocks "
        f"(Llama, Mistral, Qwen2, SmolLM, ...); found none in {type(model).__name__}. "
        f"Use a PEFT method (lora, ia3, ...) for this architecture."
    )


def add_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Insert bottleneck adapters into ``model`` in place and freeze everything else.

    Args:
        model: A transformers causal LM (or its backbone) of a supported layout.
        config: Adapter shape and placement.

    Returns:
        The same model, with only the adapter parameters trainable.

    Raises:
        ValueError: Unknown layout (see ``decoder_layers``) or adapters already present.
    """
    _, layers = decoder_layers(model)
    if has_adapters(model):
        raise ValueError("model already has bottleneck adapters")
    hidden_size = model.config.hidden_size
    reference = next(model.parameters())
    # Half-precision bases keep float32 adapters: a zero-initialised up-projection trained
    # in bf16 loses most of its first small updates to rounding.
    dtype = torch.float32 if reference.dtype in (torch.float16, torch.bfloat16) else reference.dtype

    for param in model.parameters():
        param.requires_grad_(False)
    for layer in layers:
        for slot in config.placement:
            block_name, adapter_name = _SLOTS[slot]
            adapter = BottleneckAdapter(hidden_size, config, dtype=dtype, device=reference.device)
            layer.add_module(adapter_name, adapter)
            getattr(layer, block_name).register_forward_hook(adapter.apply_to_output)
    model.kubetune_adapter_config = config
    return model


def has_adapters(model: nn.Module) -> bool:
    """Whether ``add_adapters`` has been applied to ``model``."""
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model``, keyed by their names in ``model.state_dict()``."""
    names = {f"{name}." for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
    return {k: v for k, v in model.state_dict().items() if any(k.startswith(n) for n in names)}


def save_adapters(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the adapter weights (safetensors) and their config (json) to ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    config = getattr(model, "kubetune_adapter_config", None)
    if config is None or not has_adapters(model):
        raise ValueError("model has no bottleneck adapters to save (call add_adapters first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, out_dir / WEIGHTS_NAME, metadata={"format": FORMAT})
    _, layers = decoder_layers(model)
    manifest = {
        "format": FORMAT,
        "hidden_size": model.config.hidden_size,
        "num_layers": len(layers),
        **asdict(config),
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Insert the adapters saved in ``adapter_dir`` into a freshly loaded base ``model``.

    Args:
        model: The base model the adapters were trained on, without adapters.
        adapter_dir: A folder written by ``save_adapters``.

    Returns:
        The same model with the saved adapters in place (base frozen, adapters trainable;
        call ``.eval()`` for inference).

    Raises:
        ValueError: The folder's adapters do not fit this model (width or depth differ) or
            the weights do not match the config exactly.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    manifest = json.loads((adapter_dir / CONFIG_NAME).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{adapter_dir / CONFIG_NAME} is not a {FORMAT} config")
    _, layers = decoder_layers(model)
    if manifest["hidden_size"] != model.config.hidden_size or manifest["num_layers"] != len(layers):
        raise ValueError(
            f"adapters in {adapter_dir} were trained on a model with hidden_size={manifest['hidden_size']} "
            f"and {manifest['num_layers']} layers; this one has hidden_size={model.config.hidden_size} "
            f"and {len(layers)} layers"
        )
    fields = {k: manifest[k] for k in ("bottleneck_size", "activation", "dropout", "placement")}
    add_adapters(model, AdapterConfig(**fields))
    tensors = load_file(adapter_dir / WEIGHTS_NAME)
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter weights in {adapter_dir} do not match: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(tensors, strict=False)
    return model
