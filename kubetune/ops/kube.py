"""Kubernetes plumbing for pipeline tasks: a few named helpers and a profile file.

A pipeline body stays about the DAG; where a task needs a GPU, the workspace volume or the
S3 and MLflow credentials, it calls one helper here (or ``apply_profile`` to do them all
from a profile). Every helper writes through ``kfp.kubernetes`` or the ``PipelineTask``
setters, so the settings end up in the compiled YAML's ``platforms.kubernetes`` section or
the container's resources, where the KFP backend reads them.

Secrets are only ever *referenced*: a helper names a Kubernetes Secret and the keys to
expose; no value passes through Python, so none can land in the compiled YAML.

A profile is a small YAML file (``profiles/h200x2.yaml``; every field is described in
docs/kubernetes.md)::

    name: h200x2
    namespace: team-llm
    gpus: 2
    train: {cpu: "16", memory: 120Gi, timeout: 172800s, scratch: 200Gi}
    eval: {cpu: "8", memory: 64Gi, timeout: 21600s}
    cpu: {cpu: "2", memory: 8Gi, timeout: 7200s}
    node_selector: {nvidia.com/gpu.product: NVIDIA-H200}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    queue: team-llm

Lineage is stamped into every task at compile time (``stamp_lineage``): the commit the
pipeline was compiled from and the image the task runs, so a pod never has to guess them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from kubetune.core import defaults
from kubetune.errors import ConfigError

#: The kinds of step a profile sizes: GPU training stages (every GPU of the profile), GPU
#: evaluation and inference stages (one GPU: generation does not shard across them), and
#: everything else.
Role = Literal["train", "eval", "cpu"]

#: Keys of the S3 Secret, each exposed under the same environment variable name. boto3
#: reads the first two; MLflow's S3 artifact client reads ``MLFLOW_S3_ENDPOINT_URL``, and
#: boto3 >= 1.28 reads ``AWS_ENDPOINT_URL`` for every other S3 client (datasets, models).
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")

#: Required key of the MLflow Secret (the tracking server URL).
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI",)

#: Keys of the MLflow Secret that only servers with authentication need.
MLFLOW_OPTIONAL_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

#: Environment variable that tells the training entry point how many GPUs its pod holds,
#: so it can start one process per GPU under torchrun (see ``kubetune.launcher.launch``).
NPROC_ENV = "KUBETUNE_NPROC_PER_NODE"

#: Environment variable naming where the shared workspace volume is mounted.
WORKSPACE_ENV = defaults.WORKSPACE_ENV

#: Key of the Hugging Face Secret: a token for gated models (Llama, Gemma), read by
#: ``huggingface_hub`` itself.
HF_SECRET_KEYS = ("HF_TOKEN",)

#: Set to ``1`` to let a stage in a pod track to a file store (SQLite or ``file:``), which
#: vanishes with the container; meant for throwaway smoke runs only.
ALLOW_FILE_STORE_ENV = "KUBETUNE_ALLOW_FILE_STORE"

#: Compile-time lineage, read by ``kubetune.tracking`` before anything else: the commit the
#: pipeline was compiled from, and the image reference the task was compiled to run.
GIT_COMMIT_ENV = "KUBETUNE_GIT_COMMIT"
IMAGE_REF_ENV = "KUBETUNE_IMAGE_REF"

#: The pod label Kueue reads to admit a pod through a LocalQueue of the namespace.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

#: Where a task's scratch volume is mounted (``TMPDIR`` points there).
SCRATCH_PATH = "/scratch"

#: The profile a training task was compiled with (JSON), and the service account its pod runs
#: as: what the multi-node launcher (``kubetune.launcher.trainjob``) sizes and runs the job's nodes with.
PROFILE_ENV = "KUBETUNE_PROFILE_JSON"
SERVICE_ACCOUNT_ENV = "KUBETUNE_SERVICE_ACCOUNT"

#: Where shipped profiles are looked up by bare name: ``$KUBETUNE_PROFILES`` (the images
#: set it to the copy they carry), else ``profiles/`` of the source checkout.
PROFILES_ENV = "KUBETUNE_PROFILES"


def _profiles_dir() -> Path:
    return Path(os.environ.get(PROFILES_ENV) or Path(__file__).resolve().parents[2] / "profiles")


class ProfileError(ConfigError, ValueError):
    """A profile file that does not describe a valid profile; the message names the field."""


class ProfileNotFound(ConfigError, FileNotFoundError):
    """No profile file of that name or path; the message lists the shipped ones."""


@dataclass(frozen=True)
class Resources:
    """The size of one kind of pod: CPU and memory (request = limit), a deadline, scratch disk.

    Equal request and limit (Guaranteed QoS) keep a training pod from being evicted under
    node memory pressure in the middle of an epoch, which a Burstable pod can be.
    """

    cpu: str = "1"
    """CPU cores, a Kubernetes quantity: ``"4"`` or ``"500m"``."""

    memory: str = "4Gi"
    """Memory, a Kubernetes quantity: ``"16Gi"``, ``"512Mi"``."""

    timeout: str = ""
    """Deadline of one attempt of the pod (``activeDeadlineSeconds``), like ``"7200s"``; empty for none."""

    scratch: str = ""
    """Scratch disk at ``/scratch`` (``TMPDIR``), a generic ephemeral volume of this size (``"100Gi"``); empty for none."""


@dataclass(frozen=True)
class Profile:
    """Where and how big a pipeline's pods are: one per cluster shape, in ``profiles/``."""

    name: str
    """Short name, used in logs and as the file stem (``a100x8``)."""

    gpus: int = 0
    """GPUs per training pod; 0 runs the training stages on CPU (a dry run)."""

    accelerator_type: str = "nvidia.com/gpu"
    """Extended resource name of the GPU, as the device plugin advertises it."""

    namespace: str = ""
    """Kubernetes namespace the runs go to (``submit``/``schedule``); the Secrets and the PVC must be there. Empty: the KFP client's default."""

    service_account: str = ""
    """Service account of the run's pods; empty: KFP's default (``pipeline-runner``, or ``default-editor`` in a multi-user Profile)."""

    pipeline_root: str = ""
    """Where KFP keeps the run's artifacts (``s3://bucket/prefix``); empty: the KFP installation's default."""

    train: Resources = field(default_factory=lambda: Resources(cpu="4", memory="32Gi", timeout="172800s"))
    """Size of a training pod (all ``gpus`` of the profile)."""

    eval: Resources = field(default_factory=lambda: Resources(cpu="4", memory="32Gi", timeout="21600s"))
    """Size of an evaluation or inference pod (one GPU when ``gpus`` > 0)."""

    cpu: Resources = field(default_factory=lambda: Resources(timeout="7200s"))
    """Size of every other pod (ingest, tokenize, register)."""

    node_selector: dict[str, str] = field(default_factory=dict)
    """Node labels a training pod must match, e.g. ``nvidia.com/gpu.product``."""

    tolerations: list[dict[str, Any]] = field(default_factory=list)
    """Tolerations of a training pod (``key``, ``operator``, ``value``, ``effect``), for GPU nodes tainted against other work."""

    workspace_pvc: str = "kubetune-workspace"
    """PersistentVolumeClaim mounted in every pod for checkpoints and large artifacts; empty for none."""

    workspace_path: str = "/workspace"
    """Where the workspace volume is mounted."""

    model_cache: str = "/workspace/cache"
    """Model cache on the workspace volume: ``HF_HOME`` and ``KUBETUNE_HOME`` live under it, so a base model is downloaded once per cluster, not once per step; empty for none."""

    shm_size: str = "8Gi"
    """Size of the memory-backed ``/dev/shm`` of training and evaluation pods (NCCL and data loader workers; the container default is 64 MB); counts against the pod's memory; empty for the default."""

    scratch_storage_class: str = ""
    """StorageClass of the ``scratch`` volumes; empty: the cluster's default class."""

    tracking_uri: str = ""
    """MLflow tracking URI written into the pipeline (``http://mlflow.kubetune:5000``); wins over the Secret's and the ConfigMap's."""

    mlflow_config_map: str = ""
    """ConfigMap whose ``MLFLOW_TRACKING_URI`` key is the tracking URI; used when ``tracking_uri`` is empty."""

    mlflow_secret: str = "kubetune-mlflow"
    """Secret with ``MLFLOW_TRACKING_URI`` (used when neither ``tracking_uri`` nor ``mlflow_config_map`` is set) and optional ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``; empty for none."""

    allow_file_store: bool = False
    """Let stages track to a file store (SQLite) inside the pod, lost with it; for smoke tests only."""

    s3_secret: str = "kubetune-s3"
    """Secret with the S3 keys in ``S3_SECRET_KEYS``; empty for none."""

    hf_secret: str = "kubetune-hf"
    """Secret with ``HF_TOKEN`` for gated models; referenced as optional, so a missing Secret is no error; empty for none."""

    image_pull_secrets: list[str] = field(default_factory=list)
    """Secrets (``kubernetes.io/dockerconfigjson``) to pull the kubetune images from a private registry."""

    queue: str = ""
    """Kueue LocalQueue of the namespace; every pod gets the label ``kueue.x-k8s.io/queue-name``; empty for none."""

    retries: int = 2
    """How often a retry-safe step is retried after a failure (node loss, preemption)."""

    retry_backoff: str = "60s"
    """Wait before the first retry; doubled each time (``retry_backoff_factor``)."""

    retry_backoff_factor: float = 2.0
    """Growth of the wait between retries: 60 s, 120 s, 240 s with the defaults."""

    retry_backoff_max: str = "3600s"
    """Retries stop once this much time has passed since the first failure."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Build and validate a profile from parsed YAML.

        Args:
            data: Mapping of field names to values.

        Returns:
            The profile.

        Raises:
            ProfileError: naming the field that is unknown, missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ProfileError(f"a profile is a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"unknown profile field(s) {unknown}; known fields: {sorted(known)}")
        if "name" not in data:
            raise ProfileError("profile field 'name' is required")
        values = dict(data)
        for key in ("train", "eval", "cpu"):
            if key in values:
                values[key] = _resources(key, values[key])
        profile = cls(**values)
        profile._validate()
        return profile

    def _validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ProfileError(f"profile field {name!r}: {why}")

        need(isinstance(self.name, str) and bool(self.name), "name", "must be a non-empty string")
        need(
            isinstance(self.gpus, int) and not isinstance(self.gpus, bool) and self.gpus >= 0,
            "gpus",
            f"must be a non-negative integer, got {self.gpus!r}",
        )
        need(isinstance(self.accelerator_type, str) and bool(self.accelerator_type), "accelerator_type", "must be a non-empty string")
        need(
            isinstance(self.node_selector, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.node_selector.items()),
            "node_selector",
            "must map label names to string values (quote numbers and booleans)",
        )
        need(isinstance(self.tolerations, list), "tolerations", "must be a list")
        for i, tol in enumerate(self.tolerations):
            need(isinstance(tol, dict), f"tolerations[{i}]", "must be a mapping")
            extra = set(tol) - {"key", "operator", "value", "effect", "toleration_seconds"}
            need(not extra, f"tolerations[{i}]", f"unknown key(s) {sorted(extra)}")
            need(tol.get("operator", "Equal") in ("Equal", "Exists"), f"tolerations[{i}].operator", "must be Equal or Exists")
            need(
                tol.get("effect") in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"),
                f"tolerations[{i}].effect",
                "must be NoSchedule, PreferNoSchedule or NoExecute",
            )
        for name in ("namespace", "service_account", "pipeline_root", "workspace_pvc", "model_cache", "shm_size",
                     "scratch_storage_class", "tracking_uri", "mlflow_config_map", "mlflow_secret", "s3_secret",
                     "hf_secret", "queue"):
            need(isinstance(getattr(self, name), str), name, "must be a string (empty to disable)")
        need(isinstance(self.workspace_path, str) and self.workspace_path.startswith("/"), "workspace_path", "must be an absolute path")
        for name in ("namespace", "service_account", "queue"):
            value = getattr(self, name)
            need(not value or _is_dns_label(value), name, f"must be a Kubernetes name (lowercase, digits, '-'), got {value!r}")
        if self.model_cache:
            need(self.model_cache.startswith("/"), "model_cache", "must be an absolute path")
            need(
                not self.workspace_pvc or Path(self.model_cache).is_relative_to(self.workspace_path),
                "model_cache",
                f"must lie on the workspace volume ({self.workspace_path}), or every pod downloads the model again",
            )
        need(not self.shm_size or _is_quantity(self.shm_size), "shm_size", "must be a Kubernetes quantity like '8Gi'")
        for role in ("train", "eval", "cpu"):
            res = getattr(self, role)
            need(not res.timeout or _is_duration(res.timeout), f"{role}.timeout", "must be a duration in seconds like '7200s'")
            need(not res.scratch or _is_quantity(res.scratch), f"{role}.scratch", "must be a Kubernetes quantity like '100Gi'")
        need(
            isinstance(self.image_pull_secrets, list) and all(isinstance(x, str) and x for x in self.image_pull_secrets),
            "image_pull_secrets",
            "must be a list of Secret names",
        )
        need(isinstance(self.allow_file_store, bool), "allow_file_store", "must be true or false")
        # A cluster pipeline must know where MLflow is: a file store in a pod vanishes with it.
        need(
            bool(self.tracking_uri or self.mlflow_config_map or self.mlflow_secret) or self.allow_file_store,
            "tracking_uri",
            "no MLflow tracking URI: set tracking_uri, mlflow_config_map or mlflow_secret "
            "(or allow_file_store: true for a throwaway smoke run)",
        )
        need(
            "@" not in urlparse(self.tracking_uri).netloc,
            "tracking_uri",
            "must not carry credentials (it is written into the compiled pipeline); "
            "put MLFLOW_TRACKING_USERNAME/PASSWORD in the mlflow_secret",
        )
        need(
            not self.tracking_uri or not is_file_store(self.tracking_uri) or self.allow_file_store,
            "tracking_uri",
            f"{self.tracking_uri!r} is a file store, lost with the pod; name an MLflow server "
            "(or set allow_file_store: true)",
        )
        need(
            isinstance(self.retries, int) and not isinstance(self.retries, bool) and self.retries >= 0,
            "retries",
            "must be a non-negative integer",
        )
        need(_is_duration(self.retry_backoff), "retry_backoff", "must be a duration in seconds like '60s'")
        need(_is_duration(self.retry_backoff_max), "retry_backoff_max", "must be a duration in seconds like '3600s'")
        need(
            isinstance(self.retry_backoff_factor, (int, float)) and self.retry_backoff_factor >= 1,
            "retry_backoff_factor",
            "must be a number >= 1",
        )


def _resources(key: str, value: Any) -> Resources:
    if isinstance(value, Resources):
        return value
    known = [f.name for f in dataclasses.fields(Resources)]
    if not isinstance(value, dict):
        raise ProfileError(f"profile field {key!r}: must be a mapping of {known}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ProfileError(f"profile field {key!r}: unknown key(s) {unknown}; known: {known}")
    for sub in value:
        if not isinstance(value[sub], (str, int)) or isinstance(value[sub], bool):
            raise ProfileError(f"profile field '{key}.{sub}': must be a Kubernetes quantity string")
    # Unset keys keep the role's default, so ``train: {cpu: "16"}`` changes only the CPU.
    default = dataclasses.asdict({f.name: f for f in dataclasses.fields(Profile)}[key].default_factory())
    return Resources(**{**default, **{k: str(v) for k, v in value.items()}})


def _is_duration(value: Any) -> bool:
    return isinstance(value, str) and value.endswith("s") and value[:-1].isdigit()


def _seconds(duration: str) -> int:
    return int(duration[:-1])


def _is_quantity(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?", value) is not None


def _is_dns_label(value: str) -> bool:
    return re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value) is not None


def is_file_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a file store (SQLite file, ``file:`` or a bare path)."""
    return urlparse(uri).scheme in ("", "file", "sqlite")


