"""Multi-node training: run the training entry point as a Kubeflow Trainer job.

A KFP task holds one pod, so training across several nodes runs as a separate job that the
training step creates and watches (``train_on_nodes``, when the pipeline's ``nodes`` is above
1). ``build_manifest`` writes the job: a Kubeflow Trainer ``TrainJob``
(``trainer.kubeflow.org/v1alpha1``, the API of Trainer v2.3, built from its Python models) or,
on clusters with the older training operator, a ``PyTorchJob`` (``kubeflow.org/v1``). ``run_job`` creates
it through the Kubernetes API, streams the rank-0 pod's log into the task's log, fails
when the job fails and deletes the job at the end, whatever the outcome.

Every node runs ``torchrun -m kubetune.launcher.train_entry --config cfg.json``: the same entry
point a single pod runs (``kubetune.launcher.launch``). The operator sets the ``PET_NNODES``,
``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``
variables that torchrun reads, so the command needs no rendezvous arguments. The config
file and the checkpoints live on the shared workspace volume, which every node mounts.

The launching pod's service account needs the RBAC in ``manifests/base/launcher-rbac.yaml``;
the job's nodes run as the same service account.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from kubetune.ops.image import TRAIN_IMAGE
from kubetune.ops.kube import (
    MLFLOW_OPTIONAL_SECRET_KEYS,
    MLFLOW_SECRET_KEYS,
    PROFILE_ENV,
    S3_SECRET_KEYS,
    SERVICE_ACCOUNT_ENV,
    WORKSPACE_ENV,
    Profile,
)
from kubetune.launcher.launch import ENTRY_MODULE

Api = Literal["trainjob", "pytorchjob"]

#: group, version, plural and kind of each job API.
APIS: dict[str, dict[str, str]] = {
    "trainjob": {"group": "trainer.kubeflow.org", "version": "v1alpha1", "plural": "trainjobs", "kind": "TrainJob"},
    "pytorchjob": {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs", "kind": "PyTorchJob"},
}

#: Condition types that end a job, per API, and whether they mean success.
TERMINAL: dict[str, dict[str, bool]] = {
    "trainjob": {"Complete": True, "Failed": False},
    "pytorchjob": {"Succeeded": True, "Failed": False},
}

#: Name of the training container: fixed by each operator (Trainer's runtimes call the
#: trainer step's container ``node``; the training operator requires ``pytorch``).
CONTAINER = {"trainjob": "node", "pytorchjob": "pytorch"}

#: Label selector of the rank-0 pod, whose log is streamed.
RANK0_SELECTOR = {
    "trainjob": "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
    "batch.kubernetes.io/job-completion-index=0",
    "pytorchjob": "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master,"
    "training.kubeflow.org/replica-index=0",
}

_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TrainJobFailed(RuntimeError):
    """The training job ended in a failed state; the message carries the operator's reason."""


def job_name(prefix: str = "kubetune") -> str:
    """A fresh job name: ``prefix`` plus 8 random hex digits.

    A retried KFP task must not collide with the job of the attempt before it, which may
    still be terminating.

    Args:
        prefix: Start of the name (lowercase letters, digits, ``-``).

    Returns:
        A name valid as an RFC 1035 label (TrainJob requires one).
    """
    return f"{prefix[:50].rstrip('-')}-{secrets.token_hex(4)}"


def command(config_path: str, module: str = ENTRY_MODULE) -> list[str]:
    """The command every node runs: torchrun over the shared entry point."""
    return ["torchrun", "-m", module, "--config", str(config_path)]


def _env(profile: Profile) -> list[dict[str, Any]]:
    # Secrets as references (secretKeyRef), never as values: the manifest holds names only.
    env: list[dict[str, Any]] = []
    if profile.workspace_pvc:
        env.append({"name": WORKSPACE_ENV, "value": profile.workspace_path})
    for secret, keys, optional in (
        (profile.s3_secret, S3_SECRET_KEYS, False),
        (profile.mlflow_secret, MLFLOW_SECRET_KEYS, False),
        (profile.mlflow_secret, MLFLOW_OPTIONAL_SECRET_KEYS, True),
    ):
        if secret:
            for key in keys:
                ref = {"name": secret, "key": key}
                if optional:
                    ref["optional"] = True
                env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _resources(profile: Profile) -> dict[str, Any]:
    quantities = {"cpu": profile.train.cpu, "memory": profile.train.memory}
    if profile.gpus:
        quantities[profile.accelerator_type] = str(profile.gpus)
    return {"requests": dict(quantities), "limits": dict(quantities)}


