"""Scheduled retraining: KFP recurring runs of a compiled kubetune pipeline.

``kubetune schedule peft --cron "0 3 * * 1" --host https://kfp.example`` compiles the pipeline
(with a cluster profile if given), and creates a recurring run from the compiled spec: at most
one run at a time (``max_concurrency=1``: a slow run is never overtaken by the next), and no
catch-up by default (a paused schedule resumes with the latest interval, not a backfill of
every missed one). Retraining on unchanged data ends after ingest (docs/registry.md), so a
frequent schedule costs one small CPU step per run when nothing changed.

Authentication is the KFP client's own: ``--host`` or ``KF_PIPELINES_ENDPOINT``, the IAP/OAuth
variables ``KF_PIPELINES_*_CLIENT_ID``/``SECRET`` it reads itself, the in-cluster service
account token, ``~/.config/kfp/context.json`` (``kfp`` CLI login), or a bearer token in
``KF_PIPELINES_TOKEN`` passed as ``existing_token`` (never printed).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from kubetune.errors import ConfigError

DEFAULT_EXPERIMENT = "kubetune"
TOKEN_ENV = "KF_PIPELINES_TOKEN"


def kfp_cron(expr: str) -> str:
    """KFP's cron has 6 fields (seconds first); a classic 5-field expression gets second 0.

    ``"0 3 * * 1"`` (03:00 every Monday) becomes ``"0 0 3 * * 1"``.
    """
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError(f"'--cron' must have 5 fields (min hour day month weekday) or 6 (seconds first), "
                      f"got {len(fields)}: {expr!r}")


def client(host: str | None = None, namespace: str | None = None):
    """A ``kfp.Client`` with the standard options (see the module docstring)."""
    import kfp

    host = host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if not host:
        raise ConfigError("no KFP host: pass --host or set KF_PIPELINES_ENDPOINT")
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if os.environ.get(TOKEN_ENV):
        kwargs["existing_token"] = os.environ[TOKEN_ENV]
    return kfp.Client(**kwargs)


@dataclass
class Schedule:
    id: str
    name: str
    cron: str
    enabled: bool
    max_concurrency: int | None
    no_catchup: bool | None
    experiment_id: str | None


def _schedule(rr) -> Schedule:
    trigger = rr.trigger
    cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else ""
    return Schedule(id=rr.recurring_run_id, name=rr.display_name, cron=cron, enabled=rr.mode != "DISABLE",
                    max_concurrency=int(rr.max_concurrency) if rr.max_concurrency is not None else None,
                    no_catchup=rr.no_catchup, experiment_id=rr.experiment_id)


def schedule(pipeline: str, cron: str, host: str | None = None, params: dict | None = None,
             profile_path: str | None = None, name: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
             namespace: str | None = None, catchup: bool = False) -> Schedule:
    """Create a recurring run of ``pipeline`` on a KFP backend.

    The pipeline is compiled with the profile and uploaded as a new version of
    ``kubetune-PIPELINE`` (see ``kubetune.ops.submit``); the recurring run references that
    version and carries the profile's service account and pipeline root.

    Args:
        pipeline: Pipeline name (``kubetune pipelines``).
        cron: Cron expression, 5 fields (or KFP's 6, seconds first).
        host: KFP API endpoint.
        params: Pipeline parameters (checked against the pipeline's signature).
        profile_path: Cluster profile YAML used to compile (GPUs, resources, volumes, secrets).
        name: Recurring run name (default ``kubetune-<pipeline>``).
        experiment: KFP experiment to put it in (created if missing).
        namespace: Kubernetes namespace (multi-user KFP); overrides the profile's.
        catchup: Backfill missed intervals after a pause (off by default).

    Returns:
        The created schedule.
    """
    from kubetune.ops.runner import check_params, get_pipeline
    from kubetune.ops.submit import compiled, connect, kfp_errors, target, upload_version

    module = get_pipeline(pipeline)
    params = check_params(module, params or {}, "schedule parameters")
    cron = kfp_cron(cron)
    tgt = target(profile_path, namespace)
    with tempfile.TemporaryDirectory() as tmp:
        path = compiled(pipeline, profile_path, tmp)
        with kfp_errors(host):
            c = connect(host, tgt)
            pipeline_id, version_id = upload_version(c, pipeline, path, tgt)
    with kfp_errors(host):
        exp = c.create_experiment(name=experiment, namespace=tgt.namespace)
        rr = c.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=name or f"kubetune-{pipeline}",
            description=f"kubetune {pipeline}: scheduled retraining ({cron})", cron_expression=cron,
            max_concurrency=1, no_catchup=not catchup, params=params, pipeline_id=pipeline_id,
            version_id=version_id, pipeline_root=tgt.pipeline_root, service_account=tgt.service_account,
            enabled=True)
    return _schedule(rr)


def schedules(host: str | None = None, namespace: str | None = None) -> list[Schedule]:
    """Every recurring run the client can see (first 200)."""
    from kubetune.ops.submit import kfp_errors

    with kfp_errors(host):
        resp = client(host, namespace).list_recurring_runs(page_size=200, namespace=namespace)
    return [_schedule(rr) for rr in resp.recurring_runs or []]


def unschedule(id_or_name: str, host: str | None = None, namespace: str | None = None) -> Schedule:
    """Delete a recurring run, named by id or by name (a name must be unique)."""
    found = [s for s in schedules(host, namespace) if id_or_name in (s.id, s.name)]
    if not found:
        raise ConfigError(f"no schedule with id or name {id_or_name!r}")
    if len(found) > 1:
        raise ConfigError(f"{len(found)} schedules are named {id_or_name!r}; pass the id: "
                          f"{', '.join(s.id for s in found)}")
    from kubetune.ops.submit import kfp_errors

    with kfp_errors(host):
        client(host, namespace).delete_recurring_run(found[0].id)
    return found[0]


def format_schedules(items: list[Schedule]) -> str:
    if not items:
        return "no schedules"
    header = ["id", "name", "cron", "enabled", "max_concurrency", "catchup"]
    rows = [[s.id, s.name, s.cron, str(s.enabled).lower(), str(s.max_concurrency),
             "no" if s.no_catchup else "yes"] for s in items]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)
