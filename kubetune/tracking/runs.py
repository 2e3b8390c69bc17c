"""MLflow runs: one parent run per pipeline run, one child run per stage, with lineage tags.

The parent run is found or created by the tag ``kubetune.pipeline_run_id``; each stage's child
run is named after the stage. Credentials come from MLflow's standard variables
(``MLFLOW_TRACKING_TOKEN``/``USERNAME``/``PASSWORD``) and are never logged. Logging goes through
the offline spool (:mod:`kubetune.tracking.spool`), so a server outage does not fail a stage.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import kubetune
from kubetune.tracking.server import already_exists, configure, wait_for_server
from kubetune.tracking.spool import _end_run, _resilient, replay_spool, resilient_logging


TAG_PIPELINE_RUN = "kubetune.pipeline_run_id"
TAG_STAGE = "kubetune.stage"
TAG_PIPELINE = "kubetune.pipeline"
# Anything whose name says it is a secret is dropped before logging, whatever its value.
SECRET_MARKERS = ("token", "secret", "password", "key_id", "access_key", "credential", "auth")


def git_commit() -> str:
    """The commit of the code: baked in at compile or image build time, else the source checkout's.

    git is asked only when the package sits at the top of a checkout (an editable install):
    from site-packages it would answer for whatever repository happens to enclose it.
    """
    if os.environ.get("KUBETUNE_GIT_COMMIT"):
        return os.environ["KUBETUNE_GIT_COMMIT"]
    source = Path(kubetune.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != source:
        return "unknown"
    return lines[1]


def image_tag() -> str:
    """The image the stage runs in, as compiled (``KUBETUNE_IMAGE_REF``), else kubetune's default."""
    if os.environ.get("KUBETUNE_IMAGE_REF"):
        return os.environ["KUBETUNE_IMAGE_REF"]
    try:
        from kubetune.ops.image import TRAIN_IMAGE

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
    exp_id = _experiment_id(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}' "
                               f"and tags.`{TAG_STAGE}` = 'pipeline'", order_by=["attributes.start_time ASC"],
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{pipeline or 'pipeline'}-{pipeline_run_id[:8]}",
                            tags={TAG_PIPELINE_RUN: pipeline_run_id, TAG_STAGE: "pipeline",
                                  TAG_PIPELINE: pipeline, **lineage_tags(), **_launch_tag()})
    return run.info.run_id


def _experiment_id(client, experiment: str) -> str:
    """Get or create; two pipelines starting together may both try to create it: one wins."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment)
    except MlflowException as e:
        if not already_exists(e):
            raise
        return client.get_experiment_by_name(experiment).experiment_id


@contextlib.contextmanager
def stage_run(stage: str, *, model_name: str, pipeline_run_id: str, pipeline: str = "",
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A child MLflow run for one stage under the pipeline run's parent."""
    import mlflow

    configure()
    wait_for_server(stage)  # a stage starts only when MLflow answers (backoff, then a clear error)
    replay_spool()  # what an earlier stage could not send while the server was down
    experiment = experiment_name(model_name)
    parent = parent_run_id(experiment, pipeline_run_id, pipeline)
    mlflow.set_experiment(experiment)
    all_tags = {TAG_PIPELINE_RUN: pipeline_run_id, TAG_STAGE: stage, TAG_PIPELINE: pipeline,
                **lineage_tags(), **(tags or {})}
    run = mlflow.start_run(run_name=stage, parent_run_id=parent, tags=all_tags)
    status = "FAILED"
    try:
        with resilient_logging():
            if params:
                log_params(params)
            yield run
        status = "FINISHED"
    finally:
        _end_run(run.info.run_id, status)


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    clean = {k: (str(v)[:6000]) for k, v in scrub(params).items()}
    if clean:
        _resilient("params", mlflow.log_params, clean)


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    import mlflow

    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        _resilient("metrics", mlflow.log_metrics, numeric, step=step)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    _resilient("tags", mlflow.set_tags, tags)


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


def get_run(run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id)


def log_text(text: str, artifact_file: str) -> None:
    """Write ``text`` as an artifact of the active run (e.g. ``model/README.md``)."""
    import mlflow

    mlflow.log_text(text, artifact_file)


def tag_pipeline_run(ctx: "RunContext", tags: dict[str, Any]) -> None:
    """Tags on the parent run of ``ctx``'s pipeline run (found or created)."""
    from mlflow.tracking import MlflowClient

    configure()
    parent = parent_run_id(experiment_name(ctx.model_name), ctx.pipeline_run_id, ctx.pipeline)
    client = MlflowClient()
    for k, v in tags.items():
        client.set_tag(parent, k, str(v))


