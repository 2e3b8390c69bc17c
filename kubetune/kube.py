"""Kubernetes plumbing for pipeline tasks: a few named helpers and a profile file.

A pipeline body stays about the DAG; where a task needs a GPU, the workspace volume or the
S3 and MLflow credentials, it calls one helper here (or ``apply_profile`` to do them all
from a profile). Every helper writes through ``kfp.kubernetes`` or the ``PipelineTask``
setters, so the settings end up in the compiled YAML's ``platforms.kubernetes`` section or
the container's resources, where the KFP backend reads them.

Secrets are only ever *referenced*: a helper names a Kubernetes Secret and the keys to
expose; no value passes through Python, so none can land in the compiled YAML.

A profile is a small YAML file (``profiles/h200x2.yaml``)::

    name: h200x2
    gpus: 2
    accelerator_type: nvidia.com/gpu
    train: {cpu: "16", memory: 120Gi}
    cpu: {cpu: "2", memory: 8Gi}
    node_selector: {nvidia.com/gpu.product: NVIDIA-H200}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: The two kinds of step a profile sizes: GPU training stages and everything else.
Role = Literal["train", "cpu"]

#: Keys of the S3 Secret, each exposed under the same environment variable name. boto3
#: reads the first two; MLflow's S3 artifact client reads ``MLFLOW_S3_ENDPOINT_URL``, and
#: boto3 >= 1.28 reads ``AWS_ENDPOINT_URL`` for every other S3 client (datasets, models).
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")

#: Required key of the MLflow Secret (the tracking server URL).
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI",)

#: Keys of the MLflow Secret that only servers with authentication need.
MLFLOW_OPTIONAL_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

#: Environment variable that tells the training entry point how many GPUs its pod holds,
#: so it can start one process per GPU under torchrun (see ``kubetune.launch``).
NPROC_ENV = "KUBETUNE_NPROC_PER_NODE"

#: Environment variable naming where the shared workspace volume is mounted.
WORKSPACE_ENV = "KUBETUNE_WORKSPACE"

#: The profile a training task was compiled with (JSON), and the service account its pod runs
#: as: what the multi-node launcher (``kubetune.trainjob``) sizes and runs the job's nodes with.
PROFILE_ENV = "KUBETUNE_PROFILE_JSON"
SERVICE_ACCOUNT_ENV = "KUBETUNE_SERVICE_ACCOUNT"

#: Where shipped profiles are looked up by bare name: ``$KUBETUNE_PROFILES`` (the images
#: set it to the copy they carry), else ``profiles/`` of the source checkout.
PROFILES_ENV = "KUBETUNE_PROFILES"


def _profiles_dir() -> Path:
    return Path(os.environ.get(PROFILES_ENV) or Path(__file__).resolve().parent.parent / "profiles")


class ProfileError(ValueError):
    """A profile file that does not describe a valid profile; the message names the field."""


@dataclass(frozen=True)
class Resources:
    """CPU and memory of one pod; applied as both request and limit (Guaranteed QoS).

    Equal request and limit keep a training pod from being evicted under node memory
    pressure in the middle of an epoch, which a Burstable pod can be.
    """

    cpu: str = "1"
    """CPU cores, a Kubernetes quantity: ``"4"`` or ``"500m"``."""

    memory: str = "4Gi"
    """Memory, a Kubernetes quantity: ``"16Gi"``, ``"512Mi"``."""


@dataclass(frozen=True)
class Profile:
    """Where and how big a pipeline's pods are: one per cluster shape, in ``profiles/``."""

    name: str
    """Short name, used in logs and as the file stem (``a100x8``)."""

    gpus: int = 0
    """GPUs per training pod; 0 runs the training stages on CPU (a dry run)."""

    accelerator_type: str = "nvidia.com/gpu"
    """Extended resource name of the GPU, as the device plugin advertises it."""

    train: Resources = field(default_factory=lambda: Resources(cpu="4", memory="32Gi"))
    """CPU and memory of a training pod."""

    cpu: Resources = field(default_factory=Resources)
    """CPU and memory of every other pod (ingest, tokenize, evaluate-on-CPU, register)."""

    node_selector: dict[str, str] = field(default_factory=dict)
    """Node labels a training pod must match, e.g. ``nvidia.com/gpu.product``."""

    tolerations: list[dict[str, Any]] = field(default_factory=list)
    """Tolerations of a training pod (``key``, ``operator``, ``value``, ``effect``), for GPU nodes tainted against other work."""

    workspace_pvc: str = "kubetune-workspace"
    """PersistentVolumeClaim mounted in every pod for checkpoints and large artifacts; empty for none."""

    workspace_path: str = "/workspace"
    """Where the workspace volume is mounted."""

    s3_secret: str = "kubetune-s3"
    """Secret with the S3 keys in ``S3_SECRET_KEYS``; empty for none."""

    mlflow_secret: str = "kubetune-mlflow"
    """Secret with ``MLFLOW_TRACKING_URI`` (and optional credentials); empty for none."""

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
        for key in ("train", "cpu"):
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
        for name in ("workspace_pvc", "s3_secret", "mlflow_secret"):
            need(isinstance(getattr(self, name), str), name, "must be a string (empty to disable)")
        need(isinstance(self.workspace_path, str) and self.workspace_path.startswith("/"), "workspace_path", "must be an absolute path")
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
    if not isinstance(value, dict):
        raise ProfileError(f"profile field {key!r}: must be a mapping with 'cpu' and 'memory'")
    unknown = sorted(set(value) - {"cpu", "memory"})
    if unknown:
        raise ProfileError(f"profile field {key!r}: unknown key(s) {unknown}; known: ['cpu', 'memory']")
    for sub in ("cpu", "memory"):
        if sub in value and not isinstance(value[sub], (str, int)):
            raise ProfileError(f"profile field '{key}.{sub}': must be a Kubernetes quantity string")
    return Resources(**{k: str(v) for k, v in value.items()})