def refuse_file_store_in_pod(uri: str) -> None:
    """Stop a stage in a Kubernetes pod from tracking to a file store, which dies with the pod.

    A pipeline compiled without a tracking URI would otherwise "succeed" while its runs and
    model versions vanish with the container. Outside a pod (``kfp.local``, tests) and with
    ``KUBETUNE_ALLOW_FILE_STORE=1`` this does nothing.

    Args:
        uri: The MLflow tracking URI the stage is about to use.

    Raises:
        ConfigError: in a pod, for a file store, unless explicitly allowed.
    """
    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    allowed = os.environ.get(ALLOW_FILE_STORE_ENV, "").lower() in ("1", "true", "yes")
    if in_pod and not allowed and is_file_store(uri):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI is {uri!r}, a file inside this pod that vanishes with it: compile with a "
            "profile that names the MLflow server (tracking_uri, mlflow_config_map or mlflow_secret; "
            f"docs/kubernetes.md), or set {ALLOW_FILE_STORE_ENV}=1 for a throwaway run"
        )


def load_profile(name_or_path: str | Path) -> Profile:
    """Read a profile file.

    Args:
        name_or_path: A path to a YAML file, or the bare name of a shipped profile
            (``"h200x2"`` reads ``profiles/h200x2.yaml``, or ``$KUBETUNE_PROFILES/h200x2.yaml``).

    Returns:
        The validated profile.

    Raises:
        ProfileNotFound: if neither a file nor a shipped profile of that name exists.
        ProfileError: if the file does not describe a valid profile.
    """
    import yaml

    path = Path(name_or_path)
    if not path.exists() and path.parent == Path(".") and path.suffix == "":
        path = _profiles_dir() / f"{path.name}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in _profiles_dir().glob("*.yaml"))
        raise ProfileNotFound(f"no profile file {name_or_path!s}; shipped profiles: {shipped}")
    try:
        return Profile.from_dict(yaml.safe_load(path.read_text()))
    except ProfileError as err:
        raise ProfileError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


