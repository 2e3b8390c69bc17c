"""Stage `aggregate_moa`: combine the proposers' answers into one Mixture-of-Agents model.

The fan-in step of the ``moa`` pipeline (``dsl.Collected`` over the ``propose`` tasks). The
validation split is cut in two, by a seeded shuffle: the **fit half** is where the
aggregator is tuned (vote weights by :func:`kubetune.methods.moa.fit_weights`; optionally a LoRA of
the synthesis model, trained through the one training core on (prompt + proposals →
reference) chat examples), the **eval half** is where ``evaluate_moa`` scores the mixture
and every proposer alone, on examples no tuning has seen.

Output model folder (what ``register`` registers, unchanged):

* the MLflow pyfunc (``MLmodel``, ``artifacts/``): proposers and aggregator, called
  concurrently with a deadline when served (:mod:`kubetune.methods.moa.pyfunc`);
* ``moa.json``: the mixture as evaluated (mode, weights, labels, aggregator, the two halves);
* ``kubetune_method.json``: ``{"method": "moa", ...}``;
* ``aggregator/``: the tuned aggregator adapter, when ``tune_aggregator`` is on.

Output proposals file (``proposals.json``): every proposer's answers, tokens and latency
on the validation split, with the references, for ``evaluate_moa``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.core.defaults import WORKSPACE
from kubetune.errors import ConfigError, StageError
from kubetune.core.models import DEFAULT_BASE_MODEL
from kubetune.tracking import RunContext, log_metrics, maybe_stage


@dataclass
class MoAConfig:
    mode: Literal["majority", "weighted", "synthesis"] = setting(
        "weighted", "How the served mixture combines answers: majority vote, vote with fitted weights, "
                    "or an aggregator LLM that synthesises the proposals.")
    aggregator: str = setting(DEFAULT_BASE_MODEL, "Synthesis model: packaged name, local folder, hub id or "
                                                  "models:/ URI ('' = none: vote modes only).")
    layers: int = setting(1, "Synthesis layers: the aggregator's answer to layer n is what layer n+1 reads.")
    timeout: float = setting(60.0, "Served mixture: seconds per round of proposer calls; late or failing "
                                   "proposers are dropped and named in the output.")
    max_new_tokens: int = setting(16, "Served mixture: longest answer of each call.")
    labels: str = setting("auto", "Label set for voting: 'auto' = the distinct references when they look like "
                                  "classes, 'none' = free text, or a comma-separated list.")
    fit_fraction: float = setting(0.5, "Share of the validation split that fits the weights (and tunes the "
                                       "aggregator); the rest is kept for evaluate_moa.")
    seed: int = setting(0, "Seed of the fit/eval cut of the validation split.")
    tune_aggregator: bool = setting(False, "LoRA-tune the aggregator on (prompt + proposals -> reference).")
    aggregator_train: dict = setting({"max_steps": 30}, "TrainConfig settings of the aggregator's LoRA.")
    max_length: int = setting(512, "Longest aggregator training example, in tokens.")

    def __post_init__(self):
        if self.layers < 1 or self.max_new_tokens < 1:
            raise ConfigError("'layers' and 'max_new_tokens' must be >= 1")
        if self.timeout <= 0:
            raise ConfigError(f"'timeout' must be > 0, got {self.timeout}")
        if not 0.0 < self.fit_fraction < 1.0:
            raise ConfigError(f"'fit_fraction' must be between 0 and 1 (exclusive), got {self.fit_fraction}")
        if self.mode == "synthesis" and not self.aggregator:
            raise ConfigError("'aggregator' is required for mode 'synthesis'")
        if self.tune_aggregator and not self.aggregator:
            raise ConfigError("'tune_aggregator' needs an 'aggregator' to tune")
        if self.tune_aggregator and self.aggregator.startswith(("models:/", "http://", "https://")):
            raise ConfigError("'tune_aggregator' needs a local aggregator model (a packaged name or folder)")


@dataclass
class MoAResult:
    weights: dict
    labels: list | None
    fit_accuracy: dict
    aggregator_metrics: dict
    output_dir: str


# ---------------------------------------------------------------- reading the proposers' answers


def read_proposers(dirs: list[str | Path]) -> list[dict]:
    """Each ``propose`` output folder as ``{"spec", "answers": {split: {index: row}}}``.

    A trained proposer's relative ``path`` becomes absolute here, so the pyfunc can copy it.
    """
    out = []
    for d in dirs:
        d = Path(d)
        spec = json.loads((d / "proposer.json").read_text())
        if spec.get("kind") == "local" and spec.get("path") == "model":
            spec["path"] = str((d / "model").resolve())
        answers: dict[str, dict[int, dict]] = {}
        for line in (d / "answers.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                answers.setdefault(row["split"], {})[row["index"]] = row
        out.append({"spec": spec, "answers": answers})
    names = [p["spec"]["name"] for p in out]
    if len(set(names)) != len(names):
        raise StageError(f"aggregate_moa: proposer names must be distinct, got {names}")
    if not out:
        raise StageError("aggregate_moa: no proposers")
    return out


def resolve_labels(setting_: str, references: list[str]) -> list[str] | None:
    from kubetune.methods.moa import label_set

    if setting_ == "auto":
        return label_set(references)
    if setting_ == "none":
        return None
    return [s.strip() for s in setting_.split(",") if s.strip()]


def cut_validation(n: int, fit_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded fit/eval cut of ``range(n)``: both halves non-empty, each sorted."""
    if n < 2:
        raise StageError(f"aggregate_moa: the validation split has {n} example(s); fitting and scoring a "
                         "mixture needs at least 2 (raise validation_fraction)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(n * fit_fraction)), n - 1)
    return sorted(order[:k]), sorted(order[k:])


def aggregator_spec(ref: str, max_new_tokens: int) -> dict:
    kind = "registry" if ref.startswith("models:/") else "local"
    key = "uri" if kind == "registry" else "path"
    path = Path(ref).expanduser()
    value = str(path.resolve()) if kind == "local" and path.exists() else ref
    return {"kind": kind, key: value, "name": "aggregator", "max_new_tokens": max_new_tokens}


# ---------------------------------------------------------------- aggregator tuning


def tune_aggregator(cfg: MoAConfig, examples: list[dict], out: Path, workspace: str | Path, ctx) -> dict:
    """LoRA on chat examples, through ``tokenize_data`` and the one training core."""
    from kubetune.core.config import from_dict
    from kubetune.core.tokenization import TokenizeConfig, tokenize_dataset
    from kubetune.core.train import TrainConfig, run_training
    from kubetune.lib.dataset import fingerprint, write_dataset_dir


    train_cfg = from_dict(TrainConfig, {"method": "lora", **cfg.aggregator_train,
                                        "base_model": cfg.aggregator}, "aggregator_train")
    with tempfile.TemporaryDirectory() as tmp:
        # An ingested-dataset folder, as ingest writes it; a tenth of the examples (at least
        # one) is the validation split tokenize_data expects.
        n_val = max(1, len(examples) // 10)
        train, val = examples[n_val:] or examples, examples[:n_val]
        meta = {"shape": "chat", "fingerprint": fingerprint(examples),
                "counts": {"train": len(train), "validation": len(val)}, "source": "aggregate_moa"}
        data = write_dataset_dir(Path(tmp) / "dataset", meta, train, val)
        tokenized = Path(tmp) / "tokenized"
        tokenize_dataset(TokenizeConfig(base_model=cfg.aggregator, max_length=cfg.max_length, overlong="truncate"),
                         data, tokenized)
        return run_training("train-aggregator", train_cfg, tokenized, out, workspace, ctx).metrics


# ---------------------------------------------------------------- stage


def aggregate_moa(cfg: MoAConfig, proposer_dirs: list[str | Path], dataset_dir: str | Path,
                  model_dir: str | Path, proposals_path: str | Path,
                  workspace: str | Path = WORKSPACE, ctx: RunContext | None = None) -> MoAResult:
    """Fit the mixture on the fit half of the validation split and save it as one model.

    Args:
        cfg: Mode, aggregator and tuning settings.
        proposer_dirs: Output folders of the ``propose`` tasks, in the mixture's order.
        dataset_dir: Output of ``ingest`` (references).
        model_dir: Where the mixture model folder is written (must not exist or be empty).
        proposals_path: Where ``proposals.json`` (answers and references) is written.
        workspace: Checkpoint folder of the training core (aggregator tuning).
        ctx: When given, logs to an MLflow child run named ``aggregate-moa``.

    Returns:
        The fitted weights, the label set, each proposer's accuracy on the fit half and the
        aggregator's training metrics (when tuned).
    """
    from kubetune.lib.dataset import atomic_dir, load_dataset_dir
    from kubetune.methods import moa
    from kubetune.methods.moa.pyfunc import save_moa_model

    meta, train, val = load_dataset_dir(dataset_dir)
    proposers = read_proposers(proposer_dirs)
    names = [p["spec"]["name"] for p in proposers]
    cls_labels = sorted({str(r["label"]) for r in train}) if meta["shape"] == "classification" else None
    prompts, refs = zip(*(moa.prompt_and_reference(r, cls_labels) for r in val)) if val else ((), ())
    refs = list(refs)
    for p in proposers:
        missing = [i for i in range(len(val)) if i not in p["answers"].get("validation", {})]
        if missing:
            raise StageError(f"aggregate_moa: proposer '{p['spec']['name']}' did not answer validation "
                             f"example(s) {missing[:5]}")
    answers = {p["spec"]["name"]: [p["answers"]["validation"][i] for i in range(len(val))] for p in proposers}
    labels = cls_labels or resolve_labels(cfg.labels, refs)
    fit, held = cut_validation(len(val), cfg.fit_fraction, cfg.seed)

    fit_preds = {n: [answers[n][i]["text"] for i in fit] for n in names}
    fit_refs = [refs[i] for i in fit]
    weights = moa.fit_weights(fit_preds, fit_refs, labels)
    fit_accuracy = {n: moa.accuracy(fit_preds[n], fit_refs, labels) for n in names}

    model_dir, proposals_path = Path(model_dir), Path(proposals_path)
    # save_moa_model writes into an empty folder, so a tuned aggregator is trained beside it and copied in.
    with atomic_dir(model_dir) as tmp, tempfile.TemporaryDirectory(prefix="aggregate-moa-") as scratch:
        work = Path(scratch)
        agg = aggregator_spec(cfg.aggregator, cfg.max_new_tokens) if cfg.aggregator else None
        tuned_metrics = {}
        if cfg.tune_aggregator:
            # Material: the fit half, plus the training examples every proposer answered.
            n_train = min(len(p["answers"].get("train", {})) for p in proposers)
            t_prompts = [moa.prompt_and_reference(r, cls_labels) for r in train[:n_train]]
            examples = moa.build_aggregator_examples(
                [prompts[i] for i in fit] + [m for m, _ in t_prompts],
                {n: [answers[n][i]["text"] for i in fit] +
                    [proposers[k]["answers"]["train"][j]["text"] for j in range(n_train)]
                 for k, n in enumerate(names)},
                fit_refs + [r for _, r in t_prompts])
            tuned_metrics = tune_aggregator(cfg, examples, work / "aggregator", workspace, ctx)
            agg = dict(agg, path=str(work / "aggregator"))
        save_moa_model(tmp, [p["spec"] for p in proposers], mode=cfg.mode,
                       weights=weights if cfg.mode == "weighted" else None, labels=labels,
                       aggregator=agg if cfg.mode == "synthesis" else None, layers=cfg.layers,
                       timeout=cfg.timeout, max_new_tokens=cfg.max_new_tokens)
        if cfg.tune_aggregator:
            shutil.copytree(work / "aggregator", tmp / "aggregator")
            agg = dict(agg, path="aggregator")  # relative to the model folder
        eval_fp = hashlib.sha256(json.dumps([meta["fingerprint"], held, labels]).encode()).hexdigest()[:16]
        description = {
            "mode": cfg.mode, "proposers": [p["spec"] for p in proposers], "weights": weights, "labels": labels,
            "aggregator": agg, "aggregator_tuned": cfg.tune_aggregator, "layers": cfg.layers,
            "timeout": cfg.timeout, "max_new_tokens": cfg.max_new_tokens, "fit": fit, "eval": held,
            "data_fingerprint": meta["fingerprint"], "eval_fingerprint": eval_fp,
        }
        (tmp / "moa.json").write_text(json.dumps(description, indent=2))
        manifest = {"method": "moa", "mode": cfg.mode, "proposers": names, "weights": weights,
                    "base_model": cfg.aggregator if cfg.mode == "synthesis" else "",
                    "aggregator_tuned": cfg.tune_aggregator, "data_fingerprint": meta["fingerprint"],
                    "shape": meta["shape"]}
        (tmp / "kubetune_method.json").write_text(json.dumps(manifest, indent=2) + "\n")

    proposals = {
        "names": names, "labels": labels, "references": refs,
        "prompts": [list(m) for m in prompts],
        "answers": {n: {k: [a[k] for a in answers[n]] for k in ("text", "tokens", "latency_s")} for n in names},
    }
    proposals_path.parent.mkdir(parents=True, exist_ok=True)
    proposals_path.write_text(json.dumps(proposals))
    # Training the aggregator logs its own child run (train-aggregator); this one records the fit.
    with maybe_stage(ctx, "aggregate-moa", params=asdict(cfg)) as run:
        if run is not None:
            log_metrics({f"weight_{n}": w for n, w in weights.items()})
            log_metrics({f"fit_accuracy_{n}": a for n, a in fit_accuracy.items()})
            log_metrics({f"aggregator_{k}": v for k, v in tuned_metrics.items()})
    return MoAResult(weights=weights, labels=labels, fit_accuracy=fit_accuracy, aggregator_metrics=tuned_metrics,
                     output_dir=str(model_dir))
