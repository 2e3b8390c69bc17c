"""A whole Mixture of Agents as one MLflow pyfunc model, so the registry promotes it like any model.

Logged as "models from code" (MLflow's recommended form: no pickled objects, the code is
read at load time) with the mixture described by a JSON ``model_config``:

* local proposers' folders (and a local aggregator's) are copied into the model as
  artifacts, so the registered version carries the exact weights that were evaluated;
* registry proposers are pinned to the version their alias pointed to at logging time
  (``models:/name@alias`` → ``models:/name/3``) and downloaded at load time;
* HTTP proposers stay remote (base URL, model id, timeout).

Loading needs ``kubetune`` importable (it is in the project's one image).

Input: a DataFrame with a string column ``prompt``. Output: a DataFrame with ``answer``,
``proposals`` and ``dropped`` (JSON objects as strings), ``tokens`` and ``latency_s``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from kubetune.methods.moa.mixture import MODES, mixture_answer
from kubetune.methods.moa.proposers import Proposer, proposer_from_spec, resolve_model_uri

# The models-from-code script MLflow stores with the model and runs at load time.
_MODEL_CODE = """\
import mlflow
from kubetune.methods.moa.pyfunc import MoAModel

mlflow.models.set_model(MoAModel())
"""


def _build(spec: Mapping[str, Any] | None, artifacts: Mapping[str, str]) -> Proposer | None:
    if spec is None:
        return None
    spec = dict(spec)
    if "artifact" in spec:
        spec["path"] = artifacts[spec.pop("artifact")]
    return proposer_from_spec(spec)


class MoAModel(mlflow.pyfunc.PythonModel):
    """The mixture: proposers called concurrently, then the configured aggregation."""

    def load_context(self, context) -> None:
        """Build the proposers and aggregator from ``context.model_config`` and load local ones."""
        config = context.model_config
        self.mode = config["mode"]
        self.weights = config.get("weights")
        self.labels = config.get("labels")
        self.layers = int(config.get("layers", 1))
        self.timeout = float(config.get("timeout", 60.0))
        self.max_new_tokens = config.get("max_new_tokens")
        self.proposers = [_build(s, context.artifacts) for s in config["proposers"]]
        self.aggregator = _build(config.get("aggregator"), context.artifacts)
        # Load in-process models now: the first request should not pay for it, nor time out
        # because of it.
        for p in [*self.proposers, self.aggregator]:
            if p is not None and hasattr(p, "load"):
                p.load()

    def predict(self, context, model_input, params=None):
        """Answer each row's ``prompt`` with the mixture.

        Args:
            context: MLflow's model context (unused after loading).
            model_input: A DataFrame with a ``prompt`` column (a list of strings or a single
                string is accepted too when no signature is enforced).
            params: Unused.

        Returns:
            A DataFrame with ``answer``, ``proposals``, ``dropped``, ``tokens``, ``latency_s``.
        """
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            prompts = model_input["prompt"].tolist()
        elif isinstance(model_input, str):
            prompts = [model_input]
        elif isinstance(model_input, Mapping):
            prompts = list(model_input["prompt"]) if not isinstance(model_input["prompt"], str) else [model_input["prompt"]]
        else:
            prompts = list(model_input)
        rows = []
        for prompt in prompts:
            out = mixture_answer(
                self.proposers,
                prompt,
                mode=self.mode,
                weights=self.weights,
                labels=self.labels,
                aggregator=self.aggregator,
                layers=self.layers,
                timeout=self.timeout,
                max_new_tokens=self.max_new_tokens,
            )
            rows.append(
                {
                    "answer": out.answer if out.answer is not None else "",
                    "proposals": json.dumps(out.proposals),
                    "dropped": json.dumps(out.dropped),
                    "tokens": int(out.tokens),
                    "latency_s": float(out.latency_s),
                }
            )
        return pd.DataFrame(rows, columns=["answer", "proposals", "dropped", "tokens", "latency_s"])


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema(
            [
                ColSpec("string", "answer"),
                ColSpec("string", "proposals"),
                ColSpec("string", "dropped"),
                ColSpec("long", "tokens"),
                ColSpec("double", "latency_s"),
            ]
        ),
    )


def _requirements() -> list[str]:
    # Written out rather than inferred: MLflow infers requirements by loading the model in
    # a subprocess, which here means loading every proposer.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "transformers", "pandas")]


def _mixture(
    proposers: Sequence[Mapping[str, Any]],
    *,
    mode: str,
    weights: Mapping[str, float] | None,
    labels: Sequence[str] | None,
    aggregator: Mapping[str, Any] | None,
    layers: int,
    timeout: float,
    max_new_tokens: int | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``model_config`` and ``artifacts`` of a mixture (shared by log and save)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "weighted" and not weights:
        raise ValueError("mode 'weighted' needs weights (see moa.fit_weights)")
    if mode == "synthesis" and aggregator is None:
        raise ValueError("mode 'synthesis' needs an aggregator spec")

    artifacts: dict[str, str] = {}

    def pack(spec: Mapping[str, Any], key: str) -> dict[str, Any]:
        spec = copy.deepcopy(dict(spec))
        spec.setdefault("name", proposer_from_spec(spec).name)
        if spec.get("kind") == "local" and Path(spec["path"]).exists():
            artifacts[key] = str(Path(spec.pop("path")).resolve())
            spec["artifact"] = key
        # A local spec whose path is no folder is a model reference (the packaged
        # SmolLM2, a hub id): it stays a reference, resolved where the model is loaded.
        elif spec.get("kind") == "registry":
            spec["uri"] = resolve_model_uri(spec["uri"])
        return spec

    config = {
        "proposers": [pack(s, f"proposer_{i}") for i, s in enumerate(proposers)],
        "mode": mode,
        "weights": dict(weights) if weights else None,
        "labels": list(labels) if labels else None,
        "aggregator": pack(aggregator, "aggregator") if aggregator else None,
        "layers": layers,
        "timeout": timeout,
        "max_new_tokens": max_new_tokens,
    }
    names = [s["name"] for s in config["proposers"]]
    if len(set(names)) != len(names):
        raise ValueError(f"proposer names must be distinct, got {names}")
    return config, artifacts


def save_moa_model(
    path: str | Path,
    proposers: Sequence[Mapping[str, Any]],
    *,
    mode: str,
    weights: Mapping[str, float] | None = None,
    labels: Sequence[str] | None = None,
    aggregator: Mapping[str, Any] | None = None,
    layers: int = 1,
    timeout: float = 60.0,
    max_new_tokens: int | None = 64,
) -> Path:
    """Save a mixture as a pyfunc model folder (no MLflow run needed).

    The folder ``register`` turns into a model version: ``mlflow.pyfunc.load_model`` loads
    it (and the registered version) directly. Arguments as for :func:`log_moa_model`.

    Returns:
        ``path``, which must not exist yet or be empty.
    """
    config, artifacts = _mixture(proposers, mode=mode, weights=weights, labels=labels, aggregator=aggregator,
                                 layers=layers, timeout=timeout, max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "moa_model.py"
        code.write_text(_MODEL_CODE)
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(code),
            model_config=config,
            artifacts=artifacts or None,
            signature=_signature(),
            pip_requirements=_requirements(),
        )
    return Path(path)


def log_moa_model(
    proposers: Sequence[Mapping[str, Any]],
    *,
    mode: str,
    weights: Mapping[str, float] | None = None,
    labels: Sequence[str] | None = None,
    aggregator: Mapping[str, Any] | None = None,
    layers: int = 1,
    timeout: float = 60.0,
    max_new_tokens: int | None = 64,
    name: str = "moa",
    registered_model_name: str | None = None,
):
    """Log a mixture as one pyfunc model (in the active run, or a new one).

    Args:
        proposers: Proposer specs as for :func:`kubetune.methods.moa.proposer_from_spec`. Each
            spec's ``name`` is the key of ``weights`` and of the output's ``proposals``;
            local folders are copied into the model (a local ``path`` that is no folder is a
            model reference, such as ``smollm2-135m-instruct``, and stays one).
        mode: ``majority``, ``weighted`` or ``synthesis``.
        weights: Proposer name → weight (mode ``weighted``), from ``moa.fit_weights``.
        labels: The label set, for vote modes on a classification task.
        aggregator: Spec of the synthesis model (mode ``synthesis``).
        layers: Synthesis layers.
        timeout: Deadline in seconds for each round of proposer calls.
        max_new_tokens: Generation budget per call.
        name: The logged model's name within the run.
        registered_model_name: Also register it under this name when given.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` loads it).
    """
    config, artifacts = _mixture(proposers, mode=mode, weights=weights, labels=labels, aggregator=aggregator,
                                 layers=layers, timeout=timeout, max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "moa_model.py"
        code.write_text(_MODEL_CODE)
        started = mlflow.active_run() is None
        if started:
            mlflow.start_run(run_name="moa")
        try:
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                model_config=config,
                artifacts=artifacts or None,
                signature=_signature(),
                pip_requirements=_requirements(),
                registered_model_name=registered_model_name,
            )
        finally:
            if started:
                mlflow.end_run()