# ---------------------------------------------------------------------------------------
# The named helpers. Each takes a PipelineTask, changes it and returns it, like kfp's own.
# ---------------------------------------------------------------------------------------


def request_gpus(
    task,
    count: int,
    accelerator_type: str = "nvidia.com/gpu",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
):
    """Give a task ``count`` GPUs and place it on nodes that have them.

    Also exports ``KUBETUNE_NPROC_PER_NODE=count`` so that the training entry point starts
    one process per GPU (``kubetune.launcher.launch``). ``count == 0`` leaves the task untouched.

    Args:
        task: The pipeline task.
        count: GPUs for the pod.
        accelerator_type: Extended resource name of the GPU (``nvidia.com/gpu``).
        node_selector: Node labels the pod must match.
        tolerations: Tolerations for tainted GPU nodes (``key``, ``operator``, ``value``,
            ``effect``).

    Returns:
        The task.
    """
    from kfp import kubernetes

    if count <= 0:
        return task
    task.set_accelerator_type(accelerator_type)
    task.set_accelerator_limit(count)
    task.set_env_variable(NPROC_ENV, str(count))
    for key, value in (node_selector or {}).items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in tolerations or []:
        kubernetes.add_toleration(
            task,
            key=tol.get("key"),
            operator=tol.get("operator", "Equal"),
            value=tol.get("value"),
            effect=tol.get("effect"),
            toleration_seconds=tol.get("toleration_seconds"),
        )
    return task


