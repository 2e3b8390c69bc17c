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
from kubetune.core import defaults

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

    from kubetune.ops.kube import refuse_file_store_in_pod

    uri = tracking_uri()
    refuse_file_store_in_pod(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


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


# ---------------------------------------------------------------- an unreachable server
# A training job must not die because the tracking server restarted. While the server does not
# answer, metrics, params and tags of the active run are appended to a local spool
# ($KUBETUNE_WORKSPACE/mlflow-spool/<run id>.jsonl) and sent, with their original steps and
# timestamps, as soon as it answers again (the next log call, or the next stage's start).
# Only an http(s) server is spooled for: a database URI that fails is a real error.

import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from kubetune.errors import ConfigError, StageError  # noqa: E402

_SPOOL_LOCK = threading.RLock()
_TOLD = set()


def spool_dir() -> Path:
    """One folder per tracking server: a spool is only ever replayed to the server it was meant for."""
    import hashlib

    root = os.environ.get("KUBETUNE_MLFLOW_SPOOL")
    root = Path(root) if root else Path(defaults.workspace()) / "mlflow-spool"
    return root / hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]


def _is_server(uri: str | None = None) -> bool:
    return (uri or tracking_uri()).startswith(("http://", "https://"))


def server_up(timeout: float = 5.0) -> bool:
    """Whether the tracking server answers /health now (always True for a database URI)."""
    uri = tracking_uri()
    if not _is_server(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # refused, reset, timed out, 5xx: all mean "not now"
        return False


def wait_for_server(what: str, timeout_s: float | None = None, quiet: bool = False) -> None:
    """Wait with exponential backoff (1, 2, 4 ... 30 s) until MLflow answers, else StageError.

    Args:
        what: Who waits (named in the messages).
        timeout_s: How long to wait; None = ``KUBETUNE_MLFLOW_WAIT_S`` (default 300 s).
        quiet: No line per retry (a CLI command prints its one error line only).
    """
    if not _is_server():
        return
    timeout_s = float(os.environ.get("KUBETUNE_MLFLOW_WAIT_S", "300")) if timeout_s is None else timeout_s
    deadline, delay, attempt = time.monotonic() + timeout_s, 1.0, 1
    while not server_up():
        left = deadline - time.monotonic()
        if left <= 0:
            raise StageError(f"{what}: the MLflow server {tracking_uri()} did not answer for {timeout_s:.0f} s "
                             f"({attempt} attempts); nothing was written to it. Start it (or fix "
                             "MLFLOW_TRACKING_URI) and rerun; KUBETUNE_MLFLOW_WAIT_S sets how long to wait")
        if not quiet:
            _tell(f"{what}: MLflow server {tracking_uri()} is not answering; attempt {attempt}, retrying in "
                  f"{min(delay, left):.0f} s")
        time.sleep(min(delay, left))
        delay, attempt = min(delay * 2, 30.0), attempt + 1


def _tell(message: str) -> None:
    print(f"kubetune: {message}", file=sys.stderr, flush=True)


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def _spool(run_id: str, kind: str, data: dict, step: int | None = None) -> None:
    path = spool_dir() / f"{run_id}.jsonl"
    with _SPOOL_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "data": data, "step": step, "ts": int(time.time() * 1000)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    if run_id not in _TOLD:
        _TOLD.add(run_id)
        _tell(f"MLflow server {tracking_uri()} is unreachable; {kind} of run {run_id} are kept in {path} and "
              "will be sent when it answers again (nothing is lost)")


def _resilient(kind: str, fn, data: dict, step: int | None = None, **kw) -> None:
    """Call an mlflow logging function; spool instead when the server is down."""
    run_id = _active_run_id()
    if kind == "metrics":
        kw["step"] = step
    if not _is_server() or run_id is None:
        fn(data, **kw)
        return
    if server_up():
        if pending_spool():
            replay_spool()
        try:
            fn(data, **kw)
            return
        except Exception:
            if server_up():
                raise  # the server answers: a real error (bad value), not an outage
    _spool(run_id, kind, {k: (v if kind == "metrics" else str(v)) for k, v in data.items()}, step)


def pending_spool() -> list[Path]:
    d = spool_dir()
    return sorted(d.glob("*.jsonl")) if d.exists() else []


def replay_spool() -> int:
    """Send everything spooled to the (now answering) server; return how many records were sent."""
    if not pending_spool() or not server_up():
        return 0
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client, sent = MlflowClient(), 0
    with _SPOOL_LOCK:
        for path in pending_spool():
            try:
                sent += _replay_file(client, path, Metric, Param, RunTag)
            except Exception as e:  # a spool that cannot be replayed must not fail the stage that finds it
                path.rename(path.with_suffix(".failed"))
                _tell(f"could not replay {path} ({type(e).__name__}: {str(e)[:200]}); kept as "
                      f"{path.with_suffix('.failed')}")
    return sent


def _replay_file(client, path: Path, Metric, Param, RunTag) -> int:
    run_id = path.stem
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metrics, params, tags, end = [], {}, {}, None
    for r in records:
        if r["kind"] == "metrics":
            metrics += [Metric(k, float(v), r["ts"], r["step"] or 0) for k, v in r["data"].items()]
        elif r["kind"] == "params":
            params.update(r["data"])
        elif r["kind"] == "tags":
            tags.update(r["data"])
        elif r["kind"] == "end":
            end = r["data"]["status"]
    for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    if params or tags:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    if end:
        client.set_terminated(run_id, end)
    path.unlink()
    _tell(f"MLflow server answers again: sent {len(records)} spooled record(s) of run {run_id}")
    return len(records)


def _end_run(run_id: str, status: str) -> None:
    import mlflow

    if _is_server() and not server_up():
        _pop_active(run_id)
        _spool(run_id, "end", {"status": status})
        return
    try:
        if pending_spool():
            replay_spool()
        mlflow.end_run(status)
    except Exception:
        if not _is_server() or server_up():
            raise
        _pop_active(run_id)
        _spool(run_id, "end", {"status": status})


def _pop_active(run_id: str) -> None:
    """Forget the active run locally without a request to the server (it is down)."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    while stack and stack[-1].info.run_id != run_id:
        stack.pop()
    if stack:
        stack.pop()


@contextlib.contextmanager
def resilient_logging():
    """Route the Trainer's MLflow reporting (``mlflow.log_metrics``/``log_params``) through the spool.

    transformers' MLflowCallback calls ``mlflow.log_metrics(..., synchronous=False)`` on the
    module; asynchronous logging drops a batch the server refuses, so for the duration of a
    stage those calls are made synchronous and spooled when the server is down.
    """
    import mlflow

    orig_metrics, orig_params = mlflow.log_metrics, mlflow.log_params

    def log_metrics_(metrics, step=None, synchronous=None, **kw):
        _resilient("metrics", orig_metrics, {k: v for k, v in metrics.items()}, step=step, **kw)

    def log_params_(params, synchronous=None, **kw):
        _resilient("params", orig_params, dict(params), **kw)

    mlflow.log_metrics, mlflow.log_params = log_metrics_, log_params_
    try:
        yield
    finally:
        mlflow.log_metrics, mlflow.log_params = orig_metrics, orig_params


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
    """Download a registered version and return the folder ``train`` wrote (inside an LLM pyfunc)."""
    import mlflow

    from kubetune.serving.llm_pyfunc import trained_folder

    return trained_folder(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}",
                                                              dst_path=str(dst)))


def find_version(model_name: str, tag: str, value: str):
    """The newest version of ``model_name`` whose tag ``tag`` is ``value``, or None."""
    return next((mv for mv in list_versions(model_name) if mv.tags.get(tag) == value), None)


def set_version_tags(model_name: str, version: str, tags: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, str(v))


def move_alias(model_name: str, alias: str, version: str, expected_current: str | None,
               note: str = "") -> tuple[bool, str]:
    """Compare-and-set an alias: move it to ``version`` only if it still points at
    ``expected_current`` (None = no holder). Re-read, check, set, verify, record history.

    The registry has no transactional compare-and-set, so the whole sequence runs under
    ``alias_lock`` (a registered-model name: creating one is atomic in every MLflow backend,
    the database's unique key decides who gets it). Two runs finishing together therefore
    leave exactly one holder, and the loser gets the reason.

    Returns:
        (moved, reason).
    """
    with alias_lock(model_name, alias):
        current = get_alias(model_name, alias)
        current_v = str(current.version) if current else None
        expected_current = str(expected_current) if expected_current is not None else None
        if current_v != expected_current:
            return False, (f"'{alias}' moved to version {current_v} while this run was deciding "
                           f"(expected {expected_current})")
        set_alias(model_name, alias, version, note=note)
        after = get_alias(model_name, alias)
        if after is None or str(after.version) != str(version):
            return False, f"'{alias}' was set concurrently to version {after.version if after else None}"
        return True, f"'{alias}' moved from {current_v} to {version}"


# Where an alias has been: a JSON list of versions on the registered model, newest last.
# Bounded so the tag stays far below MLflow's tag-value limit (5000 characters).
HISTORY_TAG = "kubetune.history.{alias}"
HISTORY_LEN = 100
# The lock of one alias (re-read, check, set, verify run under it): kubetune/tracking/registry_lock.py.
from kubetune.tracking.registry_lock import LOCK_STALE_S, LOCK_SUFFIX, alias_lock  # noqa: E402,F401


def has_error_code(e: Exception, code: str) -> bool:
    """Whether an MLflow error carries ``code``: as its ``error_code`` (a store's exception) or in
    its text (a REST answer relayed by a server: 'RESOURCE_DOES_NOT_EXIST: ...')."""
    return getattr(e, "error_code", None) == code or code in str(e)


def already_exists(e: Exception) -> bool:
    """Whether an MLflow error says that the thing being created exists already."""
    return has_error_code(e, "RESOURCE_ALREADY_EXISTS") or "already exists" in str(e).lower()


def alias_history(model_name: str, alias: str) -> list[str]:
    """Versions that held ``alias``, oldest first (the current holder last)."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        rm = MlflowClient().get_registered_model(model_name)
    except MlflowException:
        return []
    raw = rm.tags.get(HISTORY_TAG.format(alias=alias))
    return [str(v) for v in json.loads(raw)] if raw else []


def set_alias(model_name: str, alias: str, version: str, note: str = "", history: list[str] | None = None) -> None:
    """Point ``alias`` at ``version`` and record it (call under ``alias_lock``).

    Args:
        history: The alias history to write; default: the recorded one plus ``version``.
    """
    import json
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if history is None:
        history = alias_history(model_name, alias) + [str(version)]
    client.set_registered_model_alias(model_name, alias, str(version))
    client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias),
                                    json.dumps(history[-HISTORY_LEN:]))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(model_name, str(version), f"kubetune.{alias}_since", stamp)
    if note:
        client.set_model_version_tag(model_name, str(version), f"kubetune.{alias}_note", note)


def filter_string_literal(value: str) -> str:
    """``value`` quoted for an MLflow filter string.

    MLflow's filter parser has no escape inside a quoted string, so the quote character the value
    does not contain is used; a value with both kinds cannot be written as a literal at all.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"model name {value!r}: contains both ' and \", which MLflow's search cannot match")


def list_versions(model_name: str) -> list:
    """Every version of a registered model, newest first ([] when there is no such model)."""
    from mlflow.tracking import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = {filter_string_literal(model_name)}")
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def get_version(model_name: str, version: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_model_version(model_name, str(version))


def get_run(run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id)


def log_text(text: str, artifact_file: str) -> None:
    """Write ``text`` as an artifact of the active run (e.g. ``model/README.md``)."""
    import mlflow

    mlflow.log_text(text, artifact_file)


def set_version_description(model_name: str, version: str, description: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().update_model_version(model_name, str(version), description=description)


def tag_pipeline_run(ctx: "RunContext", tags: dict[str, Any]) -> None:
    """Tags on the parent run of ``ctx``'s pipeline run (found or created)."""
    from mlflow.tracking import MlflowClient

    configure()
    parent = parent_run_id(experiment_name(ctx.model_name), ctx.pipeline_run_id, ctx.pipeline)
    client = MlflowClient()
    for k, v in tags.items():
        client.set_tag(parent, k, str(v))


def version_aliases(model_name: str) -> dict[str, list[str]]:
    """{version: [aliases]} from the registered model (version searches do not carry aliases)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        rm = MlflowClient().get_registered_model(model_name)
    except MlflowException:
        return {}
    out: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return {v: sorted(a) for v, a in out.items()}


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

