"""Feature extraction: a frozen backbone's embeddings, a small classification head, and the
MLflow pyfunc model that joins them (raw text in, labels out).

Shared by the stages ``embed``, ``train_head`` and ``evaluate_head``. The backbone is either
an encoder (the packaged MiniLM, any BERT-like folder) or a decoder LLM (SmolLM2, any Llama);
``AutoModel`` loads both without their task heads, and the pooled last hidden state is the
feature vector.

The pyfunc model is saved as MLflow "models from code" (no pickled objects): the head's
safetensors travel as an artifact, the backbone is referenced by name when it is packaged or
a hub id (the same everywhere kubetune is installed) and copied in when it is a local folder
(a path on one machine means nothing on another).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow.pyfunc

FEATURES = "features.safetensors"  # the embed stage's tensors: {train,validation}_{x,y}
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"

# The models-from-code script MLflow stores with the model and runs at load time.
_MODEL_CODE = """\
import mlflow
from kubetune.methods.features import TextClassifier

mlflow.models.set_model(TextClassifier())
"""


# ---------------------------------------------------------------- backbone


def load_backbone(ref: str, trust_remote_code: bool = False):
    """(model, tokenizer, is_decoder) of a backbone reference, in eval mode, without its task head."""
    import torch
    from transformers import AutoConfig, AutoModel

    from kubetune.core import models

    path = models.resolve(ref)
    models.check_remote_code(path, trust_remote_code)
    models.check_weights(path, allow_pickle=False)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    is_decoder = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    model = AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                      trust_remote_code=trust_remote_code)
    tok = models.load_tokenizer(ref, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"  # last-token pooling reads position (length - 1)
    model.requires_grad_(False)
    return model.to(models.pick_device()).eval(), tok, is_decoder


def embed_texts(model, tok, texts: list[str], pooling: str, max_length: int, batch_size: int):
    """Pooled last hidden states of ``texts``: a float32 tensor [len(texts), hidden] on the CPU.

    ``mean`` averages the real (non-pad) tokens, as sentence-transformers does for MiniLM;
    ``last`` takes the last real token, which in a causal model is the only one that has
    read the whole text.
    """
    import torch

    from kubetune.lib.progress import progress

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in progress(range(0, len(texts), batch_size), desc="embed", unit="batch"):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length).to(device)
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            else:
                last = enc["attention_mask"].sum(1) - 1
                pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
            out.append(pooled.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


# ---------------------------------------------------------------- head


def build_head(kind: str, dim: int, n_labels: int, hidden: int, dropout: float = 0.1):
    import torch.nn as nn

    if kind == "linear":
        return nn.Linear(dim, n_labels)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_labels))


class Head:
    """A trained head with the feature standardisation it was trained with."""

    def __init__(self, net, mean, std, labels: list[str], config: dict):
        self.net, self.mean, self.std, self.labels, self.config = net.eval(), mean, std, labels, config

    def logits(self, x):
        import torch

        with torch.no_grad():
            return self.net((x - self.mean) / self.std)

    def predict(self, x) -> list[str]:
        return [self.labels[i] for i in self.logits(x).argmax(-1).tolist()]

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        tensors.update({"feature_mean": self.mean.contiguous(), "feature_std": self.std.contiguous()})
        save_file(tensors, str(out_dir / HEAD_WEIGHTS))
        (out_dir / HEAD_CONFIG).write_text(json.dumps({**self.config, "labels": self.labels}, indent=2))
        return out_dir

    @classmethod
    def load(cls, head_dir: str | Path) -> "Head":
        from safetensors.torch import load_file

        head_dir = Path(head_dir)
        config = json.loads((head_dir / HEAD_CONFIG).read_text())
        tensors = load_file(str(head_dir / HEAD_WEIGHTS))
        net = build_head(config["kind"], config["dim"], len(config["labels"]), config["hidden_size"])
        net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        return cls(net, tensors["feature_mean"], tensors["feature_std"], config["labels"], config)


def classification_metrics(pred: list[str], ref: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (F1 per label over ``labels``, unweighted mean; 0 for a label never hit)."""
    acc = sum(p == r for p, r in zip(pred, ref)) / max(len(ref), 1)
    f1s = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(pred, ref))
        fp = sum(p == lab and r != lab for p, r in zip(pred, ref))
        fn = sum(p != lab and r == lab for p, r in zip(pred, ref))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / max(len(f1s), 1)}