def set_resources(task, cpu: str, memory: str):
    """Set CPU and memory as both request and limit.

    Args:
        task: The pipeline task.
        cpu: CPU cores (``"4"``, ``"500m"``).
        memory: Memory (``"16Gi"``).

    Returns:
        The task.
    """
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    return task


def mount_workspace(task, pvc_name: str = "kubetune-workspace", mount_path: str = "/workspace"):
    """Mount the shared workspace volume and export its path as ``KUBETUNE_WORKSPACE``.

    Checkpoints go there rather than into KFP artifacts so that a retried or resumed
    training step finds the shards the previous attempt wrote. The claim must be
    ``ReadWriteMany`` when steps of one run may land on different nodes.

    Args:
        task: The pipeline task.
        pvc_name: Name of the PersistentVolumeClaim in the run's namespace.
        mount_path: Where it is mounted in the container.

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.mount_pvc(task, pvc_name=pvc_name, mount_path=mount_path)
    task.set_env_variable(WORKSPACE_ENV, mount_path)
    return task


def use_s3_secret(task, secret_name: str = "kubetune-s3"):
    """Expose the S3 credentials and endpoint of a Secret as environment variables.

    Args:
        task: The pipeline task.
        secret_name: Secret holding the keys in ``S3_SECRET_KEYS``.

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    return task


