"""All MLflow code lives here: tracking URI, parent/child runs, lineage tags, figures.

One parent run per pipeline run (found or created by the tag ``kubetune.pipeline_run_id``),
one child run per stage (named after the stage). Where MLflow is: ``MLFLOW_TRACKING_URI`` if
set (a server, or a database URI), else an SQLite file ``mlflow.db`` in the working
directory, MLflow 3's own default. Credentials come from MLflow's standard variables
(``MLFLOW_TRACKING_TOKEN``/``USERNAME``/``PASSWORD``) and are never logged.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import kubetune

TAG_PIPELINE_RUN = "kubetune.pipeline_run_id"
TAG_STAGE = "kubetune.stage"
TAG_PIPELINE = "kubetune.pipeline"
# Anything whose name says it is a secret is dropped before logging, whatever its value.
SECRET_MARKERS = ("token", "secret", "password", "key_id", "access_key", "credential", "auth")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow at the tracking URI (and the registry at the same place unless set)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def git_commit() -> str:
    if os.environ.get("KUBETUNE_GIT_COMMIT"):
        return os.environ["KUBETUNE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(kubetune.__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def image_tag() -> str:
    try:
        from kubetune.image import TRAIN_IMAGE

        return TRAIN_IMAGE
    except ImportError:  # pragma: no cover - image module is optional in slim installs
        return f"kubetune:{kubetune.__version__}"


def lineage_tags() -> dict[str, str]:
    return {"kubetune.version": kubetune.__version__, "kubetune.git_commit": git_commit(),
            "kubetune.image": image_tag()}


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Drop keys that name secrets; flatten nested dicts one level as ``a.b``."""
    out = {}
    for k, v in params.items():
        if any(m in k.lower() for m in SECRET_MARKERS):
            continue
        if isinstance(v, dict):
            for k2, v2 in scrub(v).items():
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


def experiment_name(model_name: str) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"kubetune/{model_name}"


def parent_run_id(experiment: str, pipeline_run_id: str, pipeline: str = "") -> str:
    """Find or create the parent run of one pipeline run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}' "
                               f"and tags.`{TAG_STAGE}` = 'pipeline'", order_by=["attributes.start_time ASC"],
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{pipeline or 'pipeline'}-{pipeline_run_id[:8]}",
                            tags={TAG_PIPELINE_RUN: pipeline_run_id, TAG_STAGE: "pipeline",
                                  TAG_PIPELINE: pipeline, **lineage_tags()})
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, *, model_name: str, pipeline_run_id: str, pipeline: str = "",
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A child MLflow run for one stage under the pipeline run's parent."""
    import mlflow

    configure()
    experiment = experiment_name(model_name)
    parent = parent_run_id(experiment, pipeline_run_id, pipeline)
    mlflow.set_experiment(experiment)
    all_tags = {TAG_PIPELINE_RUN: pipeline_run_id, TAG_STAGE: stage, TAG_PIPELINE: pipeline,
                **lineage_tags(), **(tags or {})}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=all_tags) as run:
        if params:
            log_params(params)
        yield run


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    clean = {k: (str(v)[:6000]) for k, v in scrub(params).items()}
    if clean:
        mlflow.log_params(clean)


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    import mlflow

    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_figure(fig, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, name)
    plt.close(fig)


def tag_parent(run, tags: dict[str, str]) -> None:
    """Put tags on the parent run too (e.g. the data fingerprint, known after ingest)."""
    from mlflow.tracking import MlflowClient

    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        client = MlflowClient()
        for k, v in tags.items():
            client.set_tag(parent, k, v)


from dataclasses import dataclass  # noqa: E402


@dataclass
class RunContext:
    """Who a stage runs for: the registered model name and the pipeline run it belongs to."""

    model_name: str
    pipeline_run_id: str
    pipeline: str = ""

    def stage(self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None):
        return stage_run(name, model_name=self.model_name, pipeline_run_id=self.pipeline_run_id,
                         pipeline=self.pipeline, params=params, tags=tags)


def maybe_stage(ctx: "RunContext | None", name: str, params: dict[str, Any] | None = None,
                tags: dict[str, str] | None = None):
    """``ctx.stage(...)`` when tracking, else a no-op context (tests of pure stage logic)."""
    return ctx.stage(name, params, tags) if ctx is not None else contextlib.nullcontext()


# ---------------------------------------------------------------- registry

CHAMPION, CHALLENGER = "champion", "challenger"


def get_alias(model_name: str, alias: str):
    """The model version holding ``alias``, or None (no model or no alias yet)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def download_version(model_name: str, version: str, dst: str | Path) -> Path:
    """Download a registered version's files (the folder ``train`` wrote) to ``dst``."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}",
                                                    dst_path=str(dst)))


def create_version(model_name: str, model_dir: str | Path, tags: dict[str, str], description: str = ""):
    """Log ``model_dir`` to the active run and register it as a new version (waits for READY)."""
    import time

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    mlflow.log_artifacts(str(model_dir), artifact_path="model")
    source = mlflow.get_artifact_uri("model")
    try:
        client.create_registered_model(model_name, description="Registered by kubetune.")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    run_id = mlflow.active_run().info.run_id
    mv = client.create_model_version(model_name, source=source, run_id=run_id,
                                     tags={k: str(v) for k, v in tags.items()}, description=description)
    for _ in range(60):
        if mv.status == "READY":
            break
        time.sleep(1)
        mv = client.get_model_version(model_name, mv.version)
    if mv.status != "READY":
        raise RuntimeError(f"model version {model_name}/{mv.version} is {mv.status}, not READY")
    return mv


def set_version_tags(model_name: str, version: str, tags: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, str(v))


def move_alias(model_name: str, alias: str, version: str, expected_current: str | None) -> tuple[bool, str]:
    """Compare-and-set an alias: move it to ``version`` only if it still points at
    ``expected_current`` (None = no holder). Re-reads after setting to verify.

    The registry has no transactional CAS, so this narrows the race to the gap between the
    re-read and the set; the verify step catches a concurrent writer and reports it.

    Returns:
        (moved, reason).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    current = get_alias(model_name, alias)
    current_v = str(current.version) if current else None
    expected_current = str(expected_current) if expected_current is not None else None
    if current_v != expected_current:
        return False, f"'{alias}' moved to version {current_v} while this run was deciding (expected {expected_current})"
    client.set_registered_model_alias(model_name, alias, version)
    after = get_alias(model_name, alias)
    if after is None or str(after.version) != str(version):
        return False, f"'{alias}' was set concurrently to version {after.version if after else None}"
    return True, f"'{alias}' moved from {current_v} to {version}"
