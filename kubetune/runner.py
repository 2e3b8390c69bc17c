"""Running pipelines locally with ``kfp.local`` and compiling them for a cluster."""

from __future__ import annotations

import inspect
import json
import os
import time
import typing
from pathlib import Path
from typing import Any

from kubetune.config import _check_type
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
    known = parameters(module)
    hints = typing.get_type_hints(module.pipeline.pipeline_func)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown parameter(s) {unknown} for pipeline '{module.NAME}'; "
                          f"parameters: {sorted(known)}")
    return {k: _check_type(k, v, hints.get(k, Any), source) for k, v in params.items()}


def local_env(workdir: Path) -> dict[str, str]:
    """Where a local run keeps its state (absolute, so every task process agrees)."""
    env = {
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}",
        "KUBETUNE_WORKSPACE": os.environ.get("KUBETUNE_WORKSPACE") or str(workdir / ".kubetune" / "workspace"),
        "KUBETUNE_GIT_COMMIT": os.environ.get("KUBETUNE_GIT_COMMIT") or _git_commit(),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env


def _git_commit() -> str:
    from kubetune.tracking import git_commit

    return git_commit()


def run_local(name: str, params: dict[str, Any] | None = None, workdir: str | Path | None = None) -> dict:
    """Run pipeline ``name`` through ``kfp.local`` (no cluster, no Docker) and return register's summary.

    Args:
        name: Pipeline name (``kubetune pipelines`` lists them).
        params: Pipeline parameters to override.
        workdir: Where MLflow's SQLite file, the KFP outputs and checkpoints go (default: cwd).

    Raises:
        ConfigError: unknown or ill-typed parameters.
        KubetuneError: a task failed (its own error is printed above in its log).
    """
    from kfp import local

    module = get_pipeline(name)
    params = check_params(module, params or {}, "parameters")
    workdir = Path(workdir or Path.cwd()).resolve()
    os.environ.update(local_env(workdir))
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / ".kubetune" / "local_outputs"))
    t0 = time.time()
    try:
        task = module.pipeline(**params)
    except RuntimeError as e:
        raise KubetuneError(f"pipeline '{name}' failed: {e} (the task's own error is in its log above)") from None
    summary = json.loads(task.output)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["pipeline"] = name
    # The summary as JSON too, for scripts and CI: .kubetune/last_run.json in the work dir.
    (workdir / ".kubetune" / "last_run.json").write_text(json.dumps(summary, indent=2))
    return summary


def compile_all(out_dir: str | Path, profile_path: str | None = None, names: list[str] | None = None) -> list[Path]:
    """Compile every pipeline (or ``names``) to KFP YAML in ``out_dir``."""
    from kfp import compiler

    from kubetune import kube
    from kubetune.pipelines import PIPELINES

    profile = kube.load_profile(profile_path) if profile_path else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(PIPELINES):
        module = get_pipeline(name)
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(module.build(profile), str(path))
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