def use_mlflow_secret(task, secret_name: str = "kubetune-mlflow", *, with_uri: bool = True):
    """Expose the MLflow tracking URI (and credentials, where set) of a Secret as environment.

    Args:
        task: The pipeline task.
        secret_name: Secret holding ``MLFLOW_TRACKING_URI`` and, optionally,
            ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
        with_uri: Whether the URI comes from this Secret (else only the credentials do).

    Returns:
        The task.
    """
    from kfp import kubernetes

    if with_uri:
        kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS})
    # A separate optional reference: a server without authentication has no such keys,
    # and a missing required key would keep the pod from starting.
    kubernetes.use_secret_as_env(
        task,
        secret_name=secret_name,
        secret_key_to_env={k: k for k in MLFLOW_OPTIONAL_SECRET_KEYS},
        optional=True,
    )
    return task


def use_tracking(task, profile: Profile):
    """Tell a task where MLflow is: the profile's URI, its ConfigMap or its Secret, in that order.

    Credentials always come from the Secret (if named), never from the URI's sources.

    Args:
        task: The pipeline task.
        profile: The cluster profile.

    Returns:
        The task.
    """
    from kfp import kubernetes

    if profile.tracking_uri:
        task.set_env_variable("MLFLOW_TRACKING_URI", profile.tracking_uri)
    elif profile.mlflow_config_map:
        kubernetes.use_config_map_as_env(task, config_map_name=profile.mlflow_config_map,
                                         config_map_key_to_env={k: k for k in MLFLOW_SECRET_KEYS})
    if profile.mlflow_secret:
        use_mlflow_secret(task, profile.mlflow_secret, with_uri=not (profile.tracking_uri or profile.mlflow_config_map))
    if profile.allow_file_store:
        task.set_env_variable(ALLOW_FILE_STORE_ENV, "1")
    return task


