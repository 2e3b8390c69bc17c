"""Registered model versions as MLflow models: every LLM a pyfunc, every version a LoggedModel.

An LLM version is logged as MLflow "models from code" (no pickled objects; the code is read at
load time) whose one artifact is the folder the training stage wrote:

* adapters (LoRA family, prompt and prefix tuning, IA3, bottleneck adapters) carry only their
  own weights and ``kubetune_method.json``, whose ``base_model`` is a *reference*: the packaged
  SmolLM2, a hub id or a folder, resolved by ``kubetune.core.models`` where the model is loaded.
  The base weights are never copied into the registry;
* whole models (full fine-tuning, upcycled MoE, DPO/PPO policies merged) travel whole.

Loading goes through ``kubetune.core.scoring.load_model_artifact`` and answers through its
``generate``, so a served model answers exactly as the evaluated one did (prompt and prefix
tuning need their own decoding path there). Heads and Mixtures of Agents are pyfunc folders
already (``kubetune.methods.features``, ``kubetune.methods.moa.pyfunc``) and are logged as they are.

Every version is one MLflow 3 ``LoggedModel``, an output of the ``register`` run, and the model
version is created from it (``models:/<model_id>``), which links the three. The model card is
the model's ``README.md`` (and the trained folder's, so a downloaded version still holds it).

Input: strings (a list, or a DataFrame column ``prompt``), each one user turn of a chat.
Output: one answer string per prompt. Parameter ``max_new_tokens`` (default from the config).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow.pyfunc

MANIFEST = "kubetune_method.json"
CARD = "README.md"
# Where the trained folder sits inside the logged model (``artifacts/<key>``).
ARTIFACT_KEY = "model"
DEFAULT_MAX_NEW_TOKENS = 64

_MODEL_CODE = """\
import mlflow
from kubetune.serving.llm_pyfunc import LLMModel

mlflow.models.set_model(LLMModel())
"""


def prompts_of(model_input) -> list[str]:
    """The prompts in any input shape pyfunc hands over (DataFrame, list, dict, one string)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, Mapping):
        value = model_input.get("prompt", next(iter(model_input.values()), []))
        return [value] if isinstance(value, str) else [str(p) for p in value]
    return [str(p) for p in model_input]


