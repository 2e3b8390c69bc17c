"""Serving a registered version: a KServe InferenceService on a cluster, `mlflow models serve` locally.

Which KServe runtime serves a version follows from what it is (``kubetune.serving.llm_pyfunc``):

* a whole LLM (full fine-tuning, MoE, merged DPO/PPO policies): the ``huggingface`` serving
  runtime with its vLLM backend, reading the trained folder from the version's artifacts;
* a LoRA adapter on a base that the cluster can fetch (a hub id; the packaged SmolLM2 is its hub
  original there): the same runtime, the base by id and the adapter as a vLLM LoRA module, so
  the base weights are never copied;
* everything vLLM cannot load (DoRA, prompt and prefix tuning, IA3, bottleneck adapters, heads,
  Mixtures of Agents): KServe's ``mlflow`` runtime on the pyfunc model, which loads any of them.

The object is built from the ``kserve`` SDK's models and applied with the Kubernetes client;
readiness is the InferenceService's ``Ready`` condition. The smoke test sends a few prompts in
the protocol of the runtime (OpenAI chat for vLLM, KServe's v2 for MLflow, MLflow's
``/invocations`` locally) and wants a non-empty answer to each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import StageError

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# vLLM loads LoRA modules only (DoRA, prompt/prefix tuning, IA3 and bottleneck adapters it cannot).
VLLM_ADAPTERS = {"lora"}
WHOLE_LLM = {"full", "moe", "dpo", "ppo"}
# The packaged base model, as a cluster fetches it (the GGUF package is a local convenience).
HUB_ORIGINALS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class Target:
    """What one version is, for serving: how it loads and where its files are."""

    name: str
    version: str
    method: str
    base_model: str
    storage_uri: str  # the pyfunc model (MLflow runtime) or the trained folder inside it (vLLM)
    runtime: str  # "vllm" or "mlflow"
    input_name: str | None  # the pyfunc's named input column, if any


def service_name(model_name: str) -> str:
    """A DNS-1035 label for the InferenceService (lower case, dashes, at most 45 characters).

    KServe appends ``-predictor-<hash>`` to the name for its Knative revisions, within the 63 of a label.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}"
    return name[:45].rstrip("-")