def use_hf_secret(task, secret_name: str = "kubetune-hf"):
    """Expose ``HF_TOKEN`` of a Secret, for gated base models; optional, so no Secret is no error.

    Args:
        task: The pipeline task.
        secret_name: Secret holding ``HF_TOKEN``.

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env={k: k for k in HF_SECRET_KEYS},
                                 optional=True)
    return task


def use_model_cache(task, path: str = "/workspace/cache"):
    """Point the Hugging Face cache (``HF_HOME``) and kubetune's converted models at ``path``.

    On the workspace volume, a base model is downloaded once per cluster instead of once
    per step (each step is a fresh container).

    Args:
        task: The pipeline task.
        path: A folder on a mounted volume.

    Returns:
        The task.
    """
    task.set_env_variable("HF_HOME", f"{path}/huggingface")
    task.set_env_variable("KUBETUNE_HOME", f"{path}/kubetune")
    return task


def mount_shm(task, size: str = "8Gi"):
    """Mount a memory-backed ``/dev/shm`` of ``size`` (the container runtime's default is 64 MB).

    NCCL and PyTorch data loader workers pass tensors through shared memory and fail or
    crawl in 64 MB. The volume counts against the pod's memory limit.

    Args:
        task: The pipeline task.
        size: Size limit, a Kubernetes quantity.

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=size)
    return task