def _stage_run(ctx: "RunContext", stage: str):
    """The run of ``stage`` ('pipeline' = the parent) in ``ctx``'s pipeline run, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment_name(ctx.model_name))
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_PIPELINE_RUN}` = "
                               f"'{ctx.pipeline_run_id}' and tags.`{TAG_STAGE}` = '{stage}'", max_results=1)
    return found[0] if found else None


def stage_metrics(ctx: "RunContext", stage: str) -> dict[str, float]:
    """Metrics of another stage's child run in the same pipeline run ({} when there is none)."""
    run = _stage_run(ctx, stage)
    return dict(run.data.metrics) if run else {}


# ---------------------------------------------------------------- how runs end
# A parent run is RUNNING until its pipeline ends: ``end_pipeline_runs`` is called by the
# runner after kfp.local returns or fails, and on a cluster by the pipeline's exit handler
# (kubetune.ops.lifecycle). A stage whose process was killed leaves its child run RUNNING: the
# pipeline's end marks it KILLED, and so does a rerun that resumes from its checkpoint.

TAG_LAUNCH = "kubetune.launch_id"
OUTCOMES = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELED": "KILLED", "CANCELLED": "KILLED"}


def _launch_tag() -> dict[str, str]:
    """The local launch a parent run belongs to (``KUBETUNE_LAUNCH_ID``, set by the runner):
    kfp.local's own run id is random and not returned, so the runner finds its runs by this."""
    launch = os.environ.get("KUBETUNE_LAUNCH_ID")
    return {TAG_LAUNCH: launch} if launch else {}


def pipeline_run_tags(ctx: "RunContext") -> dict[str, str]:
    """Tags of the parent run of ``ctx``'s pipeline run ({} before it exists)."""
    configure()
    run = _stage_run(ctx, "pipeline")
    return dict(run.data.tags) if run else {}


def _search_all(filter_string: str) -> list:
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string, output_format="list")


def end_pipeline_runs(tag: str, value: str, state: str) -> list[str]:
    """End every RUNNING parent run tagged ``tag`` = ``value`` (in any experiment) with the
    pipeline's outcome, and its children still RUNNING as KILLED (their process never ended them).

    Args:
        tag: ``kubetune.pipeline_run_id`` (a cluster's exit handler) or ``kubetune.launch_id`` (the runner).
        value: Its value.
        state: The pipeline's final state: SUCCEEDED, FAILED or CANCELED (KFP's words).

    Returns:
        The ids of the parent runs ended.
    """
    from mlflow.tracking import MlflowClient

    configure()
    client, status = MlflowClient(), OUTCOMES.get(state.upper(), "FAILED")
    ended = []
    for parent in _search_all(f"tags.`{tag}` = '{value}' and tags.`{TAG_STAGE}` = 'pipeline' "
                              "and attributes.status = 'RUNNING'"):
        pid = parent.info.run_id
        for child in _search_all(f"tags.`mlflow.parentRunId` = '{pid}' and attributes.status = 'RUNNING'"):
            client.set_tag(child.info.run_id, "kubetune.ended_by", f"pipeline end ({state.lower()})")
            client.set_terminated(child.info.run_id, "KILLED")
        if "kubetune.status" not in parent.data.tags and status != "FINISHED":
            client.set_tag(pid, "kubetune.status", "failed" if status == "FAILED" else "killed")
        client.set_terminated(pid, status)
        ended.append(pid)
    return ended


def end_orphans(tag: str, value: str, keep: str) -> list[str]:
    """Mark RUNNING runs tagged ``tag`` = ``value`` other than ``keep`` KILLED, and their parent
    runs too when they are another pipeline run's (a rerun resuming a killed run's checkpoint:
    the run that wrote it is dead, and so is the pipeline run that started it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    mine = client.get_run(keep).data.tags.get("mlflow.parentRunId")
    killed = []
    for run in _search_all(f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'"):
        if run.info.run_id == keep:
            continue
        client.set_tag(run.info.run_id, "kubetune.ended_by", f"resumed by run {keep}")
        client.set_terminated(run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and parent != mine and client.get_run(parent).info.status == "RUNNING":
            client.set_tag(parent, "kubetune.status", "killed")
            client.set_terminated(parent, "KILLED")
            killed.append(parent)
    return killed