class LLMModel(mlflow.pyfunc.PythonModel):
    """A trained kubetune LLM (adapter on its base, or whole) answering chat prompts greedily."""

    def load_context(self, context) -> None:
        """Load the trained folder onto its base (resolved here) and its tokenizer."""
        from kubetune.core.scoring import load_model_artifact

        config = context.model_config or {}
        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.batch_size = int(config.get("batch_size", 8))
        path = context.artifacts[ARTIFACT_KEY]
        self.model = load_model_artifact(path)
        self.tokenizer = _tokenizer(Path(path))

    def predict(self, context, model_input, params=None):
        """Answer each prompt.

        Args:
            context: MLflow's model context (unused after loading).
            model_input: Prompts: a list of strings, a DataFrame with a ``prompt`` column, or one string.
            params: ``max_new_tokens`` overrides the logged default.

        Returns:
            One answer (string) per prompt.
        """
        from kubetune.core.scoring import generate

        prompts = prompts_of(model_input)
        if not prompts:
            return []
        max_new = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        return generate(self.model, self.tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new,
                        self.batch_size)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    from kubetune.core import models
    from kubetune.core.peft_methods import read_manifest

    if (path / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return models.load_tokenizer(read_manifest(path).get("base_model") or models.DEFAULT_BASE_MODEL)


def signature():
    """Strings in, strings out, ``max_new_tokens`` as a request parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]))


def _requirements() -> list[str]:
    # Written out rather than inferred: MLflow infers requirements by loading the model in a
    # subprocess, which here means loading the base model at registration time.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "transformers", "peft", "pandas")]


def _link_or_copy(src: str, dst: str) -> str:
    # Hard links make staging a multi-GB full model free when both sit on one filesystem.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def is_pyfunc_folder(model_dir: str | Path) -> bool:
    """Whether a trained folder is an MLflow model already (heads, Mixtures of Agents)."""
    return (Path(model_dir) / "MLmodel").exists()


def save_llm_model(path: str | Path, model_dir: str | Path, card: str | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Path:
    """Save a trained LLM folder as a pyfunc model folder (no MLflow run needed).

    Args:
        path: The new model folder (must not exist yet).
        model_dir: What a training stage wrote (adapter or whole model, with its manifest).
        card: The model card, written as ``README.md`` at the model's root and in the trained folder.
        max_new_tokens: Default generation budget of ``predict``.

    Returns:
        ``path``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / ARTIFACT_KEY
        shutil.copytree(model_dir, staged, copy_function=_link_or_copy)
        if card is not None:
            (staged / CARD).unlink(missing_ok=True)
            (staged / CARD).write_text(card)
        code = Path(tmp) / "llm_model.py"
        code.write_text(_MODEL_CODE)
        mlflow.pyfunc.save_model(path=str(path), python_model=str(code), artifacts={ARTIFACT_KEY: str(staged)},
                                 model_config={"max_new_tokens": max_new_tokens}, signature=signature(),
                                 pip_requirements=_requirements())
    _root_files(Path(path), model_dir, card)
    return Path(path)


def _root_files(path: Path, model_dir: str | Path, card: str | None) -> None:
    """The card at the model's root too, where the MLflow UI shows it (the manifest stays inside)."""
    if card is not None:
        (path / CARD).write_text(card)


def log_version(model_name: str, model_dir: str | Path, tags: Mapping[str, str], description: str = "",
                card: str | None = None):
    """Log a trained folder as a LoggedModel of the active run and register it as a new version.

    ``log_model`` then ``register_logged``: the register stage calls the two apart, uploading
    before it takes the champion's lock and creating the version under it.

    Args:
        model_name: The registered model (created if missing).
        model_dir: What the training stage wrote.
        tags: Version tags (lineage, numbers, gates).
        description: Version description.
        card: The model card (``README.md``).

    Returns:
        The ``ModelVersion``.
    """
    return register_logged(model_name, log_model(model_dir, card), tags, description)


def log_model(model_dir: str | Path, card: str | None = None) -> str:
    """Log a trained folder as a LoggedModel of the active run; returns its ``models:/<model_id>`` URI.

    LLM folders become :class:`LLMModel` pyfuncs; folders that are pyfunc models already are
    logged as they are. This is the slow half of registering (the weights travel).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    method = _method(model_dir)
    logged = mlflow.initialize_logged_model(name="model", source_run_id=run_id, model_type=method,
                                            tags={"kubetune.method": method})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if is_pyfunc_folder(model_dir):
                local = Path(tmp) / "model"
                shutil.copytree(model_dir, local, copy_function=_link_or_copy)
                if card is not None:
                    (local / CARD).write_text(card)
            else:
                local = save_llm_model(Path(tmp) / "model", model_dir, card)
            _stamp(local, logged.model_id, run_id)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [mlflow.entities.LoggedModelOutput(logged.model_id, step=0)])
    return f"models:/{logged.model_id}"


def register_logged(model_name: str, source: str, tags: Mapping[str, str], description: str = ""):
    """Register a LoggedModel (``source`` from :func:`log_model`) as a new version (waits for READY)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from kubetune.tracking import already_exists

    client = MlflowClient()
    try:
        client.create_registered_model(model_name, description="Registered by kubetune.")
    except MlflowException as e:
        if not already_exists(e):
            raise
    # register_model (not the client's create_model_version) also records the version on the
    # LoggedModel (its mlflow.modelVersions tag), which is what links the two both ways.
    mv = mlflow.register_model(source, model_name, tags={k: str(v) for k, v in tags.items()})
    if description:
        client.update_model_version(model_name, mv.version, description=description)
    return _wait_ready(client, model_name, client.get_model_version(model_name, mv.version))


def _method(model_dir: str | Path) -> str:
    import json

    path = Path(model_dir) / MANIFEST
    return str(json.loads(path.read_text()).get("method", "unknown")) if path.exists() else "unknown"


def _stamp(local: Path, model_id: str, run_id: str) -> None:
    """Record the LoggedModel's id and run in MLmodel, as ``mlflow.pyfunc.log_model`` does."""
    from mlflow.models import Model

    mlmodel = local / "MLmodel"
    model = Model.load(str(mlmodel))
    model.model_id, model.run_id = model_id, run_id
    model.save(str(mlmodel))


def _wait_ready(client, model_name: str, mv):
    import time

    for _ in range(60):
        if mv.status == "READY":
            return mv
        time.sleep(1)
        mv = client.get_model_version(model_name, mv.version)
    raise RuntimeError(f"model version {model_name}/{mv.version} is {mv.status}, not READY")


def trained_folder(downloaded: str | Path) -> Path:
    """The trained folder inside a downloaded version (an LLM pyfunc's artifact, else the folder).

    Heads and mixtures keep their manifest at the root; an LLM pyfunc keeps it with the weights.
    """
    downloaded = Path(downloaded)
    inner = downloaded / "artifacts" / ARTIFACT_KEY
    if not (downloaded / MANIFEST).exists() and (inner / MANIFEST).exists():
        return inner
    return downloaded