def add_scratch(task, size: str, storage_class: str = ""):
    """Give a task scratch disk at ``/scratch`` (``TMPDIR``): a generic ephemeral volume of ``size``.

    KFP 2.x cannot request ``ephemeral-storage`` for a task (its resource spec holds CPU,
    memory and accelerators only), so large temporary files would fill the node's disk
    unaccounted and get the pod evicted; a generic ephemeral volume is a real storage request
    the scheduler sees, deleted with the pod.

    Args:
        task: The pipeline task.
        size: Size of the volume, a Kubernetes quantity.
        storage_class: StorageClass to provision it from (empty: the default class).

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.add_ephemeral_volume(task, volume_name="scratch", mount_path=SCRATCH_PATH,
                                    access_modes=["ReadWriteOnce"], size=size,
                                    storage_class_name=storage_class or None)
    task.set_env_variable("TMPDIR", SCRATCH_PATH)
    return task


def set_timeout(task, duration: str):
    """Stop one attempt of a task after ``duration`` (``"7200s"``): the pod's ``activeDeadlineSeconds``.

    A hung NCCL collective or a stuck download otherwise holds its GPUs forever.

    Args:
        task: The pipeline task.
        duration: Seconds, like ``"7200s"``.

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.set_timeout(task, _seconds(duration))
    return task