def describe(model_name: str, alias_or_version: str) -> Target:
    """Look the version up in the registry and decide its runtime."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from kubetune import tracking

    tracking.configure()
    client = MlflowClient()
    if alias_or_version.isdigit():
        mv = client.get_model_version(model_name, alias_or_version)
    else:
        mv = tracking.get_alias(model_name, alias_or_version)
        if mv is None:
            raise StageError(f"deploy: {model_name} has no version with alias '{alias_or_version}'")
    location = client.get_model_version_download_uri(model_name, str(mv.version))
    method = mv.tags.get("kubetune.method", "")
    base = mv.tags.get("kubetune.base_model", "")
    files = {a.path.rsplit("/", 1)[-1] for a in mlflow.artifacts.list_artifacts(f"{location}/artifacts/model")} \
        if method not in ("moa", "feature-extraction") else set()
    whole = "config.json" in files
    hub_base = HUB_ORIGINALS.get(base, base if _is_hub_id(base) else "")
    if files and (whole or (method in VLLM_ADAPTERS and hub_base)):
        runtime, storage = "vllm", f"{location}/artifacts/model"
    else:
        runtime, storage = "mlflow", location
    schema = mlflow.models.get_model_info(f"models:/{model_name}/{mv.version}").signature
    names = schema.inputs.input_names() if schema is not None else []
    return Target(model_name, str(mv.version), method, hub_base if runtime == "vllm" and not whole else base,
                  storage, runtime, names[0] if names and isinstance(names[0], str) else None)


def _is_hub_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", ref or "")) and not Path(ref).exists()


# ---------------------------------------------------------------- the InferenceService


def render(target: Target, *, namespace: str, name: str | None = None, gpus: int = 1,
           service_account: str = "") -> dict:
    """The InferenceService for ``target`` as a plain dict (what the Kubernetes API takes).

    Args:
        target: From :func:`describe`.
        namespace: Where it goes.
        name: InferenceService name (default: from the model name).
        gpus: GPUs for a vLLM predictor (the MLflow runtime runs on CPU).
        service_account: Service account with the storage credentials ('' = the namespace default).

    Returns:
        The object, built with the ``kserve`` SDK's models and serialized by its API client.
    """
    from kserve import (V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1ModelFormat,
                        V1beta1ModelSpec, V1beta1PredictorSpec, constants)
    from kubernetes import client as k8s

    name = name or service_name(target.name)
    # Pod Security "restricted": non-root, no privilege escalation, no capabilities, seccomp.
    security = k8s.V1SecurityContext(run_as_non_root=True, allow_privilege_escalation=False,
                                     capabilities=k8s.V1Capabilities(drop=["ALL"]),
                                     seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))
    if target.runtime == "vllm":
        args = [f"--model_name={name}", "--backend=vllm"]
        if target.method in VLLM_ADAPTERS:
            # The base from the hub by id; the adapter (mounted from storage_uri at /mnt/models)
            # as a LoRA module that requests name with the model name.
            args += [f"--model_id={target.base_model}", "--enable-lora", f"--lora-modules={name}=/mnt/models"]
        resources = k8s.V1ResourceRequirements(limits={"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": str(gpus)},
                                               requests={"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": str(gpus)})
        model = V1beta1ModelSpec(model_format=V1beta1ModelFormat(name="huggingface"), storage_uri=target.storage_uri,
                                 args=args, resources=resources, security_context=security)
    else:
        resources = k8s.V1ResourceRequirements(limits={"cpu": "2", "memory": "8Gi"},
                                               requests={"cpu": "1", "memory": "4Gi"})
        model = V1beta1ModelSpec(model_format=V1beta1ModelFormat(name="mlflow"), protocol_version="v2",
                                 storage_uri=target.storage_uri, resources=resources, security_context=security)
    isvc = V1beta1InferenceService(
        api_version=f"{constants.KSERVE_GROUP}/{constants.KSERVE_V1BETA1_VERSION}",
        kind=constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels={
            "app.kubernetes.io/managed-by": "kubetune", "kubetune/model": service_name(target.name),
            "kubetune/version": target.version},
            annotations={"kubetune/model-name": target.name, "kubetune/runtime": target.runtime,
                         "kubetune/method": target.method}),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(
            model=model, service_account_name=service_account or None)))
    return k8s.ApiClient().sanitize_for_serialization(isvc)


def apply(body: dict, api=None) -> dict:
    """Create the InferenceService, or replace the spec of the one already there."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    api = api or k8s.CustomObjectsApi()
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    except ApiException as e:
        if e.status != 409:
            raise StageError(f"deploy: creating InferenceService {ns}/{name} failed: {e.status} {e.reason}") from None
    current = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    body = {**body, "metadata": {**body["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
    return api.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, body)


def wait_ready(namespace: str, name: str, timeout: float, api=None, poll: float = 2.0) -> str:
    """Wait for the ``Ready`` condition; return the service URL, or raise with KServe's own reason."""
    from kubernetes import client as k8s

    api = api or k8s.CustomObjectsApi()
    deadline, why = time.time() + timeout, "no status yet"
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        if ready and ready.get("status") == "True" and status.get("url"):
            return status["url"]
        if ready:
            why = f"{ready.get('reason') or 'not ready'}: {ready.get('message') or ''}".strip(": ")
        if time.time() >= deadline:
            raise StageError(f"deploy: InferenceService {namespace}/{name} not Ready after {timeout:.0f} s ({why})")
        time.sleep(poll)


# ---------------------------------------------------------------- smoke test


def _post(url: str, payload: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise StageError(f"smoke test: {url} answered {e.code}: {e.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise StageError(f"smoke test: {url} did not answer ({e})") from None


def smoke(protocol: str, url: str, prompts: list[str], *, model: str, input_name: str | None = None,
          max_tokens: int = 16, timeout: float = 120.0) -> list[str]:
    """Send each prompt; return the answers, or raise naming the first prompt that got none.

    Args:
        protocol: ``openai`` (vLLM), ``v2`` (KServe's MLflow runtime) or ``mlflow`` (``/invocations``).
        url: The server's base URL.
        prompts: What to ask.
        model: The served model's name (OpenAI ``model``, v2 path).
        input_name: The pyfunc's named input column (v2 and mlflow), if it has one.
        max_tokens: Generation budget per prompt.
        timeout: Seconds per request.
    """
    url = url.rstrip("/")
    answers = []
    for prompt in prompts:
        if protocol == "openai":
            out = _post(f"{url}/openai/v1/chat/completions", {"model": model, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": prompt}]}, timeout)
            answer = ((out.get("choices") or [{}])[0].get("message") or {}).get("content")
        elif protocol == "v2":
            out = _post(f"{url}/v2/models/{model}/infer", {"inputs": [
                {"name": input_name or "input-0", "shape": [1], "datatype": "BYTES", "data": [prompt]}]}, timeout)
            answer = ((out.get("outputs") or [{}])[0].get("data") or [None])[0]
        else:
            payload = {"dataframe_records": [{input_name: prompt}]} if input_name else {"inputs": [prompt]}
            out = _post(f"{url}/invocations", payload, timeout).get("predictions")
            answer = out[0] if isinstance(out, list) and out else None
            if isinstance(answer, dict):  # a DataFrame output (MoA): its answer column
                answer = answer.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise StageError(f"smoke test: no answer to {prompt!r} (got {json.dumps(out)[:200]})")
        answers.append(answer)
    return answers


# ---------------------------------------------------------------- locally


def serve_local(model_uri: str, port: int, log_path: str | Path) -> subprocess.Popen:
    """Start ``mlflow models serve`` on 127.0.0.1:``port`` in this environment (logs to ``log_path``)."""
    import kubetune

    bin_dir = str(Path(sys.executable).parent)
    root = str(Path(kubetune.__file__).resolve().parent.parent)
    env = {**os.environ,
           # The server runs uvicorn from PATH and must import this kubetune (the model's code does).
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    log = open(log_path, "ab")  # noqa: SIM115 - the server process owns it
    return subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the command


def add_deploy_parser(sub, func) -> None:
    """``kubetune deploy NAME[@ALIAS]``: its arguments (the stage's settings)."""
    d = sub.add_parser("deploy", help="serve a registered version (KServe on a cluster, mlflow models serve "
                                      "locally), smoke-test it, roll the champion back if it fails")
    d.add_argument("model", metavar="NAME[@ALIAS]", help="registered model, alias or version (default: @champion)")
    d.add_argument("--target", choices=["auto", "local", "cluster"], default="auto",
                   help="cluster: a KServe InferenceService through your kubeconfig; local: mlflow models serve "
                        "(auto: cluster inside a pod, else local)")
    d.add_argument("--namespace", default="", help="namespace of the InferenceService")
    d.add_argument("--endpoint", default="", help="base URL for the smoke test (default: the service's status.url)")
    d.add_argument("--prompt", action="append", help="a smoke prompt (repeatable; default: two short questions)")
    d.add_argument("--keep", action="store_true", help="locally: keep serving after the smoke test")
    d.add_argument("--port", type=int, default=0, help="locally: port to serve on (default: a free one)")
    d.add_argument("--no-rollback", action="store_true", help="leave the champion where it is on failure")
    d.add_argument("--render", action="store_true", help="print the InferenceService YAML and stop")
    d.set_defaults(func=func)
