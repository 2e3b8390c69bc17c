"""Running pipelines locally with ``kfp.local`` and compiling them for a cluster."""

from __future__ import annotations

import inspect
import json
import os
import time
import typing
import uuid
from pathlib import Path
from typing import Any

from kubetune.core.config import _check_type
from kubetune.core.defaults import WORKSPACE, WORKSPACE_ENV
from kubetune.errors import ConfigError, KubetuneError


def get_pipeline(name: str):
    from kubetune.pipelines import PIPELINES

    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline '{name}'; known: {', '.join(PIPELINES)}")
    return PIPELINES[name]


def parameters(module) -> dict[str, inspect.Parameter]:
    """The pipeline's parameters (its public surface), from the pipeline function's signature."""
    return dict(inspect.signature(module.pipeline.pipeline_func).parameters)


def check_params(module, params: dict[str, Any], source: str) -> dict[str, Any]:
    """Check ``params`` for pipeline ``module`` before anything runs or is submitted.

    Beyond the parameters' names and types, every stage's config is built from them (the
    settings dicts included, ``kubetune.ops.preflight.stage_configs``), so an unknown key, a wrong
    type or an out-of-range value is refused here, naming it, rather than in a task's log.

    Returns:
        The parameters, typed.

    Raises:
        ConfigError: naming the parameter or settings key.
    """
    from kubetune.ops import preflight

    known = parameters(module)
    hints = typing.get_type_hints(module.pipeline.pipeline_func)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown parameter(s) {unknown} for pipeline '{module.NAME}'; "
                          f"parameters: {sorted(known)}")
    checked = {k: _check_type(k, v, hints.get(k, Any), source) for k, v in params.items()}
    preflight.stage_configs(module, preflight.with_defaults(module, checked))
    return checked


def local_env(workdir: Path) -> dict[str, str]:
    """Where a local run keeps its state (absolute, so every task process agrees)."""
    env = {
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}",
        WORKSPACE_ENV: os.environ.get(WORKSPACE_ENV) or str(workdir / WORKSPACE),
        "KUBETUNE_GIT_COMMIT": os.environ.get("KUBETUNE_GIT_COMMIT") or _git_commit(),
        "TOKENIZERS_PARALLELISM": "false",
        # A local run means its file store (even when this machine is itself a pod, as CI may be).
        "KUBETUNE_ALLOW_FILE_STORE": "1",
    }
    return env


def _git_commit() -> str:
    from kubetune.tracking import git_commit

    return git_commit()