def use_pull_secrets(task, names: list[str]):
    """Pull the task's image with these registry Secrets.

    Args:
        task: The pipeline task.
        names: Secret names (type ``kubernetes.io/dockerconfigjson``) in the run's namespace.

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.set_image_pull_secrets(task, list(names))
    return task


def use_queue(task, queue: str):
    """Admit the task's pod through a Kueue LocalQueue (the ``kueue.x-k8s.io/queue-name`` label).

    Args:
        task: The pipeline task.
        queue: LocalQueue name in the run's namespace.

    Returns:
        The task.
    """
    from kfp import kubernetes

    kubernetes.add_pod_label(task, label_key=KUEUE_QUEUE_LABEL, label_value=queue)
    return task


@functools.lru_cache(maxsize=1)
def _compile_commit() -> str:
    from kubetune.tracking import git_commit

    return git_commit()


def stamp_lineage(task):
    """Write the compile-time lineage into a task: the source commit and the task's own image.

    The pod then records what it was compiled as, rather than what it can find at run
    time (no git checkout in an image; ``KUBETUNE_REGISTRY`` is not set in the pod).
    An unknown commit is not written, so a commit the image carries shows through.

    Args:
        task: The pipeline task.

    Returns:
        The task.
    """
    commit = _compile_commit()
    if commit != "unknown":
        task.set_env_variable(GIT_COMMIT_ENV, commit)
    if task.container_spec is not None:
        task.set_env_variable(IMAGE_REF_ENV, task.container_spec.image)
    return task


def set_retries(task, count: int = 2, backoff: str = "60s", factor: float = 2.0, max_duration: str = "3600s"):
    """Retry a failed task with exponential backoff.

    Only for steps that are safe to run twice: they write their outputs whole at the end,
    or (training) resume from the checkpoint in the workspace.

    Args:
        task: The pipeline task.
        count: Retries after the first attempt.
        backoff: Wait before the first retry.
        factor: Multiplier of the wait per retry.
        max_duration: No retry starts after this much time.

    Returns:
        The task.
    """
    if count > 0:
        task.set_retry(num_retries=count, backoff_duration=backoff, backoff_factor=factor, backoff_max_duration=max_duration)
    return task


def no_cache(task):
    """Turn caching off for a step whose output is not a function of its inputs.

    GPU training is not bit-for-bit reproducible (non-deterministic kernels, NCCL
    reduction order), and registration has side effects outside KFP; a cache hit on
    either would silently reuse the wrong thing.

    Args:
        task: The pipeline task.

    Returns:
        The task.
    """
    task.set_caching_options(enable_caching=False)
    return task


def carry_profile(task, profile: Profile):
    """Hand a training task its profile and service account, for the multi-node launcher.

    Args:
        task: The training task.
        profile: The profile the pipeline is compiled with.

    Returns:
        The task.
    """
    from kfp import kubernetes

    task.set_env_variable(PROFILE_ENV, json.dumps(dataclasses.asdict(profile), sort_keys=True))
    # The job's nodes run as the pod that launches them (same identity for S3, same pulls).
    kubernetes.use_field_path_as_env(task, SERVICE_ACCOUNT_ENV, "spec.serviceAccountName")
    return task


def apply_profile(task, profile: Profile, role: Role = "cpu", *, retry: bool = True, cache: bool = True):
    """Apply a profile to a task: size, GPUs, placement, volumes, secrets, tracking, retries.

    Args:
        task: The pipeline task.
        profile: The cluster profile (``load_profile``).
        role: ``"train"`` for a training stage (all the profile's GPUs), ``"eval"`` for an
            evaluation or inference stage (one GPU), ``"cpu"`` for every other step.
        retry: Whether the step is safe to retry (see ``set_retries``).
        cache: Whether the step may be served from KFP's cache (see ``no_cache``).

    Returns:
        The task.
    """
    if role not in ("train", "eval", "cpu"):
        raise ValueError(f"role must be 'train', 'eval' or 'cpu', got {role!r}")
    size: Resources = getattr(profile, role)
    set_resources(task, size.cpu, size.memory)
    if role != "cpu":
        gpus = profile.gpus if role == "train" else min(profile.gpus, 1)
        request_gpus(task, gpus, profile.accelerator_type, profile.node_selector, profile.tolerations)
        if role == "train":
            carry_profile(task, profile)
        if profile.shm_size:
            mount_shm(task, profile.shm_size)
    if size.timeout:
        set_timeout(task, size.timeout)
    if size.scratch:
        add_scratch(task, size.scratch, profile.scratch_storage_class)
    if profile.workspace_pvc:
        mount_workspace(task, profile.workspace_pvc, profile.workspace_path)
    if profile.model_cache:
        use_model_cache(task, profile.model_cache)
    use_tracking(task, profile)
    if profile.s3_secret:
        use_s3_secret(task, profile.s3_secret)
    if profile.hf_secret:
        use_hf_secret(task, profile.hf_secret)
    if profile.image_pull_secrets:
        use_pull_secrets(task, profile.image_pull_secrets)
    if profile.queue:
        use_queue(task, profile.queue)
    stamp_lineage(task)
    if retry:
        set_retries(task, profile.retries, profile.retry_backoff, profile.retry_backoff_factor, profile.retry_backoff_max)
    if not cache:
        no_cache(task)
    return task


def on_cluster(profile: "Profile | None", *, cpu: list = (), gpu: list = (), eval: list = (), once: list = ()) -> None:
    """Apply ``profile`` to a pipeline's tasks, each list in its role.

    Without a profile (a local run, or a compile that names none) every task still gets its
    compile-time lineage (``stamp_lineage``) and nothing else, so the same pipeline body
    serves ``kfp.local`` and clusters.

    Args:
        profile: The cluster profile, or None.
        cpu: Steps without a GPU, retried after a failure.
        gpu: Training steps: every GPU of the profile.
        eval: Evaluation and inference steps: one GPU.
        once: CPU steps with side effects outside KFP (``register``): never retried, since
            a retry after a partial success would repeat it (a second model version).
    """
    if profile is None:
        for task in (*cpu, *gpu, *eval, *once):
            stamp_lineage(task)
        return
    for task in cpu:
        apply_profile(task, profile, "cpu")
    for task in gpu:
        apply_profile(task, profile, "train")
    for task in eval:
        apply_profile(task, profile, "eval")
    for task in once:
        apply_profile(task, profile, "cpu", retry=False)