def majority_baseline(train_labels: list[str], val_labels: list[str], labels: list[str]) -> dict[str, float]:
    """What always answering the most frequent training label scores on validation."""
    top = max(labels, key=lambda lab: (train_labels.count(lab), -labels.index(lab)))
    return classification_metrics([top] * len(val_labels), val_labels, labels)


# ---------------------------------------------------------------- pyfunc model


def artifact_dir(model_dir: str | Path, name: str = "head") -> Path | None:
    """Where artifact ``name`` (``head`` or ``backbone``) is inside a saved text-classifier folder."""
    from mlflow.models import Model

    artifacts = Model.load(str(model_dir)).flavors["python_function"].get("artifacts") or {}
    return Path(model_dir) / artifacts[name]["path"] if name in artifacts else None


def save_text_classifier(model_dir: str | Path, head_dir: str | Path, backbone: str, pooling: str,
                         max_length: int, batch_size: int = 32) -> Path:
    """Save the pyfunc model (backbone reference or copy + head) to ``model_dir`` (absent or empty)."""
    from kubetune.core import models

    artifacts = {"head": str(Path(head_dir).resolve())}
    local = Path(backbone.removeprefix("file://")).expanduser()
    if backbone not in models.PACKAGED and local.exists():
        artifacts["backbone"] = str(local.resolve())
        backbone = ""  # the copy in the artifacts is the backbone
    config = {"backbone": backbone, "pooling": pooling, "max_length": max_length, "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "text_classifier.py"
        code.write_text(_MODEL_CODE)
        # Requirements named here: MLflow would otherwise load the model in a subprocess to
        # infer them (~20 s). The one image has them all (and kubetune).
        mlflow.pyfunc.save_model(path=str(model_dir), python_model=str(code), model_config=config,
                                 artifacts=artifacts, pip_requirements=_requirements())
    return Path(model_dir)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("kubetune", "mlflow", "torch", "transformers", "safetensors")]


class TextClassifier(mlflow.pyfunc.PythonModel):
    """Raw text in, labels out: the frozen backbone's pooled embedding through the trained head."""

    def load_context(self, context) -> None:
        config = context.model_config
        self.pooling, self.max_length = config["pooling"], int(config["max_length"])
        self.batch_size = int(config.get("batch_size", 32))
        backbone = context.artifacts.get("backbone") or config["backbone"]
        self.model, self.tok, _ = load_backbone(backbone)
        self.head = Head.load(context.artifacts["head"])

    def predict(self, context, model_input, params=None) -> list[str]:
        """Labels of the texts in ``model_input``.

        Args:
            context: MLflow's model context (unused after loading).
            model_input: A DataFrame with a ``text`` column (or its first column), a list of
                strings, or one string.
            params: Unused.

        Returns:
            One label per text.
        """
        texts = texts_of(model_input)
        x = embed_texts(self.model, self.tok, texts, self.pooling, self.max_length, self.batch_size)
        return self.head.predict(x)


def texts_of(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        col = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[col]]
    return [str(t) for t in model_input]


def load_features(embeddings_dir: str | Path) -> tuple[dict, dict]:
    """(meta, tensors) of an ``embed`` output folder."""
    from safetensors.torch import load_file

    embeddings_dir = Path(embeddings_dir)
    return json.loads((embeddings_dir / "meta.json").read_text()), load_file(str(embeddings_dir / FEATURES))