def run_local(name: str, params: dict[str, Any] | None = None, workdir: str | Path | None = None,
              verbose: bool = True) -> dict:
    """Run pipeline ``name`` through ``kfp.local`` (no cluster, no Docker) and return register's summary.

    Args:
        name: Pipeline name (``kubetune pipelines`` lists them).
        params: Pipeline parameters to override.
        workdir: Where MLflow's SQLite file, the KFP outputs and checkpoints go (default: cwd).
        verbose: Stream kfp.local's whole output; otherwise one line per task (``kubetune.ops.run_ui``).
            The full log is in ``.kubetune/logs/`` either way.

    Raises:
        ConfigError: unknown, ill-typed or out-of-range parameters or settings, a missing base model
            folder, a training step that cannot fit in this machine's memory.
        KubetuneError: a task failed (its own error is printed above in its log).
    """
    from kfp import local

    from kubetune.ops import preflight

    module = get_pipeline(name)
    params = check_params(module, params or {}, "parameters")
    full = preflight.with_defaults(module, params)
    preflight.check_local(full, preflight.stage_configs(module, full))
    workdir = Path(workdir or Path.cwd()).resolve()
    os.environ.update(local_env(workdir))
    # Every parent run this launch creates is tagged with it, so that they can be ended below.
    launch = os.environ["KUBETUNE_LAUNCH_ID"] = uuid.uuid4().hex
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / ".kubetune" / "local_outputs"))
    t0 = time.time()
    from kubetune.ops.run_ui import task_lines

    try:
        with task_lines(workdir / ".kubetune" / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log", verbose):
            task = module.pipeline(**params)
    except RuntimeError as e:
        _end_runs(launch, "FAILED")
        raise KubetuneError(f"pipeline '{name}' failed: {e} (the task's own error is in its log above)") from None
    except BaseException:  # Ctrl-C, or kfp.local itself broke: the runs did not finish
        _end_runs(launch, "CANCELED")
        raise
    _end_runs(launch, "SUCCEEDED")
    summary = json.loads(task.output)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["pipeline"] = name
    # The summary as JSON too, for scripts and CI: .kubetune/last_run.json in the work dir.
    (workdir / ".kubetune" / "last_run.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_profile(profile_path: str):
    """The cluster profile at ``profile_path`` (or shipped under that name); every problem a ConfigError."""
    import yaml

    from kubetune.ops import kube

    try:
        return kube.load_profile(profile_path)
    except FileNotFoundError as e:
        raise ConfigError(f"--profile: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--profile {profile_path}: not valid YAML: {' '.join(str(e).split())}") from None


def _end_runs(launch: str, state: str) -> None:
    """End the MLflow parent runs of one local launch with the pipeline's outcome (what the exit
    handler does on a cluster); a tracking failure here must not hide the pipeline's own error."""
    from kubetune.tracking import TAG_LAUNCH, end_pipeline_runs

    os.environ.pop("KUBETUNE_LAUNCH_ID", None)  # later runs in this process are not this launch's
    try:
        end_pipeline_runs(TAG_LAUNCH, launch, state)
    except Exception as e:  # noqa: BLE001 - reported, not raised: the pipeline's outcome comes first
        print(f"kubetune: could not end the MLflow runs of this pipeline run ({type(e).__name__}: {e})")


def compile_all(out_dir: str | Path, profile_path: str | None = None, names: list[str] | None = None) -> list[Path]:
    """Compile every pipeline (or ``names``) to KFP YAML in ``out_dir``."""
    from kfp import compiler

    from kubetune.ops.lifecycle import with_exit_handler
    from kubetune.pipelines import PIPELINES

    profile = load_profile(profile_path) if profile_path else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(PIPELINES):
        module = get_pipeline(name)
        check_params(module, {}, f"pipeline '{name}' defaults")
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(with_exit_handler(module.build(profile), profile), str(path))
        written.append(path)
    return written


def format_summary(s: dict) -> str:
    metric = s.get("primary_metric", "metric")

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    uri = s.get("tracking_uri", "")
    ui = (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}")
    if s.get("skipped"):
        return "\n".join(["", f"== kubetune run {s.get('pipeline')}: skipped in {s.get('wall_s', 0):.0f} s ==",
                          f"  {s.get('reason')}",
                          f"  model: {s.get('model_name')} v{s.get('version')} stays champion "
                          "(retrain anyway: --set force=true)", f"  MLflow UI: {ui}", ""])
    ci, n, fci = s.get("candidate_ci"), s.get("n"), s.get("forgetting_ci")
    lines = [
        "",
        f"== kubetune run {s.get('pipeline')}: done in {s.get('wall_s', 0):.0f} s ==",
        f"  {metric}: base {fmt(s.get('base'))} -> tuned {fmt(s.get('candidate'))}"
        + (f" [95% interval {ci[0]:.3f}-{ci[1]:.3f}, n={n:.0f}]" if ci and n else "")
        + (f" (champion before: {fmt(s.get('champion_before'))})" if s.get("champion_before") is not None else ""),
    ]
    if s.get("vs_base"):
        d, low, high, better, worse = s["vs_base"]
        lines.append(f"  tuned - base, example by example: {d:+.4f} [95% interval {low:+.3f} to {high:+.3f}]; "
                     f"better on {better:.0f}, worse on {worse:.0f}" + (f" of {n:.0f}" if n else ""))
    if s.get("forgetting") is not None:
        lines.append(f"  forgetting (general-text perplexity vs base): {s['forgetting']:+.1%}"
                     + (f" [95% interval {fci[0]:+.1%} to {fci[1]:+.1%}]" if fci else ""))
    lines += [
        f"  model: {s.get('model_name')} version {s.get('version')}  aliases: {', '.join(s.get('aliases', []))}",
        f"  decision: {s.get('reason')}",
        f"  MLflow UI: {ui}",
        "",
    ]
    return "\n".join(lines)


__all__ = ["run_local", "compile_all", "format_summary", "KubetuneError"]
