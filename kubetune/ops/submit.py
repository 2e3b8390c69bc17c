"""One-off runs on a KFP cluster: ``kubetune submit NAME``.

``kubetune submit peft --profile profiles/h200x2.yaml --host https://kfp.example --wait``
checks the parameters, compiles the pipeline with the profile, uploads it as a new version of
the KFP pipeline ``kubetune-peft`` (created on first use), creates a run of that version in
the profile's namespace and experiment, prints the run's URL and, with ``--wait``, follows it
to the end (exit status 1 unless it succeeded).

Runs reference an uploaded version rather than carrying the spec inline, so the KFP UI shows
which version each run used, and the version's description names what it was compiled from
(kubetune version, commit, profile, images). Schedules (``kubetune.ops.schedule``) do the same.

Authentication is the KFP client's own (see ``kubetune.ops.schedule.client``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from kubetune.errors import ConfigError, KubetuneError

DEFAULT_EXPERIMENT = "kubetune"

#: Run states after which nothing more happens (KFP v2beta1 ``RuntimeState``).
FINAL_STATES = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")


@dataclass(frozen=True)
class Target:
    """Where a compiled pipeline goes: the profile's run settings, with the command line's overrides."""

    namespace: str | None
    service_account: str | None
    pipeline_root: str | None
    profile: str
    """The profile's name, or ``none``."""


def target(profile_path: str | None, namespace: str | None = None) -> Target:
    """Read the run settings of a profile (namespace, service account, pipeline root).

    Args:
        profile_path: Profile file or shipped name; None for none.
        namespace: Overrides the profile's namespace.

    Returns:
        The settings; empty ones are None (the KFP installation's defaults).
    """
    from kubetune.ops.kube import load_profile

    profile = load_profile(profile_path) if profile_path else None
    return Target(
        namespace=namespace or (profile.namespace if profile else "") or None,
        service_account=(profile.service_account if profile else "") or None,
        pipeline_root=(profile.pipeline_root if profile else "") or None,
        profile=profile.name if profile else "none",
    )


@contextlib.contextmanager
def kfp_errors(host: str | None) -> Iterator[None]:
    """Turn the KFP client's HTTP and connection errors into one-line errors naming the server."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    where = host or os.environ.get("KF_PIPELINES_ENDPOINT") or "the KFP API"
    try:
        yield
    except ApiException as e:
        try:
            detail = json.loads(e.body or "{}").get("error") or e.reason
        except ValueError:
            detail = e.reason
        raise KubetuneError(f"{where}: HTTP {e.status}: {detail}") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise KubetuneError(f"cannot reach {where}: {type(e).__name__}: {e}") from None


def connect(host: str | None, tgt: Target):
    """A ``kfp.Client`` for the target, refusing a namespace that a standalone KFP would reject.

    A standalone (single-user) KFP runs every pod in its own namespace and answers a
    namespaced experiment request with HTTP 400; say so before anything is uploaded.
    """
    from kubetune.ops.schedule import client

    c = client(host, tgt.namespace)
    if tgt.namespace and not c.get_kfp_healthz().multi_user:
        raise ConfigError(f"namespace {tgt.namespace!r}: this KFP is standalone (single-user) and runs every pod "
                          "in its own namespace; remove 'namespace' from the profile (or --namespace)")
    return c


def kfp_pipeline_name(pipeline: str) -> str:
    """The KFP pipeline a kubetune pipeline's versions are uploaded under."""
    return f"kubetune-{pipeline}"


def version_name(pipeline: str, profile: str, commit: str) -> str:
    """A new, unique, readable version name: ``peft-0.1.0-h200x2-1a2b3c4d-20261206T041500Z-9f2c``.

    KFP refuses a second version of the same name; the random tail keeps two submits in the
    same second apart.
    """
    from kubetune import __version__

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{pipeline}-{__version__}-{profile}-{commit[:8]}-{stamp}-{uuid.uuid4().hex[:4]}"


def _version_description(pipeline: str, profile: str, commit: str, spec_path: Path) -> str:
    from kubetune import __version__

    images = sorted({ex["container"]["image"] for ex in _pipeline_spec(spec_path)["deploymentSpec"]["executors"]
                     .values() if "container" in ex})
    return f"kubetune {__version__} {pipeline}, commit {commit}, profile {profile}; images: {', '.join(images)}"


def _pipeline_spec(path: Path) -> dict:
    import yaml

    return next(yaml.safe_load_all(path.read_text()))