def _is_duration(value: Any) -> bool:
    return isinstance(value, str) and value.endswith("s") and value[:-1].isdigit()


def load_profile(name_or_path: str | Path) -> Profile:
    """Read a profile file.

    Args:
        name_or_path: A path to a YAML file, or the bare name of a shipped profile
            (``"h200x2"`` reads ``profiles/h200x2.yaml``, or ``$KUBETUNE_PROFILES/h200x2.yaml``).

    Returns:
        The validated profile.

    Raises:
        FileNotFoundError: if neither a file nor a shipped profile of that name exists.
        ProfileError: if the file does not describe a valid profile.
    """
    import yaml

    path = Path(name_or_path)
    if not path.exists() and path.parent == Path(".") and path.suffix == "":
        path = _profiles_dir() / f"{path.name}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in _profiles_dir().glob("*.yaml"))
        raise FileNotFoundError(f"no profile file {name_or_path!s}; shipped profiles: {shipped}")
    try:
        return Profile.from_dict(yaml.safe_load(path.read_text()))
    except ProfileError as err:
        raise ProfileError(f"{path}: {err}") from None


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
    one process per GPU (``kubetune.launch``). ``count == 0`` leaves the task untouched.

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


def use_mlflow_secret(task, secret_name: str = "kubetune-mlflow"):
    """Expose the MLflow tracking URI (and credentials, where set) of a Secret as environment.

    Args:
        task: The pipeline task.
        secret_name: Secret holding ``MLFLOW_TRACKING_URI`` and, optionally,
            ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.

    Returns:
        The task.
    """
    from kfp import kubernetes

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
    """Apply a profile to a task: resources, GPUs, placement, volume, secrets, retries.

    Args:
        task: The pipeline task.
        profile: The cluster profile (``load_profile``).
        role: ``"train"`` for a GPU stage, ``"cpu"`` for every other step.
        retry: Whether the step is safe to retry (see ``set_retries``).
        cache: Whether the step may be served from KFP's cache (see ``no_cache``).

    Returns:
        The task.
    """
    if role not in ("train", "cpu"):
        raise ValueError(f"role must be 'train' or 'cpu', got {role!r}")
    resources = profile.train if role == "train" else profile.cpu
    set_resources(task, resources.cpu, resources.memory)
    if role == "train":
        request_gpus(task, profile.gpus, profile.accelerator_type, profile.node_selector, profile.tolerations)
        carry_profile(task, profile)
    if profile.workspace_pvc:
        mount_workspace(task, profile.workspace_pvc, profile.workspace_path)
    if profile.s3_secret:
        use_s3_secret(task, profile.s3_secret)
    if profile.mlflow_secret:
        use_mlflow_secret(task, profile.mlflow_secret)
    if retry:
        set_retries(task, profile.retries, profile.retry_backoff, profile.retry_backoff_factor, profile.retry_backoff_max)
    if not cache:
        no_cache(task)
    return task


def on_cluster(profile: "Profile | None", *, cpu: list = (), gpu: list = ()) -> None:
    """Apply ``profile`` to a pipeline's tasks: ``gpu`` ones get the training resources.

    A no-op without a profile, so the same pipeline body serves ``kfp.local`` and clusters.
    """
    if profile is None:
        return
    for task in cpu:
        apply_profile(task, profile, "cpu")
    for task in gpu:
        apply_profile(task, profile, "train")
