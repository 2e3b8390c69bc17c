"""Stage `deploy`: serve a registered version, smoke-test it, and move the alias back if it fails.

On a cluster the version becomes a KServe ``InferenceService`` (``kubetune.serving.deploy`` picks the
runtime: vLLM for LLMs, LoRA adapters on their base where vLLM takes them, MLflow for the
rest), applied through the Kubernetes client; the stage waits for ``Ready`` and sends the smoke
prompts. Locally the same stage starts ``mlflow models serve`` on the version and sends the
same prompts. A version that does not come up or does not answer is not left as champion: the
alias returns to the previous champion (``kubetune.tracking.registry_ops.rollback``), the version is
tagged with why, and the stage fails with that reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.errors import ConfigError, KubetuneError, StageError
from kubetune.tracking import RunContext, maybe_stage

SMOKE_PROMPTS = ["Say hello in one word.", "What is 2 + 2?"]


@dataclass
class DeployConfig:
    model_name: str = setting("", "Registered model to deploy.")
    alias: str = setting("champion", "Alias (or version number) to deploy.")
    target: Literal["auto", "local", "cluster"] = setting(
        "auto", "Where to serve: 'cluster' applies a KServe InferenceService, 'local' starts `mlflow models "
                "serve`; auto = cluster when running in a Kubernetes pod.")
    namespace: str = setting("", "Namespace of the InferenceService ('' = the pod's own, else 'default').")
    service_name: str = setting("", "InferenceService name ('' = derived from the model name).")
    gpus: int = setting(1, "GPUs of a vLLM predictor.")
    service_account: str = setting("", "Service account holding the storage credentials ('' = default).")
    endpoint: str = setting("", "Base URL for the smoke test instead of the InferenceService's status.url "
                                "(e.g. the ingress, when the deploying pod cannot reach cluster-local URLs).")
    smoke_prompts: list = setting(SMOKE_PROMPTS, "Prompts the served model must answer (non-empty) to stay.")
    max_tokens: int = setting(16, "Generation budget per smoke prompt.")
    ready_timeout: float = setting(900.0, "Seconds to wait for the server to be Ready.")
    request_timeout: float = setting(120.0, "Seconds per smoke request.")
    rollback: bool = setting(True, "On failure, move 'champion' back to the previous champion.")
    keep_serving: bool = setting(False, "Locally: leave the server running after the smoke test.")
    port: int = setting(0, "Locally: the port to serve on (0 = a free one).")

    def __post_init__(self):
        if not self.model_name:
            raise ConfigError("'model_name' is required")
        if not self.smoke_prompts or not all(isinstance(p, str) and p.strip() for p in self.smoke_prompts):
            raise ConfigError("'smoke_prompts' must be a non-empty list of non-empty strings")
        if self.gpus < 0 or self.max_tokens < 1 or self.ready_timeout <= 0 or self.request_timeout <= 0:
            raise ConfigError("'gpus' must be >= 0, 'max_tokens' >= 1, the timeouts > 0")


@dataclass
class DeployResult:
    ok: bool
    version: str
    runtime: str
    url: str
    answers: list[str] = field(default_factory=list)
    reason: str = ""
    manifest: dict | None = None
    pid: int | None = None


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _namespace(cfg: DeployConfig) -> str:
    if cfg.namespace:
        return cfg.namespace
    pod_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return pod_ns.read_text().strip() if pod_ns.exists() else "default"


def _cluster(cfg: DeployConfig, target) -> DeployResult:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    from kubetune.serving import deploy

    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        import os

        # Read now: the client resolves $KUBECONFIG once, when it is imported.
        k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = k8s.CustomObjectsApi()
    body = deploy.render(target, namespace=_namespace(cfg), name=cfg.service_name or None, gpus=cfg.gpus,
                         service_account=cfg.service_account)
    meta = body["metadata"]
    deploy.apply(body, api)
    url = deploy.wait_ready(meta["namespace"], meta["name"], cfg.ready_timeout, api)
    protocol = "openai" if target.runtime == "vllm" else "v2"
    answers = deploy.smoke(protocol, cfg.endpoint or url, cfg.smoke_prompts, model=meta["name"],
                           input_name=target.input_name, max_tokens=cfg.max_tokens, timeout=cfg.request_timeout)
    return DeployResult(True, target.version, target.runtime, url, answers, "ready and answering", body)


def _local(cfg: DeployConfig, target, log_dir: Path) -> DeployResult:
    from kubetune.serving import deploy
    from kubetune.testing import free_port, wait_http

    port = cfg.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"serve-{target.name}-v{target.version}.log"
    proc = deploy.serve_local(f"models:/{target.name}/{target.version}", port, log)
    ok = False
    try:
        try:
            wait_http(f"{url}/ping", cfg.ready_timeout, proc)
        except RuntimeError as e:
            raise StageError(f"deploy: mlflow models serve did not come up ({e}; log: {log})") from None
        answers = deploy.smoke("mlflow", url, cfg.smoke_prompts, model=target.name, input_name=target.input_name,
                               max_tokens=cfg.max_tokens, timeout=cfg.request_timeout)
        ok = True
    finally:
        if not (ok and cfg.keep_serving):
            deploy.stop(proc)
    return DeployResult(True, target.version, "mlflow-local", url, answers, "serving and answering", None,
                        proc.pid if cfg.keep_serving else None)


def deploy(cfg: DeployConfig, ctx: RunContext | None = None, log_dir: str | Path = ".kubetune/serve") -> DeployResult:
    """Serve ``cfg.model_name@cfg.alias`` and smoke-test it; roll the alias back on failure.

    Args:
        cfg: What to deploy and where.
        ctx: When given, logs to an MLflow child run named ``deploy``.
        log_dir: Locally, where the server's log goes.

    Returns:
        The outcome (URL, answers, the applied InferenceService on a cluster).

    Raises:
        StageError: It did not become ready or did not answer; the message says why and whether
            the champion was rolled back.
    """
    from kubetune.serving import deploy as serving
    from kubetune.tracking import registry_ops
    from kubetune import tracking

    target = serving.describe(cfg.model_name, cfg.alias)
    where = cfg.target if cfg.target != "auto" else ("cluster" if _in_cluster() else "local")
    with maybe_stage(ctx, "deploy", params={**asdict(cfg), "smoke_prompts": json.dumps(cfg.smoke_prompts)}) as run:
        try:
            result = _cluster(cfg, target) if where == "cluster" else _local(cfg, target, Path(log_dir))
        except KubetuneError as e:
            why = str(e)
            note = ""
            holder = tracking.get_alias(cfg.model_name, tracking.CHAMPION)
            if cfg.rollback and holder is not None and str(holder.version) == target.version:
                note = "; " + registry_ops.rollback(cfg.model_name).message
            tracking.set_version_tags(cfg.model_name, target.version, {"kubetune.deploy": f"failed: {why}"})
            if run is not None:
                tracking.set_tags({"kubetune.deploy": "failed", "kubetune.deploy_reason": why + note})
            raise StageError(f"deploy of {cfg.model_name} v{target.version} failed: {why}{note}") from None
        tracking.set_version_tags(cfg.model_name, target.version,
                                  {"kubetune.deploy": f"{where} {target.runtime}: {result.url}"})
        if run is not None:
            tracking.set_tags({"kubetune.deploy": "ok", "kubetune.deploy_url": result.url,
                               "kubetune.deploy_runtime": result.runtime})
    return result