def _tolerations(profile: Profile) -> list[dict[str, Any]]:
    out = []
    for tol in profile.tolerations:
        t = {k: v for k, v in tol.items() if k != "toleration_seconds" and v is not None}
        if tol.get("toleration_seconds") is not None:
            t["tolerationSeconds"] = tol["toleration_seconds"]
        out.append(t)
    return out


def _volumes(profile: Profile) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not profile.workspace_pvc:
        return [], []
    volumes = [{"name": "workspace", "persistentVolumeClaim": {"claimName": profile.workspace_pvc}}]
    mounts = [{"name": "workspace", "mountPath": profile.workspace_path}]
    return volumes, mounts


#: Pod Security "restricted": what every training pod and container declares, so the job runs
#: in namespaces that enforce it (Kubeflow profile namespaces can).
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}

#: Owner of kubetune's entry in a TrainJob's ``spec.runtimePatches`` (each writer, Kueue or
#: the SDK, keeps its own entry, keyed by manager).
PATCH_MANAGER = "kubetune.io/launcher"


def _trainjob(meta, config_path, num_nodes, nproc, profile, image, runtime, module, env, volumes, mounts,
              service_account) -> dict[str, Any]:
    # Built from the Trainer API's own models (kubeflow_trainer_api, the types TrainerClient
    # sends): a field the v2.3 API does not have cannot be written. Placement, volume and
    # security go into spec.runtimePatches, which replaced podTemplateOverrides in Trainer v2.2
    # (the API server prunes the old field, and with it the PVC and node selector).
    from kubeflow.trainer.constants import constants
    from kubeflow_trainer_api import models as m

    container = m.TrainerV1alpha1ContainerPatch(
        name=constants.NODE,
        volumeMounts=[m.IoK8sApiCoreV1VolumeMount.from_dict(v) for v in mounts] or None,
        securityContext=m.IoK8sApiCoreV1SecurityContext.from_dict(CONTAINER_SECURITY),
    )
    pod = m.TrainerV1alpha1PodSpecPatch(
        containers=[container],
        volumes=[m.IoK8sApiCoreV1Volume.from_dict(v) for v in volumes] or None,
        nodeSelector=dict(profile.node_selector) or None,
        tolerations=[m.IoK8sApiCoreV1Toleration.from_dict(t) for t in _tolerations(profile)] or None,
        securityContext=m.IoK8sApiCoreV1PodSecurityContext.from_dict(POD_SECURITY),
        serviceAccountName=service_account,
    )
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicatedJobs=[
                        m.TrainerV1alpha1ReplicatedJobPatch(
                            name=constants.NODE,
                            template=m.TrainerV1alpha1JobTemplatePatch(
                                spec=m.TrainerV1alpha1JobSpecPatch(
                                    template=m.TrainerV1alpha1PodTemplatePatch(spec=pod)
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    job = m.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta.from_dict(meta),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtimeRef=m.TrainerV1alpha1RuntimeRef(name=runtime),
            trainer=m.TrainerV1alpha1Trainer(
                image=image,
                command=command(config_path, module),
                env=[m.IoK8sApiCoreV1EnvVar.from_dict(e) for e in env] or None,
                numNodes=num_nodes,
                numProcPerNode=nproc,
                resourcesPerNode=m.IoK8sApiCoreV1ResourceRequirements.from_dict(_resources(profile)),
            ),
            runtimePatches=[patch],
        ),
    )
    return job.to_dict()


def build_manifest(
    name: str,
    config_path: str,
    *,
    num_nodes: int,
    profile: Profile,
    image: str = TRAIN_IMAGE,
    api: Api = "trainjob",
    namespace: str = "kubetune",
    runtime: str = "torch-distributed",
    module: str = ENTRY_MODULE,
    labels: dict[str, str] | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """Write the job that trains on ``num_nodes`` nodes with ``profile.gpus`` GPUs each.

    Args:
        name: Job name (``job_name()``).
        config_path: Training config on the shared workspace, as the pods see it.
        num_nodes: Nodes (pods) in the job.
        profile: Sizes, placement, volume and secrets of each node (its ``train`` role).
        image: Training image; the one the single-pod stages use.
        api: ``"trainjob"`` (Kubeflow Trainer v2) or ``"pytorchjob"`` (training operator v1).
        namespace: Namespace of the job.
        runtime: ClusterTrainingRuntime a TrainJob refers to (Trainer ships
            ``torch-distributed``); unused for a PyTorchJob.
        module: Entry point module run by torchrun on every node.
        labels: Extra labels on the job (e.g. the KFP run id).
        service_account: Service account of the training pods (workload identity for S3,
            image pulls); ``None`` keeps the namespace's ``default``.

    Returns:
        The manifest as a dict, ready for the API or ``yaml.safe_dump``.
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {sorted(APIS)}, got {api!r}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    meta = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "kubetune", "app.kubernetes.io/component": "training", **(labels or {})},
    }
    nproc = max(1, profile.gpus)
    volumes, mounts = _volumes(profile)
    env = _env(profile)
    kind = APIS[api]
    head = {"apiVersion": f"{kind['group']}/{kind['version']}", "kind": kind["kind"], "metadata": meta}

    if api == "trainjob":
        return _trainjob(meta, config_path, num_nodes, nproc, profile, image, runtime, module, env, volumes, mounts,
                         service_account)

    container = {
        "name": CONTAINER[api],
        "image": image,
        "command": command(config_path, module),
        "env": env,
        "resources": _resources(profile),
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    template_spec: dict[str, Any] = {"containers": [container], "volumes": volumes,
                                     "securityContext": copy.deepcopy(POD_SECURITY)}
    if service_account:
        template_spec["serviceAccountName"] = service_account
    if profile.node_selector:
        template_spec["nodeSelector"] = dict(profile.node_selector)
    if profile.tolerations:
        template_spec["tolerations"] = _tolerations(profile)

    def replica(count: int) -> dict[str, Any]:
        # restartPolicy Never + backoffLimit 0: a failed node fails the job at once and
        # the KFP task's retry policy decides what happens next (resume from checkpoint).
        # A copy each: shared dicts would serialise as YAML anchors (&id001) in --dry-run output.
        return {"replicas": count, "restartPolicy": "Never", "template": {"spec": copy.deepcopy(template_spec)}}

    replicas = {"Master": replica(1)}
    if num_nodes > 1:
        replicas["Worker"] = replica(num_nodes - 1)
    spec = {
        "nprocPerNode": str(nproc),
        "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
        "pytorchReplicaSpecs": replicas,
    }
    return {**head, "spec": spec}


def job_state(obj: dict[str, Any], api: Api) -> tuple[str, str]:
    """Where a job stands, from its status conditions.

    Args:
        obj: The job as the API returns it.
        api: Which job API it belongs to.

    Returns:
        ``(state, message)``: state is ``"Succeeded"``, ``"Failed"`` or the type of the
        latest true condition (``"Pending"`` when there is none yet).
    """
    conditions = (obj.get("status") or {}).get("conditions") or []
    true = [c for c in conditions if str(c.get("status")) == "True"]
    for cond in true:
        ok = TERMINAL[api].get(cond.get("type"))
        if ok is not None:
            return ("Succeeded" if ok else "Failed"), cond.get("message") or cond.get("reason") or ""
    if true:
        last = true[-1]
        return last.get("type", "Pending"), last.get("message") or ""
    return "Pending", ""


def api_client_from_environment():
    """A Kubernetes API client: in-cluster credentials in a pod, else the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # KUBECONFIG read now: the client library reads it once, when first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    return client.ApiClient()


def current_namespace(default: str = "kubetune") -> str:
    """The namespace of the pod this runs in (``default`` outside a cluster)."""
    try:
        with open(_NAMESPACE_FILE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def _stream_log(core, pod: str, namespace: str, container: str, emit: Callable[[str], None]) -> None:
    from kubernetes.watch.watch import iter_resp_lines

    try:
        resp = core.read_namespaced_pod_log(pod, namespace, container=container, follow=True, _preload_content=False)
        try:
            for line in iter_resp_lines(resp):
                emit(f"[{pod}] {line}")
        finally:
            resp.release_conn()
    except Exception as err:  # a lost log stream must not fail a job that still runs
        emit(f"[launcher] log stream of {pod} ended: {err}")


def run_job(
    manifest: dict[str, Any],
    *,
    api_client=None,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    emit: Callable[[str], None] = print,
    delete: bool = True,
) -> dict[str, Any]:
    """Create a job, stream its rank-0 log and status until it ends, then delete it.

    Args:
        manifest: From ``build_manifest``.
        api_client: A ``kubernetes.client.ApiClient``; defaults to
            ``api_client_from_environment()``.
        poll_s: Seconds between status reads.
        timeout_s: Give up (and delete the job) after this long; ``None`` waits forever.
        emit: Where status and log lines go (the KFP task log by default).
        delete: Delete the job at the end. Off only to debug a failed job by hand.

    Returns:
        The job object as last read, with its final status.

    Raises:
        TrainJobFailed: if the job failed.
        TimeoutError: if ``timeout_s`` passed first.
    """
    from kubernetes import client

    api_client = api_client or api_client_from_environment()
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    api: Api = next(a for a, k in APIS.items() if manifest["kind"] == k["kind"])
    kind = APIS[api]
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = {"group": kind["group"], "version": kind["version"], "namespace": namespace, "plural": kind["plural"]}

    custom.create_namespaced_custom_object(body=manifest, **where)
    emit(f"[launcher] created {kind['kind']} {namespace}/{name}")
    streamer: threading.Thread | None = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    state = None
    try:
        while True:
            obj = custom.get_namespaced_custom_object(name=name, **where)
            new_state, message = job_state(obj, api)
            if new_state != state:
                emit(f"[launcher] {kind['kind']} {name}: {new_state}" + (f" ({message})" if message else ""))
                state = new_state
            if streamer is None:
                pods = core.list_namespaced_pod(namespace, label_selector=RANK0_SELECTOR[api].format(name=name)).items
                started = [p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")]
                if started:
                    streamer = threading.Thread(
                        target=_stream_log,
                        args=(core, started[0].metadata.name, namespace, CONTAINER[api], emit),
                        daemon=True,
                    )
                    streamer.start()
            if state in ("Succeeded", "Failed"):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{kind['kind']} {name} still {state} after {timeout_s} s")
            time.sleep(poll_s)
        if streamer is not None:
            # The pod has ended, so its log stream ends too; the bound only guards a hung connection.
            streamer.join(timeout=60)
        if state == "Failed":
            raise TrainJobFailed(f"{kind['kind']} {namespace}/{name} failed: {message}")
        return obj
    finally:
        if delete:
            try:
                custom.delete_namespaced_custom_object(name=name, propagation_policy="Background", **where)
                emit(f"[launcher] deleted {kind['kind']} {namespace}/{name}")
            except client.ApiException as err:
                emit(f"[launcher] could not delete {kind['kind']} {namespace}/{name}: {err.status} {err.reason}")


def launch(
    config_path: str,
    *,
    num_nodes: int,
    profile: Profile,
    api: Api = "trainjob",
    image: str = TRAIN_IMAGE,
    namespace: str | None = None,
    runtime: str = "torch-distributed",
    name: str | None = None,
    api_client=None,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """Train on ``num_nodes`` nodes and wait: ``build_manifest`` then ``run_job``.

    Args:
        config_path: Training config on the shared workspace.
        num_nodes: Nodes in the job.
        profile: Per-node resources, placement, volume and secrets.
        api: ``"trainjob"`` or ``"pytorchjob"``.
        image: Training image.
        namespace: Job namespace; defaults to the launcher pod's own.
        runtime: ClusterTrainingRuntime for a TrainJob.
        name: Job name; defaults to a fresh ``job_name()``.
        api_client: Kubernetes API client; defaults to in-cluster or kubeconfig.
        poll_s: Seconds between status reads.
        timeout_s: Give up after this long.
        service_account: Service account of the training pods.

    Returns:
        The finished job object.
    """
    manifest = build_manifest(
        name or job_name(),
        config_path,
        num_nodes=num_nodes,
        profile=profile,
        image=image,
        api=api,
        namespace=namespace or current_namespace(),
        runtime=runtime,
        service_account=service_account,
    )
    return run_job(manifest, api_client=api_client, poll_s=poll_s, timeout_s=timeout_s)


def profile_from_env() -> Profile:
    """The cluster profile the pipeline was compiled with (``KUBETUNE_PROFILE_JSON``).

    Raises:
        KubetuneError: outside a task compiled with a profile (nothing says how big a node is).
    """
    from kubetune.errors import KubetuneError

    raw = os.environ.get(PROFILE_ENV)
    if not raw:
        raise KubetuneError(f"nodes > 1 needs a pipeline compiled with a cluster profile ({PROFILE_ENV} is not set)")
    return Profile.from_dict(json.loads(raw))


def train_on_nodes(job: Path, spec: dict[str, Any], nodes: int, **launch_args) -> dict[str, Any]:
    """Run one training stage as a TrainJob of ``nodes`` nodes, from the stage's own pod.

    The job's pods see only the shared workspace, so the tokenized data is copied into
    ``job`` first and the model is written there and copied to the stage's output after.

    Args:
        job: A fresh folder on the workspace volume (``$KUBETUNE_WORKSPACE/jobs/...``).
        spec: The ``kubetune.launcher.train_entry`` config of the stage (stage, cfg, folders, ctx).
        nodes: Nodes in the job.
        **launch_args: Passed to ``launch`` (``api_client``, ``poll_s``, ``namespace`` ...).

    Returns:
        ``spec`` as the job ran it, its ``result`` file holding the stage's result with the
        caller's ``output_dir``.
    """
    profile = profile_from_env()
    tokenized, model = job / "tokenized", job / "model"
    shutil.copytree(spec["tokenized_dir"], tokenized, dirs_exist_ok=True)
    ran = {**spec, "tokenized_dir": str(tokenized), "output_dir": str(model), "result": str(job / "result.json")}
    (job / "config.json").write_text(json.dumps(ran))
    launch_args.setdefault("service_account", os.environ.get(SERVICE_ACCOUNT_ENV) or None)
    launch(str(job / "config.json"), num_nodes=nodes, profile=profile, **launch_args)
    shutil.copytree(model, spec["output_dir"], dirs_exist_ok=True)
    shutil.rmtree(tokenized, ignore_errors=True)
    result = json.loads(Path(ran["result"]).read_text())
    Path(ran["result"]).write_text(json.dumps({**result, "output_dir": str(spec["output_dir"])}))
    return ran


def main(argv: list[str] | None = None) -> int:
    """``python -m kubetune.launcher.trainjob --config /workspace/run/cfg.json --nodes 2 --profile h200x2``."""
    from kubetune.ops.kube import load_profile

    parser = argparse.ArgumentParser(prog="python -m kubetune.launcher.trainjob", description=main.__doc__)
    parser.add_argument("--config", required=True, help="training config on the shared workspace")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--profile", required=True, help="profile name or file (per-node GPUs and placement)")
    parser.add_argument("--api", choices=sorted(APIS), default="trainjob", help="TrainJob (Trainer v2) or PyTorchJob (v1)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--runtime", default="torch-distributed")
    parser.add_argument("--image", default=TRAIN_IMAGE)
    parser.add_argument("--service-account", default=None, help="service account of the training pods")
    parser.add_argument("--dry-run", action="store_true", help="print the manifest and exit")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    if args.dry_run:
        import yaml

        manifest = build_manifest(
            job_name(),
            args.config,
            num_nodes=args.nodes,
            profile=profile,
            image=args.image,
            api=args.api,
            namespace=args.namespace or current_namespace(),
            runtime=args.runtime,
            service_account=args.service_account,
        )
        print(yaml.safe_dump(manifest, sort_keys=False))
        return 0
    # KFP stops a cancelled task with SIGTERM; turning it into SystemExit runs run_job's
    # finally clause, so the job (and its GPUs) does not outlive the task.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    launch(
        args.config,
        num_nodes=args.nodes,
        profile=profile,
        api=args.api,
        image=args.image,
        namespace=args.namespace,
        runtime=args.runtime,
        service_account=args.service_account,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