def upload_version(c, pipeline: str, spec_path: Path, tgt: Target) -> tuple[str, str]:
    """Upload a compiled pipeline as a new version of ``kubetune-PIPELINE`` (created if missing).

    Args:
        c: The ``kfp.Client``.
        pipeline: kubetune pipeline name.
        spec_path: The compiled YAML.
        tgt: Namespace and profile (multi-user KFP keeps pipelines per namespace).

    Returns:
        ``(pipeline_id, pipeline_version_id)``.
    """
    from kubetune.tracking import git_commit

    commit = git_commit()
    name = kfp_pipeline_name(pipeline)
    description = _version_description(pipeline, tgt.profile, commit, spec_path)
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = c.list_pipelines(filter=flt, namespace=tgt.namespace).pipelines or []
    if found:
        version = c.upload_pipeline_version(str(spec_path), version_name(pipeline, tgt.profile, commit),
                                            pipeline_id=found[0].pipeline_id, description=description)
        return version.pipeline_id, version.pipeline_version_id
    # The first upload creates the pipeline together with its first version.
    created = c.upload_pipeline(str(spec_path), pipeline_name=name, description=description, namespace=tgt.namespace)
    versions = c.list_pipeline_versions(created.pipeline_id, page_size=1).pipeline_versions or []
    if not versions:
        raise KubetuneError(f"KFP created pipeline {name} ({created.pipeline_id}) without a version")
    return created.pipeline_id, versions[0].pipeline_version_id


def compiled(pipeline: str, profile_path: str | None, tmp: str) -> Path:
    """Compile one pipeline into ``tmp`` (with the profile, if any) and return the YAML's path."""
    from kubetune.ops.runner import compile_all

    (path,) = compile_all(tmp, profile_path, [pipeline])
    return path


def run_url(c, run_id: str) -> str:
    """The KFP UI's page of a run."""
    # The client's own prefix: it knows the UI host it was given and the in-cluster form.
    return f"{c._get_url_prefix()}/#/runs/details/{run_id}"


@dataclass
class Submitted:
    run_id: str
    url: str
    pipeline_id: str
    version_id: str
    experiment_id: str
    state: str | None = None


def submit(pipeline: str, host: str | None = None, params: dict | None = None, profile_path: str | None = None,
           experiment: str = DEFAULT_EXPERIMENT, namespace: str | None = None, run_name: str | None = None,
           wait: bool = False, timeout_s: float = 7 * 24 * 3600, poll_s: float = 15.0) -> Submitted:
    """Create one run of ``pipeline`` on a KFP backend; optionally wait for its end.

    Args:
        pipeline: Pipeline name (``kubetune pipelines``).
        host: KFP API endpoint (default ``$KF_PIPELINES_ENDPOINT``).
        params: Pipeline parameters, checked before anything is sent.
        profile_path: Cluster profile to compile with; its namespace, service account and
            pipeline root go with the run.
        experiment: KFP experiment (created if missing).
        namespace: Overrides the profile's namespace.
        run_name: Run display name (default ``kubetune-PIPELINE-<UTC time>``).
        wait: Follow the run until it ends.
        timeout_s: Give up waiting after this long (the run goes on).
        poll_s: Seconds between state checks while waiting.

    Returns:
        The run, with its final state when waited for.

    Raises:
        ConfigError: bad parameters or profile (nothing is uploaded).
        KubetuneError: the run ended in any state but SUCCEEDED, or the wait timed out.
    """
    from kubetune.ops.runner import check_params, get_pipeline

    if wait and (timeout_s <= 0 or poll_s <= 0):
        raise ConfigError(f"'--timeout' and '--poll' must be positive seconds, got {timeout_s} and {poll_s}")
    module = get_pipeline(pipeline)
    params = check_params(module, params or {}, "submit parameters")
    tgt = target(profile_path, namespace)
    with tempfile.TemporaryDirectory() as tmp:
        path = compiled(pipeline, profile_path, tmp)  # a compile error stops here, before any call to KFP
        with kfp_errors(host):
            c = connect(host, tgt)
            pipeline_id, version_id = upload_version(c, pipeline, path, tgt)
    with kfp_errors(host):
        exp = c.create_experiment(name=experiment, namespace=tgt.namespace)
        name = run_name or f"kubetune-{pipeline}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        run = c.run_pipeline(experiment_id=exp.experiment_id, job_name=name, params=params, pipeline_id=pipeline_id,
                             version_id=version_id, pipeline_root=tgt.pipeline_root,
                             service_account=tgt.service_account)
        out = Submitted(run_id=run.run_id, url=run_url(c, run.run_id), pipeline_id=pipeline_id,
                        version_id=version_id, experiment_id=exp.experiment_id, state=run.state)
        if wait:
            out.state = follow(c, out, timeout_s, poll_s)
    return out


def follow(c, run: Submitted, timeout_s: float, poll_s: float) -> str:
    """Poll a run until it reaches a final state, printing each change of state (stderr).

    Returns:
        ``SUCCEEDED`` (or ``SKIPPED``).

    Raises:
        KubetuneError: the run failed or was canceled, or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        state = (c.get_run(run.run_id).state or "PENDING").upper()
        if state != last:
            print(f"run {run.run_id}: {state}", file=sys.stderr)
            last = state
        if state in FINAL_STATES:
            break
        if time.monotonic() > deadline:
            raise KubetuneError(f"run {run.run_id} still {state} after {timeout_s:.0f} s (it goes on): {run.url}")
        time.sleep(poll_s)
    if state not in ("SUCCEEDED", "SKIPPED"):
        raise KubetuneError(f"run {run.run_id} ended {state}: {run.url}")
    return state
