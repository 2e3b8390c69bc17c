"""Stage `propose`: one proposer of a Mixture of Agents answers the held-out data.

The fan-out step of the ``moa`` pipeline: one task per proposer (``dsl.ParallelFor``), each
writing its answers for ``aggregate_moa`` to collect. A proposer is a model reference (the
packaged SmolLM2, a local folder, a hub id), a model registered in MLflow
(``models:/name@alias``) or an OpenAI-compatible endpoint (``http://host:port``, how models
served by vLLM or KServe are reached). With ``train`` settings the model is first fine-tuned
(LoRA unless ``train`` says otherwise) on the training split through the one training core,
so one base model yields several distinct proposers.

Output folder:

* ``answers.jsonl``: one row per answered example: ``split``, ``index`` (position in that
  split of the ingested dataset), ``text``, ``tokens`` (generated), ``latency_s``;
* ``proposer.json``: the spec the mixture serves this proposer with
  (:func:`kubetune.methods.moa.proposer_from_spec`; a trained proposer's ``path`` is ``model``,
  relative to this folder);
* ``model/``: the trained adapter, when ``train`` was given.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.core.config import setting
from kubetune.core.defaults import WORKSPACE
from kubetune.errors import ConfigError
from kubetune.tracking import RunContext, log_metrics, maybe_stage


@dataclass
class ProposeConfig:
    name: str = setting("", "Proposer name, distinct within a mixture (the key of its vote weight).")
    model: str = setting("", "Packaged name, local folder, hub id, models:/name@alias, or the http(s):// root "
                             "of an OpenAI-compatible server.")
    served_model: str = setting("", "HTTP proposers: the model id sent in requests ('' = name).")
    train: dict = setting({}, "TrainConfig settings to fine-tune 'model' on the training split first "
                              "({} = use it as it is), e.g. {'max_steps': 30, 'seed': 1}.")
    max_length: int = setting(256, "Longest training example in tokens (when 'train' is given).")
    max_new_tokens: int = setting(16, "Longest answer, in tokens.")
    timeout: float = setting(60.0, "Seconds an HTTP proposer may take per answer; a late answer counts as empty.")
    batch_size: int = setting(8, "Prompts per generate call (local and registry models).")
    train_answers: int = setting(0, "Also answer the first N training examples (material to tune the aggregator).")

    def __post_init__(self):
        if not self.name:
            raise ConfigError("'name' is required")
        if not self.model:
            raise ConfigError("'model' is required")
        if self.train and kind_of(self.model) != "local":
            raise ConfigError(f"'train' needs a local model to fine-tune; '{self.model}' is {kind_of(self.model)}")
        for key in ("max_new_tokens", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.timeout <= 0 or self.train_answers < 0:
            raise ConfigError("'timeout' must be > 0 and 'train_answers' >= 0")


@dataclass
class ProposeResult:
    spec: dict
    metrics: dict
    output_dir: str


def kind_of(model: str) -> str:
    """``registry`` for ``models:/`` URIs, ``http`` for http(s) URLs, else ``local``."""
    if model.startswith("models:/"):
        return "registry"
    if model.startswith(("http://", "https://")):
        return "http"
    return "local"


def serving_spec(cfg: ProposeConfig, trained: bool) -> dict:
    """The spec this proposer is served with (``proposer.json``)."""
    common = {"name": cfg.name, "max_new_tokens": cfg.max_new_tokens}
    kind = kind_of(cfg.model)
    if trained:
        return {"kind": "local", "path": "model", **common}
    if kind == "registry":
        from kubetune.methods.moa import resolve_model_uri

        # Pinned: the mixture is served with the version it was evaluated with.
        return {"kind": "registry", "uri": resolve_model_uri(cfg.model), **common}
    if kind == "http":
        return {"kind": "http", "base_url": cfg.model, "model": cfg.served_model or cfg.name,
                "timeout": cfg.timeout, **common}
    path = Path(cfg.model).expanduser()
    return {"kind": "local", "path": str(path.resolve()) if path.exists() else cfg.model, **common}


def _finetune(cfg: ProposeConfig, dataset_dir: Path, out: Path, workspace: str | Path, ctx) -> dict:
    """Tokenize for ``cfg.model`` and train it with the one training core into ``out``."""
    from kubetune.core.config import from_dict
    from kubetune.core.tokenization import TokenizeConfig, tokenize_dataset
    from kubetune.core.train import TrainConfig, run_training

    train_cfg = from_dict(TrainConfig, {**cfg.train, "base_model": cfg.model},
                          f"proposer '{cfg.name}' train")
    with tempfile.TemporaryDirectory() as tmp:
        tokenized = Path(tmp) / "tokenized"
        tokenize_dataset(TokenizeConfig(base_model=cfg.model, max_length=cfg.max_length), dataset_dir, tokenized)
        stage = "train-full" if train_cfg.method == "full" else "train-peft"
        return run_training(stage, train_cfg, tokenized, out, workspace, ctx).metrics


def propose(cfg: ProposeConfig, dataset_dir: str | Path, output_dir: str | Path,
            workspace: str | Path = WORKSPACE, ctx: RunContext | None = None) -> ProposeResult:
    """Fine-tune (optionally) one proposer and answer the validation split with it.

    Args:
        cfg: The proposer and how it answers.
        dataset_dir: Output of ``ingest``.
        output_dir: Folder for ``answers.jsonl``, ``proposer.json`` and ``model/``.
        workspace: Checkpoint folder of the training core (when ``cfg.train`` is given).
        ctx: When given, logs to MLflow child runs (``train-peft`` and ``propose``).

    Returns:
        The serving spec, answer metrics (tokens and latency per answer; training metrics
        when trained) and the output folder.
    """
    from kubetune.methods import moa
    from kubetune.lib.dataset import atomic_dir, load_dataset_dir, write_jsonl

    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    meta, train, val = load_dataset_dir(dataset_dir)
    with atomic_dir(output_dir) as tmp:
        metrics: dict = {}
        if cfg.train:
            metrics.update(_finetune(cfg, dataset_dir, tmp / "model", workspace, ctx))
        spec = serving_spec(cfg, trained=bool(cfg.train))

        labels = None
        if meta["shape"] == "classification":  # the prompt names the options (see prompt_and_reference)
            labels = sorted({str(r["label"]) for r in train})
        examples = [("validation", i, r) for i, r in enumerate(val)]
        examples += [("train", i, r) for i, r in enumerate(train[: cfg.train_answers])]
        conversations = [moa.prompt_and_reference(r, labels)[0] for _, _, r in examples]

        with maybe_stage(ctx, "propose", params={**asdict(cfg), "kind": spec["kind"]}) as run:
            served = dict(spec, path=str(tmp / "model")) if cfg.train else spec
            proposer = moa.proposer_from_spec(served)
            completions = moa.answer_all(proposer, conversations, max_new_tokens=cfg.max_new_tokens,
                                         batch_size=cfg.batch_size)
            rows = [{"split": split, "index": i, "text": c.text, "tokens": c.tokens, "latency_s": c.latency_s}
                    for (split, i, _), c in zip(examples, completions)]
            n = max(len(rows), 1)
            metrics.update(answers=len(rows), tokens_per_answer=sum(r["tokens"] for r in rows) / n,
                           latency_s=sum(r["latency_s"] for r in rows) / n,
                           empty_answers=sum(not r["text"] for r in rows))
            if run is not None:
                log_metrics(metrics)
        write_jsonl(tmp / "answers.jsonl", rows)
        (tmp / "proposer.json").write_text(json.dumps(spec, indent=2))
    return ProposeResult(spec=spec, metrics=metrics, output_dir=str(output_dir))
